"""The service's web page (GET /) driven in a real browser (Chromium through Playwright).

One local Ray instance and one Chromium for the module: the bundled demo models with short
decodes ("20" steps by default, "8" for the large photograph, "1000" for the cancel check), previews every 2 steps.
Skipped when Playwright or a Chromium binary is missing (.ci/run installs both).
"""
import io
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = os.environ.get("IDEMRT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None, reason="needs Playwright for Python (pip install playwright)"),
    pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (apt-get install chromium)"),
]

from idemrt.serve import ServeConfig  # noqa: E402
from idemrt.serve.app import build_app  # noqa: E402
from idemrt.serve.web import CSP  # noqa: E402
from local_ray import local_serve  # noqa: E402

if sync_playwright is not None:
    expect.set_options(timeout=120_000)  # decodes on 2 shared CPU cores

MAX_BODY = 200_000
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    config = ServeConfig.demo(steps_allowed=["20", "1000", "8"], preview_every=2, cpus_per_replica=0,
                              max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS)
    with local_serve(tmp) as url:
        serve.run(build_app(config), name="web", route_prefix="/")
        yield url


@pytest.fixture(scope="module")
def page(service):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 900})
        page = context.new_page()
        page.set_default_timeout(120_000)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(service + "/")
        expect(page.locator("#limits")).to_contain_text("Limits")
        page.errors = errors
        yield page
        browser.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A held-out demo photograph (64x64, what the demo UNet was trained on) as a PNG file."""
    from idemrt.demo_assets import demo_image

    pixels = (demo_image("chelsea")[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(pixels).save(path)
    return path


def _post(url: str, data: bytes):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _running(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    m = re.search(r'^idemrt_images\{status="running"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _download(page, link: str) -> bytes:
    with page.expect_download() as info:
        page.click(link)
    return open(info.value.path(), "rb").read()


def _shown_pixels(page, selector: str) -> np.ndarray:
    """The pixels an <img> shows, read back through a canvas."""
    flat, w, h = page.eval_on_selector(selector, """img => {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        return [Array.from(ctx.getImageData(0, 0, c.width, c.height).data), c.width, c.height];
    }""")
    return np.array(flat, dtype=np.uint8).reshape(h, w, 4)[..., :3]


def test_page_and_assets_have_a_strict_policy(service):
    for path, kind in [("/", "text/html"), ("/static/index.html", "text/html"), ("/static/app.js", "javascript"),
                       ("/static/style.css", "text/css")]:
        with urllib.request.urlopen(service + path, timeout=30) as r:
            assert kind in r.headers["Content-Type"]
            assert r.headers["Content-Security-Policy"] == CSP
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.read()
    for path in ["/static/web.py", "/static/..%2Fweb.py", "/static/%2e%2e%2fapp.py", "/static/", "/static/INDEX.HTML"]:
        try:
            urllib.request.urlopen(service + path, timeout=30)
            raise AssertionError(f"{path} answered")
        except urllib.error.HTTPError as e:
            assert e.code == 404, path
            assert e.headers["Content-Type"].startswith("application/problem+json")


def test_image_to_perceptual_decode_in_the_browser(service, page, photo, tmp_path):
    page.set_input_files("#file", str(photo))
    expect(page.locator("#dl-mse")).to_have_attribute("href", re.compile("^blob:"))
    idm = _download(page, "#dl-idm")
    status, want_idm = _post(service + "/v1/encode", photo.read_bytes())
    assert status == 200 and idm == want_idm
    expect(page.locator("#bpp")).to_have_text(f"{8 * len(idm) / (64 * 64):.4f} bpp")
    expect(page.locator("#image-size")).to_have_text("64×64")
    mse = _download(page, "#dl-mse")
    assert np.array_equal(_png(mse), _png(_post(service + "/v1/decode?mode=mse", idm)[1]))

    page.select_option("#speed", "fast")
    steps = page.eval_on_selector_all("#steps option", "options => options.map(o => o.value)")
    assert steps == ["50"]  # GET /v1/models' speeds["fast"]
    page.fill("#seed", "3")
    page.click("#decode")
    expect(page.locator("#perceptual")).to_have_attribute("data-final", "1")
    previews = page.evaluate("window.idemrtPage.previews")
    assert len(set(previews)) >= 2, "the previews did not change while decoding"
    result = page.evaluate("window.idemrtPage.result")
    expect(page.locator("#perceptual-info")).to_contain_text("constraint distance")
    expect(page.locator("#step-count")).to_have_text(f"done: {result['steps']} steps")

    status, want = _post(service + "/v1/decode?mode=perceptual&seed=3&speed=fast&steps=50", idm)
    assert status == 200
    got = _download(page, "#dl-perceptual")
    assert np.array_equal(_png(got), _png(want))
    assert np.array_equal(_shown_pixels(page, "#perceptual"), _png(want))
    assert np.array_equal(_shown_pixels(page, "#compare-perceptual"), _png(want))

    # the re-compression check: the page's verdict equals compressing the perceptual PNG here
    expect(page.locator("#recompress-info")).not_to_contain_text("checking", timeout=30000)
    check = page.evaluate("window.idemrtPage.recompress")
    status, again = _post(service + "/v1/encode", got)
    assert status == 200 and check["same"] == (again == idm) and check["bytes"] == len(again)
    assert 0 < check["symbols_equal"] <= 1 and (check["symbols_equal"] == 1) >= check["same"]
    n = max(len(again), len(idm))
    assert check["differing"] == sum(1 for k in range(n) if k >= min(len(again), len(idm)) or again[k] != idm[k])
    expect(page.locator("#recompress-info")).to_contain_text("re-compression: ")

    page.hover("#compare", position={"x": 100, "y": 120})  # the zoom follows the pointer
    page.fill("#slider", "30")
    shot = os.environ.get("IDEMRT_WEB_SCREENSHOT") or str(tmp_path / "web_page.png")
    page.screenshot(path=shot, full_page=True)
    assert Image.open(shot).size[0] >= 900
    assert page.is_hidden("#error")
    assert not page.errors  # no script errors, no CSP violations


def test_a_photograph_larger_than_the_prior_decodes_in_windows_with_previews(service, page, tmp_path):
    """A 128x96 photograph (twice the 64-pixel demo prior's native size): the page encodes it,
    decodes it in 9 windows (128x128 padded, stride 48) streaming previews, and shows what POST
    /v1/decode returns for the same request."""
    from idemrt.demo_assets import demo_image

    pixels = (demo_image("coffee")[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    path = tmp_path / "large.png"
    Image.fromarray(pixels).resize((128, 96), Image.BICUBIC).save(path)
    expect(page.locator("#limits")).to_contain_text("windows")
    page.set_input_files("#file", str(path))
    expect(page.locator("#image-size")).to_have_text("128×96")
    expect(page.locator("#dl-mse")).to_have_attribute("href", re.compile("^blob:"))
    idm = _download(page, "#dl-idm")
    page.select_option("#speed", "paper")
    page.select_option("#steps", "8")
    page.fill("#seed", "5")
    page.click("#decode")
    expect(page.locator("#step-count")).to_contain_text("in 9 windows")
    expect(page.locator("#perceptual")).to_have_attribute("data-final", "1", timeout=300_000)
    previews = page.evaluate("window.idemrtPage.previews")
    assert len(set(previews)) >= 2, "the previews did not change while decoding"
    expect(page.locator("#step-count")).to_have_text("done: 8 steps in 9 windows")
    with urllib.request.urlopen(urllib.request.Request(
            service + "/v1/decode?mode=perceptual&seed=5&speed=paper&steps=8", data=idm, method="POST"),
            timeout=300) as r:
        assert r.headers["X-Idemrt-Windows"] == "9"
        want = _png(r.read())
    assert want.shape == (96, 128, 3)
    assert np.array_equal(_png(_download(page, "#dl-perceptual")), want)
    assert page.is_hidden("#error") and not page.errors


def test_dropped_idm_is_decoded(service, page, photo):
    """Drag and drop of an .idm file: no encode, W and H from the MSE decode."""
    status, idm = _post(service + "/v1/encode", photo.read_bytes())
    assert status == 200
    page.evaluate("""bytes => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "dropped.idm", {type: "application/octet-stream"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true,
                                                                             cancelable: true}));
    }""", list(idm))
    expect(page.locator("#image-size")).to_have_text("64×64")
    expect(page.locator("#bpp")).to_have_text(f"{8 * len(idm) / (64 * 64):.4f} bpp")
    expect(page.locator("#file-name")).to_contain_text("dropped.idm")
    assert _download(page, "#dl-idm") == idm
    assert page.is_enabled("#decode") and page.is_hidden("#error")


def test_corrupt_idm_shows_the_problem(service, page):
    bad = b"IDM" + bytes(range(40))
    status, body = _post(service + "/v1/decode?mode=mse", bad)
    assert status == 400
    import json
    problem = json.loads(body)
    page.set_input_files("#file", {"name": "broken.idm", "mimeType": "application/octet-stream", "buffer": bad})
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-title")).to_have_text(problem["title"])
    expect(page.locator("#error-detail")).to_have_text(problem["detail"])
    assert page.is_disabled("#decode")


def test_files_over_the_limits_are_refused_before_upload(service, page, tmp_path):
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    page.set_input_files("#file", {"name": "big.idm", "mimeType": "application/octet-stream",
                                   "buffer": b"\0" * (MAX_BODY + 1)})
    expect(page.locator("#error-title")).to_have_text("File too large")
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300), (120, 80, 40)).save(big)
    page.set_input_files("#file", str(big))
    expect(page.locator("#error-title")).to_have_text("Image too large")
    assert sent == []


def test_cancel_frees_the_decode(service, page, photo):
    page.set_input_files("#file", str(photo))
    expect(page.locator("#dl-mse")).to_have_attribute("href", re.compile("^blob:"))
    page.select_option("#speed", "paper")
    page.select_option("#steps", "1000")
    page.click("#decode")
    expect(page.locator("#step-count")).to_have_text(re.compile(r"^step \d+ / 1000$"))
    deadline = time.monotonic() + 30
    while _running(service) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(service) == 1
    page.click("#cancel")
    expect(page.locator("#step-count")).to_have_text("cancelled")
    deadline = time.monotonic() + 30
    while _running(service) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(service) == 0
    assert page.is_hidden("#error") and page.is_enabled("#decode")


def test_a_model_store_service_lists_its_codecs_and_priors(service, page):
    """A store-mode service answers /v1/models with codec null and its codecs and priors (what
    DecodeEngine.models gives): the page names those, not "Codec null". The answer is the real
    service's with the store's fields added, served to a second tab through Playwright's routing."""
    with urllib.request.urlopen(service + "/v1/models", timeout=30) as r:
        models = json.load(r)
    models.update(codec=None, quality=None, unavailable=[],
                  codecs=[{"id": "hyper-q1", "codec": "bmshj2018-hyperprior", "quality": 1, "weights_digest": "ab"},
                          {"id": "elic", "codec": "elic", "quality": None, "weights_digest": "cd"}],
                  priors=[{"id": "ffhq", "image_size": 256, "default": True}])
    tab = page.context.new_page()
    try:
        tab.route("**/v1/models", lambda route: route.fulfill(status=200, content_type="application/json",
                                                            body=json.dumps(models)))
        tab.goto(service + "/")
        expect(tab.locator("#service")).to_have_text(
            "Codecs hyper-q1 (bmshj2018-hyperprior q1), elic (elic), priors ffhq; modes perceptual, mse")
    finally:
        tab.close()
