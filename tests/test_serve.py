"""The decode service on a real local Ray instance (one per module), over HTTP on 127.0.0.1.

Two applications share the instance: "main" (two decoder replicas, short decodes) and "tight"
(one replica, a one-image queue, a short deadline, long decodes) for the overload paths.
"""
import io
import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import idemrt
from tiny_models import TINY_UNET, tiny_codec, tiny_codec_state, tiny_unet, tiny_unet_state

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from idemrt.serve import Client, ServeConfig, ServiceError  # noqa: E402
from idemrt.serve.app import build_app  # noqa: E402
from local_ray import local_serve  # noqa: E402


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    torch.save(tiny_unet_state(), tmp / "unet.pt")
    torch.save(tiny_codec_state(), tmp / "codec.pth")
    # whole images (tile=False): these tests compare with the Decoder's default and count pixels per
    # step; the 32-pixel tiny prior would put the 64x64 test images in windows (tested through HTTP in
    # test_web_page.py, in the engine in test_tiled_service.py)
    common = dict(unet=str(tmp / "unet.pt"), unet_overrides=TINY_UNET, codec="bmshj2018-hyperprior", quality=1,
                  codec_checkpoint=str(tmp / "codec.pth"), cpus_per_replica=0, tile=False)
    main = ServeConfig(steps_allowed=["3", "5"], replicas=2, max_body_bytes=20000, max_pixels=128 * 128, **common)
    tight = ServeConfig(steps_allowed=["400"], replicas=1, queue=1, timeout_s=2.0, **common)
    with local_serve(tmp) as url:
        serve.run(build_app(main), name="main", route_prefix="/")
        serve.run(build_app(tight), name="tight", route_prefix="/tight")
        yield url, main


@pytest.fixture(scope="module")
def local():
    unet, codec = tiny_unet(), tiny_codec()
    torch.manual_seed(5)
    data = idemrt.Encoder(codec).encode(torch.rand(1, 3, 40, 48))
    return unet, codec, data


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_http_decode_equals_decoder_decode(service, local):
    url, _ = service
    unet, codec, data = local
    client = Client(url)
    result = client.decode(data, seed=11, steps="3")
    want = np.asarray(idemrt.Decoder(codec, unet, steps=3, device="cpu").decode(data, seed=11)).astype(int)
    got = _png(result.image)
    assert got.shape == want.shape == (40, 48, 3)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01  # 8-bit rounding of equal floats
    assert result.steps == 3 and result.distance > 0 and result.seconds > 0
    mse = _png(client.decode(data, mode="mse").image)
    assert np.abs(mse - np.asarray(idemrt.Decoder(codec, None, device="cpu").decode(data, mode="mse"))).max() == 0
    assert Image.open(io.BytesIO(client.decode(data, mode="mse", format="webp").image)).format == "WEBP"


def test_stream_reports_progress_previews_then_the_image(service, local):
    events = list(Client(service[0]).decode_stream(local[2], seed=11, steps="5"))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "result" and kinds.count("progress") == 5 and "preview" in kinds
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4, 5]
    assert Image.open(io.BytesIO(next(e for e in events if e["event"] == "preview")["image"])).size[0] <= 64
    assert _png(events[-1]["image"]).shape == (40, 48, 3)


def test_two_replicas_both_serve(service, local):
    client = Client(service[0])
    with_threads = []
    replicas = set()

    def one(seed):
        replicas.add(client.decode(local[2], mode="mse", seed=seed).replica)

    for _ in range(3):
        with_threads = [threading.Thread(target=one, args=(s,)) for s in range(8)]
        [t.start() for t in with_threads]
        [t.join(60) for t in with_threads]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2


