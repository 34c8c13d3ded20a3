// idemrt decode page: plain JavaScript, no build step, no external resources.
// Server text is only ever rendered with textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);

// What the page holds; `window.idemrtPage` lets tests (and curious users) look at it.
const state = {
  models: null,      // GET /v1/models
  idm: null,         // the .idm bytes (Uint8Array)
  width: 0, height: 0,
  urls: {},          // object URLs by name: idm, mse, perceptual
  controller: null,  // AbortController of the running perceptual decode
  previews: [],      // data URLs of this decode's previews, in order
  result: null,      // the last result event's fields (no image)
  recompress: null,  // the re-compression check of the last perceptual decode: {same, differing, bytes}
  busy: false,
};
window.idemrtPage = state;

class ProblemError extends Error {
  constructor(title, detail, status) {
    super(detail ? `${title}: ${detail}` : title);
    this.title = title;
    this.detail = detail || "";
    this.status = status || 0;
  }
}

function showError(err) {
  const title = err instanceof ProblemError ? err.title : "Something went wrong";
  const detail = err instanceof ProblemError ? err.detail : String(err && err.message ? err.message : err);
  $("error-title").textContent = title;
  $("error-detail").textContent = detail;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-title").textContent = "";
  $("error-detail").textContent = "";
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// A failed answer as a ProblemError: problem+json's title and detail, else the status line.
async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      const p = await response.json();
      return new ProblemError(String(p.title || response.statusText || "Error"), String(p.detail || ""), response.status);
    } catch (e) { /* fall through */ }
  }
  return new ProblemError(`HTTP ${response.status} ${response.statusText}`.trim(), "", response.status);
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", body, signal,
                                       headers: { "Content-Type": "application/octet-stream" } });
  if (!response.ok) throw await problemOf(response);
  return response;
}

function setUrl(name, blob, link) {
  if (state.urls[name]) URL.revokeObjectURL(state.urls[name]);
  state.urls[name] = blob ? URL.createObjectURL(blob) : null;
  if (link) {
    if (blob) {
      link.href = state.urls[name];
      link.classList.remove("disabled");
      link.removeAttribute("aria-disabled");
    } else {
      link.removeAttribute("href");
      link.classList.add("disabled");
      link.setAttribute("aria-disabled", "true");
    }
  }
  return state.urls[name];
}

function base64Blob(b64, type) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], { type });
}

// ---- the service's limits and presets --------------------------------------------------------------
async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw await problemOf(response);
    state.models = await response.json();
  } catch (err) {
    $("service").textContent = "The service did not answer GET /v1/models.";
    showError(err);
    return;
  }
  const m = state.models;
  // A model store serves several codecs (each stream goes to the one its header names) and priors.
  const models = m.codecs && m.codecs.length
    ? `Codecs ${m.codecs.map((c) => `${c.id} (${c.codec}` + (c.quality != null ? ` q${c.quality})` : ")")).join(", ")}` +
      (m.priors && m.priors.length ? `, priors ${m.priors.map((p) => p.id).join(", ")}` : "")
    : `Codec ${m.codec}` + (m.quality != null ? ` q${m.quality}` : "") + (m.unet_preset ? `, UNet ${m.unet_preset}` : "");
  $("service").textContent = models + `; modes ${m.modes.join(", ")}` + (m.deterministic ? ", deterministic" : "");
  // A tiled service decodes photographs larger than its prior's native size in windows of it.
  const windows = m.tile ? ` Larger than the prior's native size, images decode in overlapping windows ` +
    `of it, up to ${m.max_windows.toLocaleString("en")} windows an image.` : "";
  $("limits").textContent = `Limits: files up to ${formatBytes(m.max_body_bytes)}, images up to ` +
    `${m.max_pixels.toLocaleString("en")} pixels (e.g. ${Math.floor(Math.sqrt(m.max_pixels))}×` +
    `${Math.floor(Math.sqrt(m.max_pixels))}).` + windows;
  const speed = $("speed");
  speed.replaceChildren();
  for (const name of Object.keys(m.speeds || {})) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    speed.append(option);
  }
  if (m.speed && m.speeds && m.speed in m.speeds) speed.value = m.speed;
  fillSteps();
  if (!m.modes.includes("perceptual")) {
    $("controls").hidden = true;
  }
}

