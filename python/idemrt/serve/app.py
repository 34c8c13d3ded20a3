"""The Ray Serve application: a FastAPI ingress and decoder replicas running the step loop.

    HTTP ──▶ Ingress (FastAPI; parses the query and the .idm once, rejects early)
                │ DeploymentHandle (Ray Serve routes the parsed Bitstream to a replica)
                ▼
             DecoderReplica × N (one DecodeEngine each: its core thread owns the device)
                │ metrics snapshots, every second and after each decode
                ▼
             MetricsHub (one named actor per application; ``/metrics`` renders the sum)

A replica's asyncio side does no torch work: it hands the parsed bitstream to the engine core,
awaits the result (an 8-bit array) and encodes PNG/WebP in a worker thread.

Ray Serve gives replicas, placement (``num_gpus`` per replica), restarts of dead replicas,
clusters (``--address``) and the HTTP proxy; idemrt adds the step-level batching inside a
replica. The HTTP API is documented in docs/serving.md.
"""

import asyncio
import base64
import io
import json
import threading
import time

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from .. import bitstream as bsfmt
from ..decode_request import MODES, PRIORITIES
from .config import ServeConfig
from .deployment import DECODER, HEAD_NODE, INGRESS, deployment_options
from .metrics import Metrics, merge
from .params import DECODE_PARAMS, FORMATS, parse_decode_params  # noqa: F401 - DECODE_PARAMS re-exported
from .problems import PROBLEM_JSON, Problem, install_problem_handlers, problem_from
from .retry import call_with_retry
from .web import static_response

RETRIES = 3  # calls of one decode in all when its replica dies (each on a live replica, within the deadline)
METRICS_PUSH_S = 1.0  # how often a replica sends its metrics snapshot to the hub
METRICS_LIVE_S = 10.0  # a replica whose last snapshot is older no longer counts in the gauges

api = FastAPI(title="idemrt decode service")
install_problem_handlers(api)  # 404, 405, validation and unexpected errors answer problem+json too


def encode_image(pixels, fmt: str) -> bytes:
    """(H, W, 3) uint8 -> PNG or WEBP (lossless) bytes (Pillow only: no torch off the core)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest metrics snapshot of every replica of one application (see :mod:`.metrics`)."""

    def __init__(self):
        self.snapshots = {}  # replica id -> (time.monotonic(), snapshot)

    def push(self, replica: str, snapshot: dict) -> None:
        self.snapshots[replica] = (time.monotonic(), snapshot)

    def collect(self, live_s: float = METRICS_LIVE_S) -> dict:
        now = time.monotonic()
        return merge([s for _, s in self.snapshots.values()],
                     [s for t, s in self.snapshots.values() if now - t <= live_s])


def metrics_hub():
    """This application's hub (created by whoever asks first; it outlives replica restarts). On
    the head node, like the ingress, so losing a worker node never loses the counters."""
    app = serve.get_replica_context().app_name
    return MetricsHub.options(name=f"idemrt-metrics-{app}", namespace="idemrt", get_if_exists=True,
                              lifetime="detached", resources={HEAD_NODE: 0.001}).remote()


