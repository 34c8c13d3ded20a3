"""ServeConfig (issue 29): every speed a DecodeConfig, no field that applies to one speed only, the
shorthands equal to the map they expand to, and the data round trip the ingress and replicas get."""
import dataclasses

import pytest
import yaml

from idemrt.decode_config import DecodeConfig
from idemrt.serve.config import ServeConfig
from idemrt.speeds import SPEEDS


def test_no_field_applies_to_one_speed_only():
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    assert {"speed", "speeds", "respacings"} <= fields
    assert not fields & {"steps_allowed", "speeds_allowed", "sampler", "guidance", "scale"}
    config = ServeConfig(unet="u.pt", steps_allowed=["3", "5"], scale=0.3)
    assert list(config.speeds) == list(config.respacings) == ["paper", "balanced", "fast"]
    assert all(set(c) == {f.name for f in dataclasses.fields(DecodeConfig)} for c in config.speeds.values())
    assert not {"steps_allowed", "scale"} & set(config.to_dict())


def test_the_shorthands_are_the_map():
    short = ServeConfig(unet="u.pt", speed="fast", speeds_allowed=["fast", "paper"], steps_allowed=["20", "ddim10"],
                        guidance="dsg", backend="eager", deterministic=True)
    mapped = ServeConfig(unet="u.pt", speeds={"fast": {"guidance": "dsg"}, "paper": None},
                         respacings={"fast": ["20", "ddim10"]}, backend="eager", deterministic=True)
    assert short == mapped and short.speed == "fast" and short.speeds_allowed == ["fast", "paper"]
    assert short.steps_allowed == ["20", "ddim10"] and short.steps_for("paper") == ["1000"]
    server = dict(backend="eager", deterministic=True, tile=True)  # the server-wide fields (tiling on by default)
    assert short.decode_config() == SPEEDS["fast"].override(guidance="dsg", steps=20, **server)
    assert short.decode_config("fast", "ddim10") == SPEEDS["fast"].override(guidance="dsg", steps="ddim10", **server)
    assert short.decode_config("paper") == SPEEDS["paper"].replace(**server)


def test_a_config_is_data_that_round_trips():
    config = ServeConfig(unet="u.pt", speeds_allowed=["paper", "fast"], steps_allowed=["3", "5"], scale=0.3)
    again = ServeConfig(**config.to_dict())
    assert again == config and again.decode_config("paper", "5") == config.decode_config("paper", "5")
    assert ServeConfig(**yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    # The default speed's config holds its default respacing; a request's respacing replaces it.
    assert config.speeds["paper"]["steps"] == 3 and config.decode_config("paper", "5").steps == 5


def test_a_speed_of_its_own():
    mine = SPEEDS["fast"].replace(steps=20, start=0.6)
    config = ServeConfig(unet="u.pt", speeds={"mine": mine})
    assert config.speed == "mine" and config.speeds_allowed == ["mine"] and config.steps_allowed == ["20"]
    assert config.decode_config() == mine.replace(tile=True)  # the server-wide fields apply: tiling on
    assert ServeConfig(**config.to_dict()) == config


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(speeds={"turbo": {"steps": 4}}), ValueError, "not presets"),
    (dict(speeds={"paper": {"stepz": 4}}), ValueError, "unknown decode options"),
    (dict(speeds={"paper": 4}), TypeError, "DecodeConfig or a dict"),
    (dict(speeds={"paper": None}, speeds_allowed=["paper"]), ValueError, "not both"),
    (dict(speed="fast", speeds={"paper": None}), ValueError, "default speed 'fast'"),
    (dict(speeds_allowed=["paper"], speed="fast"), ValueError, "default speed 'fast'"),
    (dict(respacings={"fast": ["50"]}, speeds_allowed=["paper"]), ValueError, "does not serve"),
    (dict(steps_allowed=[]), ValueError, "at least one respacing"),
    (dict(respacings={"paper": ["3"]}, steps_allowed=["3"]), ValueError, "not both"),
    (dict(speed="ludicrous"), ValueError, "speed must be one of"),
])
def test_bad_speed_maps_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        ServeConfig(unet="u.pt", **kwargs)


def test_print_config_writes_the_map(capsys):
    from idemrt.serve.runner import deploy_config

    config = ServeConfig(unet="/m/u.pt", speed="fast", steps_allowed=["20"], speeds_allowed=["fast", "balanced"])
    args = yaml.safe_load(deploy_config(config))["applications"][0]["args"]
    assert list(args["speeds"]) == ["fast", "balanced"] and args["respacings"] == {"fast": ["20"], "balanced": ["50"]}
    assert ServeConfig(**args) == config
    assert DecodeConfig.from_dict(args["speeds"]["balanced"]) == SPEEDS["balanced"].replace(tile=True)