function fillSteps() {
  const steps = $("steps");
  steps.replaceChildren();
  const allowed = (state.models && state.models.speeds[$("speed").value]) || [];
  for (const s of allowed) {
    const option = document.createElement("option");
    option.value = s;
    option.textContent = s;
    steps.append(option);
  }
}

// ---- input: an image (encoded by the server) or an .idm file -----------------------------------------
function resetOutputs() {
  for (const id of ["mse", "perceptual", "compare-mse", "compare-perceptual"]) $(id).removeAttribute("src");
  setUrl("mse", null, $("dl-mse"));
  setUrl("perceptual", null, $("dl-perceptual"));
  $("mse-info").textContent = "";
  $("perceptual-info").textContent = "";
  $("recompress-info").textContent = "";
  $("progress").value = 0;
  $("step-count").textContent = "idle";
  state.previews = [];
  state.result = null;
  state.recompress = null;
  delete $("perceptual").dataset.final;
  clearZoom();
}

function showRate() {
  $("stream-info").hidden = false;
  $("idm-bytes").textContent = state.idm ? `${state.idm.length.toLocaleString("en")} bytes` : "";
  if (state.width && state.height) {
    $("image-size").textContent = `${state.width}×${state.height}`;
    if (state.idm) $("bpp").textContent = `${(8 * state.idm.length / (state.width * state.height)).toFixed(4)} bpp`;
  } else {
    $("image-size").textContent = "…";
    $("bpp").textContent = "…";
  }
}

async function chooseFile(file) {
  if (!file || state.busy) return;
  clearError();
  cancelDecode();
  resetOutputs();
  state.idm = null;
  state.width = state.height = 0;
  setUrl("idm", null, $("dl-idm"));
  $("decode").disabled = true;
  $("file-name").textContent = `${file.name} (${formatBytes(file.size)})`;
  $("stream-info").hidden = false;
  const m = state.models;
  try {
    if (!m) throw new ProblemError("The service is not available", "GET /v1/models did not answer; reload the page.");
    if (file.size > m.max_body_bytes) {
      throw new ProblemError("File too large", `${file.name} is ${file.size.toLocaleString("en")} bytes; ` +
        `this server takes at most ${m.max_body_bytes.toLocaleString("en")}.`);
    }
    state.busy = true;
    const isIdm = file.name.toLowerCase().endsWith(".idm");
    const stem = file.name.replace(/\.[^.]*$/, "") || "image";
    $("dl-idm").download = `${stem}.idm`;
    $("dl-mse").download = `${stem}-mse.png`;
    $("dl-perceptual").download = `${stem}-perceptual.png`;
    if (isIdm) {
      state.idm = new Uint8Array(await file.arrayBuffer());
    } else {
      let bitmap;
      try {
        bitmap = await createImageBitmap(file);
      } catch (e) {
        throw new ProblemError("Not an image", `${file.name} could not be read as an image or an .idm file.`);
      }
      state.width = bitmap.width;
      state.height = bitmap.height;
      bitmap.close();
      if (state.width * state.height > m.max_pixels) {
        throw new ProblemError("Image too large", `${state.width}×${state.height} is ` +
          `${(state.width * state.height).toLocaleString("en")} pixels; this server takes at most ` +
          `${m.max_pixels.toLocaleString("en")}.`);
      }
      $("step-count").textContent = "encoding…";
      const response = await post("/v1/encode", file);
      state.idm = new Uint8Array(await response.arrayBuffer());
    }
    setUrl("idm", new Blob([state.idm], { type: "application/octet-stream" }), $("dl-idm"));
    showRate();
    await decodeMse();
    $("decode").disabled = !m.modes.includes("perceptual");
  } catch (err) {
    showError(err);
  } finally {
    state.busy = false;
    if ($("step-count").textContent.endsWith("…")) $("step-count").textContent = "idle";
  }
}