@pytest.mark.parametrize("query, body, status, kind", [
    ("", b"not an idm file", 400, "bitstream"),
    ("?steps=1000", None, 422, "invalid-parameter"),
    ("?mode=fancy", None, 422, "invalid-parameter"),
    ("?path=/etc/passwd", None, 422, "invalid-parameter"),
    ("?seed=x", None, 422, "invalid-parameter"),
    ("", b"\0" * 30000, 413, "too-large"),
])
def test_bad_requests_get_problem_json(service, local, query, body, status, kind):
    req = urllib.request.Request(f"{service[0]}/v1/decode{query}", data=local[2] if body is None else body,
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == status
    assert err.value.headers.get_content_type() == "application/problem+json"
    problem = json.loads(err.value.read())
    assert problem["status"] == status and problem["type"].endswith(kind) and problem["detail"]


def test_hostile_requests_get_problem_json_without_internals(service, local):
    """Out-of-range seeds, repeats, other methods, unknown paths: a 4xx problem+json answer each,
    never an exception's text or a traceback."""
    url = service[0]
    cases = [("POST", f"/v1/decode?seed={2**64}", 422), ("POST", f"/v1/decode?seed={2**70}", 422),
             ("POST", f"/v1/decode?seed={'9' * 5000}", 422), ("POST", "/v1/decode?seed=-1", 422),
             ("POST", "/v1/decode?mode=mse&mode=perceptual", 422), ("POST", "/v1/decode?priority=10", 422),
             ("POST", "/v1/decode?timeout=nan", 422), ("POST", "/v1/decode?mode=x%22%7D%0Aidemrt_evil%201", 422),
             ("GET", "/v1/decode", 405), ("PUT", "/v1/decode", 405),
             ("OPTIONS", "/v1/decode", 405), ("DELETE", "/v1/encode", 405), ("GET", "/no/such/path", 404)]
    for method, path, status in cases:
        req = urllib.request.Request(url + path, data=local[2] if method in ("POST", "PUT") else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        body = err.value.read()
        assert err.value.code == status, (method, path, body)
        assert err.value.headers.get_content_type() == "application/problem+json", (method, path)
        assert b"Error:" not in body and b"Traceback" not in body, (method, path, body)
        problem = json.loads(body)
        assert problem["status"] == status and problem["title"] and problem["detail"]
        if status == 405:
            assert err.value.headers["Allow"] == "POST"
    assert "evil" not in Client(url).get("/metrics")  # a client's text is never a metrics label


def test_foreign_and_oversized_bitstreams(service):
    client = Client(service[0])
    other = idemrt.Encoder(tiny_codec(seed=1)).encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ServiceError) as foreign:
        client.decode(other, mode="mse")
    assert foreign.value.status == 400 and "weights" in foreign.value.problem["detail"]
    big = idemrt.Encoder(tiny_codec()).encode(torch.rand(1, 3, 192, 128))  # over max_pixels 128x128
    with pytest.raises(ServiceError) as large:
        client.decode(big, mode="mse")
    assert large.value.status == 413


def test_encode_round_trips(service, local):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    data = Client(service[0]).encode(buf.getvalue())
    assert data == idemrt.Encoder(local[1]).encode(buf.getvalue())
    with pytest.raises(ServiceError) as bad:
        Client(service[0]).encode(b"no image")
    assert bad.value.status == 400


def test_models_health_ready_and_metrics(service):
    client = Client(service[0])
    models = client.get("/v1/models")
    assert models["steps_allowed"] == ["3", "5"] and models["modes"] == ["perceptual", "mse"]
    assert "unet" not in models and "codec_checkpoint" not in models  # no file paths leak
    assert client.get("/healthz")["status"] == "ok" and client.get("/readyz")["status"] == "ready"
    text = client.get("/metrics")
    for name in ("idemrt_requests_total", "idemrt_decode_seconds_bucket", "idemrt_errors_total", "idemrt_queue_depth",
                 "idemrt_steps_total", "idemrt_step_seconds_bucket", "idemrt_step_pixels_total", "idemrt_images{",
                 "idemrt_preemptions_total", "idemrt_deadline_misses_total", "idemrt_pixel_budget"):
        assert name in text
    assert models["speeds"]["paper"] == ["3", "5"] and models["priorities"] == [0, 9]


def _metrics(client) -> dict:
    """The /metrics samples by name (labels included)."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").splitlines() if line and not line.startswith("#")}


def test_metrics_move_by_what_was_served(service, local):
    """Four perceptual decodes (three 5-step at once, one 3-step) on two replicas: the summed
    counters move by exactly the images' steps and pixels, and the per-speed latency counts them."""
    client = Client(service[0])
    before = _metrics(client)
    threads = [threading.Thread(target=client.decode, args=(local[2],), kwargs={"seed": s, "steps": "5"})
               for s in range(3)]
    [t.start() for t in threads]
    client.decode(local[2], seed=9, steps="3")
    [t.join(120) for t in threads]
    key = 'idemrt_replica_decode_seconds_count{speed="paper"}'
    deadline = time.monotonic() + 15
    while (after := _metrics(client)).get(key, 0) - before.get(key, 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)  # replicas push their snapshots every second
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert moved[key] == 4
    assert moved["idemrt_step_images_total"] == 3 * 5 + 3  # every image's every step, batched or not
    assert moved["idemrt_step_pixels_total"] == (3 * 5 + 3) * 64 * 64  # 40x48 images, padded to 64x64
    assert 5 <= moved["idemrt_steps_total"] <= 3 * 5 + 3 and moved["idemrt_step_seconds_count"] == moved[
        "idemrt_steps_total"]
    assert moved['idemrt_requests_total{mode="perceptual",code="200"}'] == 4
    assert after["idemrt_replicas_reporting"] == 2 and after["idemrt_pixel_budget"] > 0


def test_overload_and_deadline(service, local):
    """tight: one image at a time, 400 steps (longer than its 2 s deadline): 504 for the first,
    503 with Retry-After for one that arrives while it runs."""
    client = Client(service[0] + "/tight")
    errors = []

    def first():
        try:
            client.decode(local[2], seed=1)
        except ServiceError as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    time.sleep(1.0)
    with pytest.raises(ServiceError) as busy:
        client.decode(local[2], seed=2)
    t.join(60)
    assert busy.value.status == 503 and busy.value.retry_after
    assert errors and errors[0].status == 504
    deadline = time.monotonic() + 15
    while _metrics(client)["idemrt_deadline_misses_total"] < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metrics(client)["idemrt_deadline_misses_total"] >= 1


def test_disconnect_cancels_the_decode(service, local):
    client = Client(service[0] + "/tight")
    for _ in range(20):  # the previous test's decode must have left
        if client.get("/v1/models") and _running(client) == 0:
            break
        time.sleep(0.5)
    req = urllib.request.Request(f"{service[0]}/tight/v1/decode?stream=1&seed=3", data=local[2], method="POST")
    response = urllib.request.urlopen(req, timeout=60)
    assert response.readline().startswith(b"event: progress")
    response.close()  # the client goes away mid-decode
    deadline = time.monotonic() + 20
    while _running(client) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(client) == 0  # freed long before 400 steps could finish


def _running(client) -> float:
    return _metrics(client)['idemrt_images{status="running"}']


def test_a_killed_replica_never_returns_a_wrong_image(service, local):
    """Kill one replica while it decodes: the client gets a 503 (or a correct image), and the
    service keeps serving once Serve has restarted the replica."""
    url, _ = service
    unet, codec, data = local
    client = Client(url)
    want = np.asarray(idemrt.Decoder(codec, unet, steps=5, device="cpu").decode(data, seed=4)).astype(int)
    outcomes = []

    def decode():
        try:
            outcomes.append(_png(client.decode(data, seed=4, steps="5").image))
        except ServiceError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=decode) for _ in range(4)]
    [t.start() for t in threads]
    time.sleep(0.3)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "DecoderReplica" in a["name"] and a["name"].startswith("SERVE_REPLICA::main")]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    [t.join(120) for t in threads]
    for outcome in outcomes:
        if isinstance(outcome, ServiceError):
            assert outcome.status in (500, 503)
        else:
            assert np.abs(outcome - want).max() <= 1
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            assert np.abs(_png(client.decode(data, seed=4, steps="5").image) - want).max() <= 1
            break
        except ServiceError:
            time.sleep(1)
    else:
        pytest.fail("the service did not recover after its replica was killed")


