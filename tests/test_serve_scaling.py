"""Scaling out without a cluster: the retry of calls whose replica died (faked Ray errors), the
autoscaling/proxy/user_config options, the `serve deploy` YAML and a replica's reconfigure."""
import asyncio

import pytest
import yaml

from idemrt.errors import DeadlineExceeded
from idemrt.serve.config import ServeConfig
from idemrt.serve.problems import problem_from
from idemrt.serve.retry import call_with_retry, replica_died
from idemrt.serve.deployment import deployment_options
from idemrt.serve.runner import deploy_config


# Ray's exceptions, faked by class name (retry.py looks names up along the class hierarchy).
class RayActorError(Exception):
    pass


class ActorDiedError(RayActorError):
    pass


class ActorUnavailableError(RayActorError):
    pass


class RayTaskError(Exception):
    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class Flaky:
    """A replica call that fails with ``errors`` in turn, then answers."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1

        async def call():
            if self.errors:
                raise self.errors.pop(0)
            return "image"

        return call()


class Clock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def _run(make_call, **kw):
    clock = Clock()
    return asyncio.run(call_with_retry(make_call, clock=clock, sleep=clock.sleep, **kw)), clock


@pytest.mark.parametrize("exc, died", [
    (ActorDiedError("gone"), True), (ActorUnavailableError("unreachable"), True), (RayActorError("x"), True),
    (RayTaskError(ActorDiedError("gone")), True), (type("RayTaskError(ActorDiedError)", (ActorDiedError,), {})(), True),
    (ValueError("bad"), False), (RayTaskError(ValueError("bad")), False), (TimeoutError(), False),
])
def test_replica_died_by_class_name_through_wrappers(exc, died):
    assert replica_died(exc) is died
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = exc
    assert replica_died(wrapped) is died


def test_a_dead_replica_is_retried_with_backoff():
    call = Flaky(ActorDiedError("node lost"), RayTaskError(ActorUnavailableError("restarting")))
    result, clock = _run(call, tries=3, backoff_s=0.25, deadline=200.0)
    assert result == "image" and call.calls == 3 and clock.slept == [0.25, 0.5]


def test_retries_are_bounded_and_the_last_error_is_a_503():
    call = Flaky(*(ActorDiedError("gone") for _ in range(5)))
    with pytest.raises(ActorDiedError) as err:
        _run(call, tries=3, backoff_s=0.1)
    assert call.calls == 3
    problem = problem_from(err.value)
    assert problem.status == 503 and problem.headers()["Retry-After"]


def test_other_failures_are_never_retried():
    call = Flaky(ValueError("bad request"))
    with pytest.raises(ValueError):
        _run(call, tries=3)
    assert call.calls == 1


def test_no_retry_past_the_deadline():
    call = Flaky(ActorDiedError("gone"))
    with pytest.raises(ActorDiedError):
        _run(call, tries=3, backoff_s=1.0, deadline=100.5)  # the backoff alone would pass it
    assert call.calls == 1


def test_a_retry_gets_what_is_left_of_the_deadline():
    """A retried call that outlives the request's deadline is cancelled: 504."""
    cancelled = []

    def make_call():
        make_call.n = getattr(make_call, "n", 0) + 1

        async def call():
            if make_call.n == 1:
                raise ActorDiedError("gone")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        return call()

    async def main():
        loop = asyncio.get_running_loop()
        return await call_with_retry(make_call, tries=3, backoff_s=0.01, deadline=loop.time() + 0.3, clock=loop.time)

    with pytest.raises(DeadlineExceeded) as err:
        asyncio.run(main())
    assert cancelled == [True] and problem_from(err.value).status == 504


# -- options ------------------------------------------------------------------------------------------
def test_fixed_replicas_by_default():
    options = deployment_options(ServeConfig(replicas=3, max_slots=8, queue=32, pixel_budget=1 << 16))
    decoder, ingress = options["DecoderReplica"], options["Ingress"]
    assert decoder["num_replicas"] == 3 and "autoscaling_config" not in decoder
    assert decoder["user_config"] == {"max_slots": 8, "queue": 32, "pixel_budget": 65536}
    assert ingress["ray_actor_options"] == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


