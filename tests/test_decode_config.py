"""idemrt.DecodeConfig: the decode configuration as one frozen value (presets, overrides, files,
the Decoder, the CLI and the service's config)."""
import dataclasses
import json

import pytest
import torch
import yaml

import idemrt
from idemrt.decode_config import DecodeConfig
from idemrt.speeds import SPEEDS, resolve_speed
from tiny_models import TINY_UNET, tiny_codec, tiny_codec_state, tiny_unet, tiny_unet_state

H, W = 40, 48


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def data(models):
    torch.manual_seed(3)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(H, W), mode="bilinear",
                                            align_corners=False)
    return idemrt.Encoder(models[1]).encode(image)


GUIDED = DecodeConfig(steps="ddim10", sampler="ddim", guidance="pir", guidance_options={"iters": 2, "lam": 0.5},
                      start=0.5, exact=True, eta=0.5, dtype=torch.bfloat16, backend="fast",
                      backend_options={"kernels": "torch"}, max_retries=2, retry_threshold=5.0, check_every=3)


# --- the value -------------------------------------------------------------------------------------

def test_exported_and_every_speed_is_a_decode_config():
    assert idemrt.DecodeConfig is DecodeConfig
    assert set(SPEEDS) == {"paper", "balanced", "fast"}
    for name, cfg in SPEEDS.items():
        assert isinstance(cfg, DecodeConfig), name
        assert resolve_speed(name) == cfg
    assert resolve_speed(None) == SPEEDS["paper"]
    assert (SPEEDS["paper"].steps, SPEEDS["paper"].guidance, SPEEDS["paper"].scale) == (1000, "dps", 0.6)
    assert (SPEEDS["fast"].guidance, SPEEDS["fast"].start, SPEEDS["fast"].exact) == ("pir", 0.4, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPEEDS["paper"].steps = 10


def test_replace_and_override():
    cfg = SPEEDS["balanced"].replace(steps=20, exact=False)
    assert (cfg.steps, cfg.exact, cfg.guidance, cfg.start) == (20, False, "dsg", 0.4)
    assert SPEEDS["balanced"].steps == 50  # the preset is unchanged
    assert dataclasses.replace(SPEEDS["balanced"], steps=20, exact=False) == cfg
    # The override rule of explicit arguments: None keeps the preset's value; another guidance
    # drops the preset's guidance options (they belong to its guidance).
    pir = SPEEDS["fast"].replace(guidance_options={"iters": 3})
    assert pir.override(steps=None, guidance="pir").guidance_options == {"iters": 3}
    assert pir.override(guidance="dps").guidance_options == {}
    assert resolve_speed("fast", guidance="dps", steps=20) == SPEEDS["fast"].replace(guidance="dps", steps=20)
    with pytest.raises(ValueError, match="guidance 'dps' does not take these options"):
        pir.replace(guidance="dps")  # replace() is plain: the options stay, and DPS has no iters
    with pytest.raises(ValueError, match="unknown decode options"):
        resolve_speed("fast", stepz=3)
    with pytest.raises(ValueError, match="speed must be one of"):
        resolve_speed("ludicrous")


def test_caller_dicts_do_not_leak_in_and_lists_become_tuples():
    options = {"iters": 2}
    cfg = DecodeConfig(guidance="pir", guidance_options=options, steps=[10, 20])
    options["iters"] = 9
    assert cfg.guidance_options == {"iters": 2} and cfg.steps == (10, 20)
    assert hash(cfg) == hash(DecodeConfig(guidance="pir", guidance_options={"iters": 2}, steps=(10, 20)))
    assert DecodeConfig(dtype="bf16").dtype is torch.bfloat16


@pytest.mark.parametrize("cfg", [*SPEEDS.values(), GUIDED, DecodeConfig(steps=[5, 3], dtype="fp16")],
                         ids=[*SPEEDS, "guided", "sections"])
def test_json_and_yaml_round_trip(cfg, tmp_path):
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data
    assert DecodeConfig.from_dict(d) == cfg
    assert DecodeConfig.from_json(cfg.to_json()) == cfg
    assert DecodeConfig.from_yaml(cfg.to_yaml()) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == d
    for name in ("c.json", "c.yaml", "c.yml"):
        cfg.save(tmp_path / name)
        assert DecodeConfig.load(tmp_path / name) == cfg
    if cfg.dtype is not None:
        assert isinstance(d["dtype"], str) and DecodeConfig.from_dict(d).dtype is cfg.dtype


def test_guided_config_serialises_dtype_by_name():
    d = GUIDED.to_dict()
    assert d["dtype"] == "bf16" and d["guidance_options"] == {"iters": 2, "lam": 0.5} and d["steps"] == "ddim10"


@pytest.mark.parametrize("changes, error, match", [
    (dict(steps=0), ValueError, "at least 1 step"),
    (dict(steps="ddimx"), ValueError, "respacing"),
    (dict(steps=1.5), TypeError, "steps must be"),
    (dict(steps=True), TypeError, "steps must be"),
    (dict(sampler="euler"), ValueError, "sampler must be one of"),
    (dict(guidance="mcg"), ValueError, "guidance must be one of"),
    (dict(guidance="dps", guidance_options={"iters": 3}), ValueError, "does not take these options"),
    (dict(guidance_options=[1]), TypeError, "guidance_options must be a dict"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(guidance="dsg", interval=0), ValueError, "DSG interval"),
    (dict(start=0), ValueError, "start must be a number in"),
    (dict(start=1.5), ValueError, "start must be a number in"),
    (dict(start="0.5"), ValueError, "start"),
    (dict(constraint="z"), ValueError, "constraint must be one of"),
    (dict(eta=-1.0), ValueError, "eta must be a finite number"),
    (dict(max_retries=-1), ValueError, "max_retries must be an int"),
    (dict(nan_retries=1.5), ValueError, "nan_retries must be an int"),
    (dict(retry_threshold=float("inf")), ValueError, "retry threshold"),
    (dict(check_every=0), ValueError, "check_every must be an int >= 1"),
    (dict(exact=1), TypeError, "exact must be True or False"),
    (dict(deterministic="yes"), TypeError, "deterministic must be True or False"),
    (dict(backend=3), TypeError, "backend must be"),
    (dict(dtype="fp64"), ValueError, "dtype must be one of"),
    (dict(dtype=3), TypeError, "dtype must be a torch dtype"),
])
def test_invalid_values_raise_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        DecodeConfig(**changes)
    with pytest.raises(error, match=match):
        SPEEDS["paper"].replace(**changes)


def test_from_dict_refuses_unknown_fields_and_non_mappings(tmp_path):
    with pytest.raises(ValueError, match=r"unknown decode options \['stepz'\]"):
        DecodeConfig.from_dict({"stepz": 3})
    with pytest.raises(TypeError, match="mapping"):
        DecodeConfig.from_json("[1, 2]")
    (tmp_path / "bad.yaml").write_text("steps: 0\n")
    with pytest.raises(ValueError, match="bad.yaml: .*at least 1 step"):
        DecodeConfig.load(tmp_path / "bad.yaml")


# --- the Decoder -------------------------------------------------------------------------------------

CASES = {  # name: (DecodeConfig, the same decode as the Decoder's old keyword arguments)
    "dps": (SPEEDS["paper"].replace(steps=4, max_retries=1, retry_threshold=0.0),
            dict(steps=4, max_retries=1, retry_threshold=0.0)),
    "balanced": (SPEEDS["balanced"].replace(steps=4, start=0.6), dict(speed="balanced", steps=4, start=0.6)),
    "fast-pir": (SPEEDS["fast"].replace(steps=4, start=0.6, guidance_options={"iters": 2}),
                 dict(speed="fast", steps=4, start=0.6, guidance_options={"iters": 2})),
    "ddim-y": (DecodeConfig(steps=4, sampler="ddim", eta=0.5, scale=0.3, constraint="y", check_every=1),
               dict(steps=4, sampler="ddim", eta=0.5, scale=0.3, constraint="y", check_every=1)),
}


@pytest.mark.parametrize("name", CASES)
def test_decoder_with_config_decodes_as_with_the_old_keywords(models, data, name):
    unet, codec = models
    cfg, kwargs = CASES[name]
    new = idemrt.Decoder(codec, unet, config=cfg, device="cpu")
    old = idemrt.Decoder(codec, unet, device="cpu", **kwargs)
    assert new.config == old.config == cfg
    a = new.decode_batch([data, data], seeds=[1, 2], output="tensor")
    b = old.decode_batch([data, data], seeds=[1, 2], output="tensor")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert new.last.distance == old.last.distance and new.last.exact == old.last.exact
    # ... and the config is really used: another config decodes differently.
    other = idemrt.Decoder(codec, unet, config=cfg.replace(steps=5), device="cpu")
    assert not torch.equal(other.decode(data, seed=1, output="tensor"), a[0])


def test_decoder_config_is_the_resolved_one_and_keywords_override_it(models):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, speed="fast", steps=20, device="cpu")
    assert dec.config == SPEEDS["fast"].replace(steps=20) and dec.speed == "fast"
    assert idemrt.Decoder(codec, unet, device="cpu").config == SPEEDS["paper"]
    dec = idemrt.Decoder(codec, unet, config=GUIDED, steps=5, dtype=torch.float32, backend="eager", device="cpu")
    assert dec.config == GUIDED.replace(steps=5, dtype=torch.float32, backend="eager")
    assert (dec.schedule.num_steps, dec.dtype, dec.backend_name, dec.guidance.iters) == (5, torch.float32, "eager", 2)
    assert (dec.retry.max_retries, dec.check_every, dec.exact, dec.speed) == (2, 3, True, None)
    # A Decoder rebuilt from another's config is the same decoder.
    assert idemrt.Decoder(codec, unet, config=dec.config, device="cpu").config == dec.config
    with pytest.raises(ValueError, match="not both"):
        idemrt.Decoder(codec, unet, config=GUIDED, speed="fast", device="cpu")
    with pytest.raises(TypeError, match="config must be a DecodeConfig"):
        idemrt.Decoder(codec, unet, config=GUIDED.to_dict(), device="cpu")


