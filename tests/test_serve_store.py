"""The decode service over a model store (``idemrt serve --models DIR``): the engine holds every
codec and prior of the store, routes each stream by its header, and answers 422 for a stream whose
codec the store lacks; then the same over HTTP on a local Ray instance."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import idemrt
from idemrt.serve.config import ServeConfig
from idemrt.serve.core import DecodeEngine
from idemrt.serve.problems import problem_from
from test_store import HYPERPRIOR, add_model
from tiny_models import TINY_UNET, tiny_codec_state, tiny_unet_state

CODECS = {"q1": (1, 0), "q2": (2, 1), "q3": (3, 2)}  # stream name -> (quality, seed of the weights); no q3 in the store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for name in ("q1", "q2"):
        quality, seed = CODECS[name]
        add_model(root, f"hp-{name}", {"id": f"hp-{name}", "kind": "codec", "codec": HYPERPRIOR, "quality": quality},
                  tiny_codec_state(seed))
    add_model(root, "tiny", {"id": "tiny", "kind": "prior", "config": TINY_UNET}, tiny_unet_state(0))
    add_model(root, "tiny2", {"id": "tiny2", "kind": "prior", "config": TINY_UNET}, tiny_unet_state(1))
    broken = add_model(root, "broken", {"id": "broken", "kind": "codec", "codec": HYPERPRIOR, "quality": 4},
                       tiny_codec_state(4))
    (broken / "weights.safetensors").write_bytes(b"corrupt")
    return root


@pytest.fixture(scope="module")
def local():
    """The codecs (the store's two and one it lacks), the priors and a stream of each codec."""
    codecs = {name: idemrt.load_codec(HYPERPRIOR, quality=q, checkpoint=tiny_codec_state(seed))
              for name, (q, seed) in CODECS.items()}
    unets = {"tiny": idemrt.load_unet(tiny_unet_state(0), **TINY_UNET),
             "tiny2": idemrt.load_unet(tiny_unet_state(1), **TINY_UNET)}
    img = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(5))
    data = {name: idemrt.Encoder(codec).encode(img) for name, codec in codecs.items()}
    return codecs, unets, data


def test_engine_routes_each_stream_to_its_codec(store, local):
    codecs, unets, data = local
    engine = DecodeEngine(ServeConfig(models=str(store), prior="tiny", steps_allowed=["3"], speeds_allowed=["paper"]),
                          device="cpu")
    try:
        assert len(engine.groups) == 4  # one step function per (codec, prior): never shared across them
        futures = {(name, prior): engine.submit(data[name], seed=7, prior=prior)
                   for name in ("q1", "q2") for prior in (None, "tiny2")}
        mse = {name: engine.submit(data[name], mode="mse") for name in ("q1", "q2")}
        for (name, prior), future in futures.items():
            got = future.result(timeout=120)
            decoder = idemrt.Decoder(codecs[name], unets[prior or "tiny"], config=engine.config.decode_config(),
                                     device="cpu")  # the server's config: 64x64 images in the tiny prior's windows
            want = decoder.decode(data[name], seed=7, output="tensor")
            torch.testing.assert_close(got.image, want, rtol=0, atol=2e-5)
        for name, future in mse.items():
            want = idemrt.Decoder(codecs[name], None, device="cpu").decode(data[name], mode="mse", output="tensor")
            torch.testing.assert_close(future.result(timeout=30).image, want, rtol=0, atol=0)

        # A stream whose codec the store lacks: a typed error naming what it needs, a 422 problem.
        with pytest.raises(idemrt.ModelNotFoundError) as missing:
            engine.submit(data["q3"], mode="mse")
        problem = problem_from(missing.value)
        assert problem.status == 422 and problem.kind == "model-not-found"
        digest = idemrt.bitstream.unpack(data["q3"]).weights_hash.hex()
        assert f"{HYPERPRIOR} q3" in problem.detail and digest in problem.detail
        with pytest.raises(idemrt.ModelNotFoundError) as no_prior:
            engine.submit(data["q1"], prior="hp-q1")
        assert problem_from(no_prior.value).status == 422 and "tiny, tiny2" in str(no_prior.value)

        listed = engine.models()
        assert [c["id"] for c in listed["codecs"]] == ["hp-q1", "hp-q2"]
        assert [(p["id"], p["default"]) for p in listed["priors"]] == [("tiny", True), ("tiny2", False)]
        assert [u["id"] for u in listed["unavailable"]] == ["broken"]
        assert "sha256 mismatch" in listed["unavailable"][0]["reason"] and str(store) not in str(listed)
        # /v1/encode's engine side: the codec by its id (the store has two).
        png = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(png, "PNG")
        assert engine.encode(png.getvalue(), "hp-q2").result(timeout=30) == idemrt.Encoder(codecs["q2"]).encode(
            png.getvalue())
        with pytest.raises(idemrt.ModelNotFoundError, match="hp-q1, hp-q2"):
            engine.encode(png.getvalue())
        # The engine still serves after the refusals.
        assert engine.submit(data["q2"], mode="mse").result(timeout=30).image.shape == (1, 3, 40, 48)
    finally:
        engine.close()