def test_decompress_with_server_option(service, local, tmp_path, capsys):
    """`idemrt decompress IN OUT --server URL`: no models on the client, the service's image."""
    from idemrt.cli import main

    src, out = tmp_path / "in.idm", tmp_path / "out.png"
    src.write_bytes(local[2])
    assert main(["decompress", str(src), str(out), "--server", service[0], "--seed", "11", "--steps", "3"]) == 0
    assert "replica" in capsys.readouterr().out
    assert np.array_equal(_png(out.read_bytes()), _png(Client(service[0]).decode(local[2], seed=11, steps="3").image))
    assert main(["decompress", str(src), str(tmp_path / "x.png"), "--server", service[0], "--steps", "7"]) != 0


def test_a_request_chooses_its_speed_and_priority(service, local):
    """speed=balanced (warm-started DSG + exact refinement) on a server whose default is paper, at
    priority 7: the image equals Decoder(speed="balanced")'s, with no server restart."""
    unet, codec, data = local
    result = Client(service[0]).decode(data, seed=5, speed="balanced", priority=7, timeout=300)
    decoder = idemrt.Decoder(codec, unet, speed="balanced", device="cpu")
    want = np.asarray(decoder.decode(data, seed=5)).astype(int)
    got = _png(result.image)
    assert result.steps == decoder.steps_run == 20
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01