async function decodeMse() {
  $("step-count").textContent = "MSE decode…";
  const t0 = performance.now();
  const response = await post("/v1/decode?mode=mse", state.idm);
  const blob = await response.blob();
  const url = setUrl("mse", blob, $("dl-mse"));
  await loadImage($("mse"), url);
  $("compare-mse").src = url;
  state.width = $("mse").naturalWidth;
  state.height = $("mse").naturalHeight;
  showRate();
  $("mse-info").textContent = `(${((performance.now() - t0) / 1000).toFixed(2)} s)`;
  $("step-count").textContent = "ready";
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ProblemError("Unreadable image", "the server's image could not be shown"));
    img.src = url;
  });
}

// ---- the perceptual decode, streamed as server-sent events over a POST --------------------------------
function decodeQuery() {
  const seed = $("seed").value.trim() || "0";
  if (!/^\d+$/.test(seed)) throw new ProblemError("Invalid seed", "the seed is a non-negative integer");
  const q = new URLSearchParams({ mode: "perceptual", seed, speed: $("speed").value, stream: "1" });
  if ($("steps").value) q.set("steps", $("steps").value);
  return q;
}

async function decodePerceptual() {
  if (!state.idm || state.controller) return;
  clearError();
  let query;
  try {
    query = decodeQuery();
  } catch (err) {
    showError(err);
    return;
  }
  const controller = new AbortController();
  state.controller = controller;
  state.previews = [];
  state.result = null;
  $("decode").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("step-count").textContent = "queued…";
  $("perceptual-info").textContent = "";
  $("recompress-info").textContent = "";
  state.recompress = null;
  delete $("perceptual").dataset.final;
  setUrl("perceptual", null, $("dl-perceptual"));
  try {
    const response = await post(`/v1/decode?${query}`, state.idm, controller.signal);
    await readEvents(response, onEvent);
    if (!state.result) throw new ProblemError("The stream ended early", "no result arrived; try again");
  } catch (err) {
    if (err.name === "AbortError") {
      $("step-count").textContent = "cancelled";
    } else {
      $("step-count").textContent = "failed";
      showError(err);
    }
  } finally {
    controller.abort();  // closes the stream if an error event ended it early (a no-op otherwise)
    if (state.controller === controller) state.controller = null;
    $("cancel").disabled = true;
    $("decode").disabled = !state.idm;
  }
}

// Reads a text/event-stream body: blocks separated by a blank line, `event:` and `data:` lines.
async function readEvents(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    buffer = buffer.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) await handle(name, JSON.parse(data.join("\n")));
    }
    if (done) return;
  }
}

function inWindows(n) {
  return n > 1 ? ` in ${n} windows` : "";
}

async function onEvent(name, data) {
  if (name === "progress") {
    $("progress").max = data.steps;
    $("progress").value = data.step;
    $("step-count").textContent = `step ${data.step} / ${data.steps}` + inWindows(data.windows);
  } else if (name === "preview") {
    const url = `data:image/png;base64,${data.image}`;
    state.previews.push(url);
    $("perceptual").src = url;
    $("compare-perceptual").src = url;
    $("perceptual-info").textContent = `(preview, step ${data.step})`;
  } else if (name === "result") {
    const blob = base64Blob(data.image, data.format === "webp" ? "image/webp" : "image/png");
    const url = setUrl("perceptual", blob, $("dl-perceptual"));
    await loadImage($("perceptual"), url);
    $("compare-perceptual").src = url;
    state.result = { distance: data.distance, steps: data.steps, seconds: data.seconds, replica: data.replica,
                     symbols_equal: data.symbols_equal };
    $("progress").value = $("progress").max;
    $("step-count").textContent = `done: ${data.steps} steps` + inWindows(data.windows);
    $("perceptual-info").textContent = `(${Number(data.seconds).toFixed(2)} s, ${data.steps} steps, ` +
      `constraint distance ${Number(data.distance).toFixed(4)})`;
    $("perceptual").dataset.final = "1";
    drawZoom(0.5, 0.5);
    recompressCheck(blob, Number(data.symbols_equal));
  } else if (name === "error") {
    throw new ProblemError(String(data.title || "Decode failed"), String(data.detail || ""), data.status);
  }
}