def test_engine_without_a_default_prior_needs_one(store, local):
    engine = DecodeEngine(ServeConfig(models=str(store), steps_allowed=["3"], speeds_allowed=["paper"]), device="cpu")
    try:
        with pytest.raises(idemrt.ModelNotFoundError, match="choose one with prior=ID"):
            engine.submit(local[2]["q1"])
        assert engine.submit(local[2]["q1"], mode="mse").result(timeout=30).evaluations == 0
    finally:
        engine.close()


def test_serve_options(store):
    from idemrt.cli import build_parser
    from idemrt.serve.cli import config_from_args

    args = build_parser().parse_args(["serve", "--models", str(store), "--prior", "tiny", "--steps", "3"])
    config = config_from_args(args)
    assert config.models == str(store) and config.prior == "tiny" and config.unet is None
    for bad in (["--unet", "u.pt"], ["--demo"]):
        with pytest.raises(idemrt.CheckpointError, match="drop"):
            config_from_args(build_parser().parse_args(["serve", "--models", str(store), *bad]))
    with pytest.raises(idemrt.CheckpointError, match="--models"):
        config_from_args(build_parser().parse_args(["serve", "--prior", "tiny"]))


# --- over HTTP (Ray Serve) ------------------------------------------------------------------------


def test_http_service_of_a_store(store, local, tmp_path_factory):
    pytest.importorskip("ray")
    from ray import serve

    from idemrt.serve import Client, ServiceError
    from idemrt.serve.app import build_app
    from local_ray import local_serve

    codecs, unets, data = local
    config = ServeConfig(models=str(store), prior="tiny", steps_allowed=["3"], speeds_allowed=["paper"],
                         cpus_per_replica=0)
    with local_serve(tmp_path_factory.mktemp("r")) as url:  # a short path: Ray's sockets live under it
        serve.run(build_app(config), name="store", route_prefix="/")
        client = Client(url)
        for name in ("q1", "q2"):  # two qualities, one service
            got = np.asarray(Image.open(io.BytesIO(client.decode(data[name], seed=3, prior="tiny2").image)))
            want = idemrt.Decoder(codecs[name], unets["tiny2"], config=config.decode_config(), device="cpu").decode(data[name], seed=3)
            assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 1
        with pytest.raises(ServiceError) as missing:
            client.decode(data["q3"], mode="mse")
        assert missing.value.status == 422 and missing.value.problem["type"].endswith("/model-not-found")
        assert f"{HYPERPRIOR} q3" in missing.value.problem["detail"]
        with pytest.raises(ServiceError) as bad_prior:
            client.decode(data["q1"], prior="../etc")
        assert bad_prior.value.status == 422
        models = client.get("/v1/models")
        assert [c["id"] for c in models["codecs"]] == ["hp-q1", "hp-q2"]
        assert [p["id"] for p in models["priors"]] == ["tiny", "tiny2"] and models["modes"] == ["perceptual", "mse"]
        assert models["unavailable"][0]["id"] == "broken" and str(store) not in str(models)
        png = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(png, "PNG")
        with client._post("/v1/encode", png.getvalue(), "codec=hp-q1") as r:
            assert r.read() == idemrt.Encoder(codecs["q1"]).encode(png.getvalue())
        for query in ("", "codec=nope", "quality=1"):
            with pytest.raises(ServiceError) as no_codec:
                client._post("/v1/encode", png.getvalue(), query)
            assert no_codec.value.status == 422
        assert client.decode(data["q2"], mode="mse").steps == 0  # still serving