@serve.deployment(name=DECODER)
class DecoderReplica:
    """One replica: a :class:`~idemrt.serve.core.DecodeEngine` on this replica's device."""

    def __init__(self, config: dict):
        from .core import DecodeEngine  # torch: imported by the replicas only, never by the ingress

        self.engine = DecodeEngine(ServeConfig(**config))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.hub = metrics_hub()
        threading.Thread(target=self._push_metrics, name="idemrt-metrics", daemon=True).start()

    def _push_metrics(self) -> None:
        while self.engine.alive:
            self.hub.push.remote(self.replica, self.engine.metrics.snapshot())
            time.sleep(METRICS_PUSH_S)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config`` (max_slots, queue, pixel_budget): applied without a restart."""
        self.engine.reconfigure(**user_config)  # applied by the core between two steps

    def info(self) -> dict:
        return {"replica": self.replica, "weights_hash": self.engine.weights_hash.hex(), **self.engine.stats()}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the step loop thread died")

    def _submit(self, bs, params: dict, on_event=None):
        return self.engine.submit(bs, mode=params["mode"], seed=params["seed"], speed=params["speed"],
                                  steps=params["steps"], priority=params["priority"], timeout=params["timeout"],
                                  on_event=on_event, prior=params.get("prior"))

    async def decode(self, bs: bsfmt.Bitstream, params: dict) -> dict:
        """``bs``: the bitstream the ingress parsed; ``params``: :func:`parse_decode_params`'s."""
        result = await _await(self._submit(bs, params))
        self.hub.push.remote(self.replica, self.engine.metrics.snapshot())
        image = await asyncio.to_thread(encode_image, result.pixels, params["format"])
        return {"image": image, "distance": result.distance, "steps": result.evaluations,
                "seconds": result.seconds, "replica": self.replica, "symbols_equal": result.symbols_equal,
                "windows": result.windows}

    async def decode_stream(self, bs: bsfmt.Bitstream, params: dict):
        """Server-sent-event payloads: progress, previews, then the result (or an error)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        fmt = params["format"]
        try:
            future = self._submit(bs, params, on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield _error_event(exc)
            return
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            while (event := await events.get()) is not None:
                if event["event"] == "preview":
                    png = await asyncio.to_thread(encode_image, event["image"], "png")
                    event = {**event, "image": base64.b64encode(png).decode()}
                yield event
            result = future.result()
            image = await asyncio.to_thread(encode_image, result.pixels, fmt)
            yield {"event": "result", "format": fmt, "image": base64.b64encode(image).decode(),
                   "distance": result.distance, "steps": result.evaluations, "seconds": result.seconds,
                   "replica": self.replica, "symbols_equal": result.symbols_equal, "windows": result.windows}
        except asyncio.CancelledError:
            future.cancel()  # the client went away: the core frees the slot
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield _error_event(exc)

    async def encode(self, image: bytes, codec=None) -> bytes:
        return await _await(self.engine.encode(image, codec))

    def models(self) -> dict:
        """A model store's codecs, priors and unavailable models (:meth:`DecodeEngine.models`)."""
        return self.engine.models()