# --- the command line ----------------------------------------------------------------------------------

def _cli(capsys, *args):
    from idemrt import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_print_config_and_config_file_with_a_flag_override(tmp_path, capsys, monkeypatch):
    code, out, _ = _cli(capsys, "decompress", "--speed", "fast", "--steps", "20", "--dtype", "bf16", "--print-config")
    # a preset decode on the command line tiles images larger than the prior (issue 28)
    assert code == 0 and DecodeConfig.from_json(out) == SPEEDS["fast"].replace(steps=20, dtype=torch.bfloat16, tile=True)
    code, out, _ = _cli(capsys, "decompress", "--print-config", "--no-tile")
    assert code == 0 and DecodeConfig.from_json(out) == SPEEDS["paper"]

    base = SPEEDS["balanced"].replace(steps=50, start=0.6, interval=2, max_retries=1)
    base.save(tmp_path / "decode.yaml")
    code, out, _ = _cli(capsys, "decompress", "--config", tmp_path / "decode.yaml", "--steps", "4",
                        "--print-config")
    assert code == 0 and DecodeConfig.from_json(out) == base.replace(steps=4)  # the flag wins, the rest is the file's
    with pytest.raises(SystemExit) as exc:  # a usage error, not a traceback
        _cli(capsys, "decompress", "--config", tmp_path / "decode.yaml", "--speed", "fast", "--print-config")
    assert exc.value.code == 2 and "not both" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"steps": 0}')
    with pytest.raises(SystemExit):
        _cli(capsys, "decompress", "--config", tmp_path / "bad.json", "--print-config")
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # without --print-config, input and output are required
        _cli(capsys, "decompress")

    # A real decode: --config FILE + --steps equals the same options given as flags, and the API.
    from idemrt.models import unet_loading

    torch.save(tiny_codec_state(), tmp_path / "codec.pth")
    torch.save(tiny_unet_state(), tmp_path / "unet.pt")
    real = unet_loading.load_unet
    monkeypatch.setattr(unet_loading, "load_unet", lambda src, preset=None: real(src, **TINY_UNET))
    torch.manual_seed(3)
    from idemrt.images import save_image

    save_image(torch.rand(1, 3, H, W), tmp_path / "in.png")
    assert _cli(capsys, "compress", tmp_path / "in.png", tmp_path / "a.idm", "--codec", "bmshj2018-hyperprior",
                "--quality", "1", "--checkpoint", tmp_path / "codec.pth")[0] == 0
    common = ("--unet", tmp_path / "unet.pt", "--codec-checkpoint", tmp_path / "codec.pth", "--quiet")
    code, out, _ = _cli(capsys, "decompress", tmp_path / "a.idm", tmp_path / "file.png", *common,
                        "--config", tmp_path / "decode.yaml", "--steps", "4")
    assert code == 0 and "steps" in out
    code, _, _ = _cli(capsys, "decompress", tmp_path / "a.idm", tmp_path / "flags.png", *common, "--speed",
                      "balanced", "--steps", "4", "--start", "0.6", "--interval", "2", "--max-retries", "1", "--no-tile")
    assert code == 0
    code, _, _ = _cli(capsys, "decompress", tmp_path / "a.idm", tmp_path / "paper.png", *common, "--steps", "4")
    assert code == 0
    from PIL import Image
    import numpy as np

    png = {k: np.asarray(Image.open(tmp_path / f"{k}.png")) for k in ("file", "flags", "paper")}
    assert np.array_equal(png["file"], png["flags"])
    assert not np.array_equal(png["file"], png["paper"])  # the file's options were used
    decoder = idemrt.Decoder(tiny_codec(), tiny_unet(), config=base.replace(steps=4), device="cpu")
    api = decoder.decode((tmp_path / "a.idm").read_bytes(), seed=0, output="tensor")
    save_image(api, tmp_path / "api.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "api.png")), png["file"])


# --- the service's config ------------------------------------------------------------------------------

def test_serve_config_builds_decode_configs_and_prints_its_default():
    from idemrt.serve.config import ServeConfig
    from idemrt.serve.runner import deploy_config

    config = ServeConfig(unet="u.pt", speed="fast", steps_allowed=["20", "ddim10"], backend="eager",
                         deterministic=True)
    assert config.decode_config() == SPEEDS["fast"].replace(steps=20, backend="eager", deterministic=True, tile=True)
    assert config.decode_config("fast", "ddim10").steps == "ddim10"
    assert config.decode_config("paper") == SPEEDS["paper"].replace(backend="eager", deterministic=True, tile=True)
    own = ServeConfig(unet="u.pt", guidance="dps", scale=0.3)  # the server's own options: its default speed only
    assert own.decode_config() == SPEEDS["paper"].replace(scale=0.3, tile=True)  # tiling: server-wide, on by default
    assert own.decode_config("fast") == SPEEDS["fast"].replace(tile=True)
    text = deploy_config(config)
    header = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   "))
    assert DecodeConfig.from_yaml(header) == config.decode_config()
    assert yaml.safe_load(text)["applications"][0]["args"]["speed"] == "fast"  # the YAML itself is unchanged


def test_evaluation_pipeline_takes_a_config(models, data):
    from idemrt.evaluation import Pipeline

    unet, codec = models
    cfg = SPEEDS["fast"].replace(steps=4, start=0.6)
    pipe = Pipeline(codec, unet, config=cfg, device="cpu")
    assert pipe.decoder.config == cfg
    old = Pipeline(codec, unet, steps=4, sampler="ddpm", guidance="dps", scale=1.0, device="cpu", progress=False)
    assert old.decoder.config == SPEEDS["paper"].replace(steps=4, scale=1.0)
    direct = idemrt.Decoder(codec, unet, config=cfg, device="cpu")
    assert torch.equal(pipe.decoder.decode(data, seed=4, output="tensor"), direct.decode(data, seed=4, output="tensor"))


def test_loose_decode_options_are_deprecated_aliases(models, tmp_path):
    """Decoder, Pipeline, run_demo and evaluate take ``config=`` (a DecodeConfig or a preset name);
    their loose decode options still work, with one DeprecationWarning naming them, and idemrt's own
    callers (the CLI paths) never use them."""
    import warnings

    from idemrt.evaluation import Pipeline

    unet, codec = models
    with pytest.warns(DeprecationWarning, match=r"Decoder\(scale=, speed=, steps=\)"):
        old = idemrt.Decoder(codec, unet, speed="fast", steps=20, scale=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = idemrt.Decoder(codec, unet, config=SPEEDS["fast"].replace(steps=20, scale=0.5))
        named = idemrt.Decoder(codec, unet, config="fast")
        pipe = Pipeline(codec, unet, "balanced")
    assert old.config == new.config and named.config == SPEEDS["fast"] and named.speed == "fast"
    assert pipe.decoder.config == SPEEDS["balanced"]
    with pytest.warns(DeprecationWarning, match=r"Pipeline\(steps=\)"):
        assert Pipeline(codec, unet, steps=7).decoder.config == SPEEDS["paper"].replace(steps=7)
    with pytest.raises(TypeError, match="DecodeConfig or a preset name"):
        idemrt.Decoder(codec, unet, config={"steps": 3})
    with pytest.raises(ValueError, match="speed must be one of"):
        idemrt.Decoder(codec, unet, config="quick")


def test_the_demo_and_eval_commands_pass_a_config(tmp_path, monkeypatch):
    """`idemrt demo` and `idemrt eval` build a DecodeConfig from their options (no deprecated
    path), the demo's own by default and a preset with --speed, options given over either."""
    import argparse
    import warnings

    from idemrt import demo, evaluation
    from idemrt.demo_assets import demo_decode_config

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out_dir, **kw: seen.setdefault("demo", []).append(kw["config"]))
    monkeypatch.setattr(evaluation, "evaluate", lambda d, o, **kw: seen.setdefault("eval", []).append(kw["config"]))
    p = argparse.ArgumentParser()
    demo.add_subparsers(p.add_subparsers(dest="command", required=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for argv in (["demo"], ["demo", "--steps", "20"], ["demo", "--speed", "fast", "--steps", "30"],
                     ["eval", str(tmp_path), "--scale", "2"]):
            args = p.parse_args(argv)
            args.func(args)
    assert seen["demo"] == [demo_decode_config(), demo_decode_config().replace(steps=20),
                            SPEEDS["fast"].replace(steps=30)]
    assert seen["eval"] == [demo_decode_config().replace(scale=2.0, tile=True)]  # eval tiles large images