// Idempotence, checked: the server reports the share of latent symbols the perceptual PNG
// re-encodes to; compressing the PNG again here gives the same .idm bytes when all of them match.
async function recompressCheck(blob, symbolsEqual) {
  const info = $("recompress-info");
  const share = `${(100 * symbolsEqual).toFixed(1)} % of latent symbols reproduced`;
  state.recompress = null;
  info.textContent = "re-compression: checking…";
  try {
    const response = await post("/v1/encode", blob);
    const again = new Uint8Array(await response.arrayBuffer());
    const n = Math.max(again.length, state.idm.length);
    let differing = 0;
    for (let k = 0; k < n; k++) if (again[k] !== state.idm[k]) differing++;
    state.recompress = { same: differing === 0, differing, bytes: again.length, symbols_equal: symbolsEqual };
    info.textContent = differing === 0
      ? "re-compression: the same bitstream (every latent symbol reproduced)"
      : `re-compression: ${share}; the bitstream differs from the received one`;
  } catch (err) {
    state.recompress = { error: String(err.message || err) };
    info.textContent = `re-compression check failed: ${err.message || err}`;
  }
}

function cancelDecode() {
  if (state.controller) state.controller.abort();  // the service cancels the decode when we disconnect
}

// ---- before/after slider and zoom -----------------------------------------------------------------------
function setSlider() {
  const at = `${$("slider").value}%`;
  $("compare-top").style.clipPath = `inset(0 0 0 ${at})`;  // CSSOM, not a style attribute: allowed by the CSP
  $("compare-line").style.left = at;
}

function clearZoom() {
  for (const id of ["zoom-mse", "zoom-perceptual"]) {
    const c = $(id);
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }
}

// Draws the region around (fx, fy) (fractions of the image) of both decodes, magnified.
function drawZoom(fx, fy) {
  const zoom = Number($("zoom").value);
  for (const [canvasId, imgId] of [["zoom-mse", "mse"], ["zoom-perceptual", "perceptual"]]) {
    const canvas = $(canvasId);
    const img = $(imgId);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!img.getAttribute("src") || !img.naturalWidth) continue;
    // the region: 1/zoom of the image's longer side (in the shown image's own pixels: a preview
    // is smaller than the final image), enlarged to the canvas
    const w = img.naturalWidth, h = img.naturalHeight;
    const side = Math.max(1, Math.round(Math.max(w, h) / zoom));
    const sw = Math.min(side, w), sh = Math.min(side, h);
    const sx = Math.min(Math.max(0, Math.round(fx * w - sw / 2)), w - sw);
    const sy = Math.min(Math.max(0, Math.round(fy * h - sh / 2)), h - sh);
    ctx.drawImage(img, sx, sy, sw, sh, 0, 0, canvas.width * sw / side, canvas.height * sh / side);
  }
}

function zoomAt(event) {
  const box = $("compare").getBoundingClientRect();
  const img = $("mse");
  if (!img.naturalWidth) return;
  // the image is letterboxed inside the square box (object-fit: contain)
  const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
  const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
  const x = (event.clientX - box.left - (box.width - w) / 2) / w;
  const y = (event.clientY - box.top - (box.height - h) / 2) / h;
  drawZoom(Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y)));
}

// ---- wiring -----------------------------------------------------------------------------------------------
function init() {
  $("file").addEventListener("change", () => chooseFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
  });
  $("speed").addEventListener("change", fillSteps);
  $("decode").addEventListener("click", decodePerceptual);
  $("cancel").addEventListener("click", cancelDecode);
  $("slider").addEventListener("input", setSlider);
  $("compare").addEventListener("pointermove", zoomAt);
  $("zoom").addEventListener("change", () => drawZoom(0.5, 0.5));
  setSlider();
  loadModels();
}

init();