def test_min_max_replicas_autoscale_on_ongoing_requests():
    config = ServeConfig(min_replicas=1, max_replicas=4, replicas=2, max_slots=8)
    auto = deployment_options(config)["DecoderReplica"]["autoscaling_config"]
    assert "num_replicas" not in deployment_options(config)["DecoderReplica"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (1, 4, 2)
    assert auto["target_ongoing_requests"] == 8 and auto["upscale_delay_s"] < auto["downscale_delay_s"]
    only_max = ServeConfig(max_replicas=3)
    assert (only_max.min_replicas, only_max.max_replicas, only_max.autoscaling) == (1, 3, True)
    assert ServeConfig(min_replicas=2).max_replicas == 2
    assert not ServeConfig().autoscaling
    for bad in (dict(min_replicas=3, max_replicas=2), dict(min_replicas=-1), dict(max_replicas=0),
                dict(proxy_location="Nowhere"), dict(pixel_budget=-1)):
        with pytest.raises(ValueError):
            ServeConfig(**bad)


def test_deploy_config_is_the_schema_serve_deploy_takes():
    schema = pytest.importorskip("ray.serve.schema")
    config = ServeConfig(min_replicas=0, max_replicas=6, proxy_location="EveryNode", gpus_per_replica=1,
                         max_slots=4, queue=64, pixel_budget=4096)
    doc = yaml.safe_load(deploy_config(config, port=8123))
    parsed = schema.ServeDeploySchema.model_validate(doc)
    assert doc["proxy_location"] == "EveryNode" and doc["http_options"]["port"] == 8123
    app = doc["applications"][0]
    assert ServeConfig(**app["args"]) == config  # the args rebuild the same configuration
    decoder = {d.name: d for d in parsed.applications[0].deployments}["DecoderReplica"]
    assert decoder.user_config == {"max_slots": 4, "queue": 64, "pixel_budget": 4096}
    assert decoder.autoscaling_config["min_replicas"] == 0 and decoder.autoscaling_config["max_replicas"] == 6
    assert decoder.ray_actor_options.num_gpus == 1
    assert {d.name for d in parsed.applications[0].deployments} == {"DecoderReplica", "Ingress"}


def test_cli_print_config_carries_the_scaling_options(capsys):
    from idemrt.cli import main

    assert main(["serve", "--demo", "--gpus-per-replica", "0", "--min-replicas", "2", "--max-replicas", "5",
                 "--proxy-location", "EveryNode", "--pixel-budget", "12345", "--max-slots", "4", "--queue", "40",
                 "--print-config"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["proxy_location"] == "EveryNode"
    decoder = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "DecoderReplica")
    assert decoder["autoscaling_config"]["min_replicas"] == 2 and decoder["autoscaling_config"]["max_replicas"] == 5
    assert decoder["user_config"] == {"max_slots": 4, "queue": 40, "pixel_budget": 12345}
    assert decoder["ray_actor_options"]["num_cpus"] == 1.0
    assert main(["serve", "--demo", "--gpus-per-replica", "0", "--replicas", "3", "--cpus-per-replica", "2",
                 "--print-config"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    decoder = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "DecoderReplica")
    assert doc["proxy_location"] == "HeadOnly" and decoder["num_replicas"] == 3
    assert decoder["ray_actor_options"]["num_cpus"] == 2.0
    assert decoder["user_config"]["pixel_budget"] == 0
    args = doc["applications"][0]["args"]
    assert (args["tile"], args["max_windows"]) == (True, 1024)  # photographs in windows by default
    assert all(speed["tile"] == {} for speed in args["speeds"].values())
    assert main(["serve", "--demo", "--gpus-per-replica", "0", "--no-tile", "--max-windows", "7", "--max-pixels",
                 "99999", "--print-config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert (args["tile"], args["max_windows"], args["max_pixels"]) == (False, 7, 99999)
    assert all(speed["tile"] is None for speed in args["speeds"].values())


def test_engine_reconfigure_applies_the_tunables():
    from idemrt.serve.core import DecodeEngine
    from tiny_models import tiny_codec, tiny_unet

    engine = DecodeEngine(ServeConfig(steps_allowed=["3", "5"], unet="in-memory", max_slots=4, queue=8),
                          tiny_codec(), tiny_unet(), device="cpu")
    batchers = [engine.batcher]
    try:
        engine.reconfigure(max_slots=2, queue=5, pixel_budget=1024)
        assert (engine.config.max_slots, engine.config.queue, engine.config.pixel_budget) == (2, 5, 1024)
        assert all((s.max_slots, s.max_queue) == (2, 5) for s in batchers)
        engine.reconfigure(queue=6)  # None keeps the others
        assert (engine.config.max_slots, engine.config.queue) == (2, 6)
    finally:
        engine.close()