async def _await(future):
    """Await a concurrent Future; if the request is cancelled (client gone), cancel its decode."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


def _error_event(exc) -> dict:
    problem = problem_from(exc)
    return {"event": "error", **json.loads(problem.body())}


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class Ingress:
    def __init__(self, decoder, config: dict):
        self.decoder = decoder
        self.config = ServeConfig(**config)
        self.metrics = Metrics()
        self.hub = metrics_hub()

    # -- decode and encode ---------------------------------------------------------------------------
    @api.post("/v1/decode")
    async def decode(self, request: Request):
        t0, mode = time.monotonic(), request.query_params.get("mode", "perceptual")
        try:
            params = self._decode_params(request)
            bs = self._check_header(await self._body(request))  # the one parse of the bytes
            if params["stream"]:
                return self._stream(bs, params, t0)
            out = await call_with_retry(  # a replica lost mid-decode: again on a live one (else 503)
                lambda: self.decoder.decode.remote(bs, params),
                tries=RETRIES, deadline=t0 + (params["timeout"] or self.config.timeout_s))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a problem+json answer
            return self._problem(exc, mode, t0)
        self.metrics.observe_request(params["mode"], 200, time.monotonic() - t0)
        return Response(out["image"], media_type=FORMATS[params["format"]], headers={
            "X-Idemrt-Decode-Seconds": f"{out['seconds']:.4f}", "X-Idemrt-Steps": str(out["steps"]),
            "X-Idemrt-Distance": f"{out['distance']:.6g}", "X-Idemrt-Replica": out["replica"],
            "X-Idemrt-Symbols-Equal": f"{out['symbols_equal']:.6f}", "X-Idemrt-Windows": str(out["windows"])})

    @api.post("/v1/encode")
    async def encode(self, request: Request):
        t0 = time.monotonic()
        try:
            allowed = {"codec"} if self.config.models else set()  # a model store: the codec by its id
            unknown = sorted(k for k in request.query_params if k not in allowed)
            if unknown or len(request.query_params.multi_items()) > len(request.query_params):
                raise Problem(422, "invalid-parameter", f"unknown or repeated parameters {unknown or ['codec']}")
            codec = request.query_params.get("codec")
            out = await self.decoder.encode.remote(await self._body(request), codec)
        except Exception as exc:  # noqa: BLE001
            return self._problem(exc, "encode", t0)
        self.metrics.observe_request("encode", 200, time.monotonic() - t0)
        return Response(out, media_type="application/octet-stream")

    def _stream(self, bs, params, t0):
        gen = self.decoder.options(stream=True).decode_stream.remote(bs, params)

        async def events():
            status = 200
            try:
                async for event in gen:
                    if event["event"] == "error":
                        status = event["status"]
                        self.metrics.observe_error(event["type"].rsplit("/", 1)[-1])
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
            except Exception as exc:  # noqa: BLE001 - e.g. the replica died mid-stream
                event = _error_event(exc)
                status = event["status"]
                yield f"event: error\ndata: {json.dumps(event)}\n\n"
            self.metrics.observe_request(params["mode"], status, time.monotonic() - t0)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- checks ------------------------------------------------------------------------------------------
    def _decode_params(self, request: Request) -> dict:
        return parse_decode_params(request.query_params, self.config)  # 422 for anything not allowed here

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Problem(413, "too-large", f"the body is {declared} bytes; this server takes at most {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Problem(413, "too-large", f"the body is over {limit} bytes")
        return bytes(body)

    def _check_header(self, data: bytes) -> bsfmt.Bitstream:
        """The parsed stream; rejects early what no replica could decode: a malformed, foreign or
        oversized stream (BitstreamError: 400). The weights are the replica's to check, and with a
        model store the codec too (422 if it lacks it): both by :func:`idemrt.bitstream.route`."""
        bs = bsfmt.unpack(data, max_pixels=self.config.max_pixels)
        if not self.config.models:
            bsfmt.route(bs, {None: bsfmt.CodecIdentity(self.config.codec, self.config.quality)}, where="this server")
        return bs

    def _problem(self, exc, mode: str, t0: float) -> Response:
        problem = problem_from(exc)
        mode = mode if mode in (*MODES, "encode") else "invalid"  # never a client's text as a metrics label
        self.metrics.observe_error(problem.kind)
        self.metrics.observe_request(mode, problem.status, time.monotonic() - t0)
        return Response(problem.body(), status_code=problem.status, media_type=PROBLEM_JSON,
                        headers=problem.headers())

    # -- service info ----------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self):
        c = self.config
        store = {}
        if c.models:  # every codec and prior of the model store, by id (what the replicas loaded)
            try:
                store = await asyncio.wait_for(self.decoder.models.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001
                return self._problem(exc, "invalid", time.monotonic())
            store = {**store, "codec": None, "quality": None}
        perceptual = bool(store["priors"]) if c.models else bool(c.unet)
        default = c.speeds[c.speed]  # the default speed's DecodeConfig, as data
        return {"codec": c.codec, "quality": c.quality, "unet_preset": (c.preset if not c.unet_overrides else "custom") if c.unet else None,
                "modes": list(MODES) if perceptual else ["mse"], "steps_allowed": c.steps_allowed,
                "speeds": {speed: c.steps_for(speed) for speed in c.speeds_allowed} if perceptual else {},
                "priorities": [min(PRIORITIES), max(PRIORITIES)], "deterministic": c.deterministic,
                "formats": list(FORMATS), "speed": c.speed, "sampler": default["sampler"], "guidance": default["guidance"],
                "max_body_bytes": c.max_body_bytes, "max_pixels": c.max_pixels, "timeout_s": c.timeout_s,
                "tile": default["tile"], "max_windows": c.max_windows, **store}

    # -- the web page (docs/serving.md, "Web page"): shipped files only, by a fixed allow-list ------------
    @api.get("/")
    async def page(self):
        return static_response("index.html")

    @api.get("/static/{name}")
    async def static(self, name: str):
        return static_response(name)  # a 404 problem for any name not shipped

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        try:
            info = await asyncio.wait_for(self.decoder.info.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason
            return Response(Problem(503, "unavailable", f"no decoder replica answers ({type(exc).__name__})",
                                    2).body(), status_code=503, media_type=PROBLEM_JSON)
        return {"status": "ready", "replica": info["replica"]}

    @api.get("/metrics")
    async def metrics_text(self):
        try:
            engine = await asyncio.wait_for(self.hub.collect.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - report what the ingress knows
            engine = None
        return Response(self.metrics.render(engine), media_type="text/plain; version=0.0.4")


def build_app(config: ServeConfig):
    """The Serve application of ``config`` (what ``serve.run`` and ``serve deploy`` take)."""
    options = deployment_options(config)  # replicas or autoscaling, resources, user_config
    decoder = DecoderReplica.options(**options[DECODER]).bind(config.to_dict())
    return Ingress.options(**options[INGRESS]).bind(decoder, config.to_dict())


def app_builder(args: dict):
    """``serve deploy`` / ``serve run idemrt.serve.app:app_builder``: the application of the
    config's ``args`` (a :class:`ServeConfig` as a dict)."""
    return build_app(ServeConfig(**args))
