"""The decode service's query parameters and problem+json answers, without Ray: parse_decode_params
on Starlette QueryParams (hostile values, repeats, each range, a property test over arbitrary
query strings), and the FastAPI app's own 404/405/422/500 answers driven as a bare ASGI app."""
import asyncio
import json
import logging
import math
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

pytest.importorskip("fastapi")

from idemrt.serve.config import MAX_SEED, PRIORITIES, ServeConfig  # noqa: E402
from idemrt.serve.params import DECODE_PARAMS, FORMATS, parse_decode_params  # noqa: E402
from idemrt.serve.problems import PROBLEM_JSON, Problem, install_problem_handlers, problem_from  # noqa: E402

CONFIG = ServeConfig(unet="unet.pt", steps_allowed=["3", "5"], timeout_s=30.0)
MSE_ONLY = ServeConfig(steps_allowed=["3"])


def parse(query: str, config: ServeConfig = CONFIG) -> dict:
    return parse_decode_params(QueryParams(query), config)


def rejected(query: str, config: ServeConfig = CONFIG) -> str:
    with pytest.raises(Problem) as err:
        parse(query, config)
    assert err.value.status == 422 and err.value.kind == "invalid-parameter" and err.value.detail
    return err.value.detail


def test_defaults_come_from_the_config():
    assert parse("") == {"mode": "perceptual", "seed": 0, "speed": "paper", "steps": "3", "priority": 0,
                         "timeout": None, "format": "png", "stream": False}
    assert parse("mode=mse", MSE_ONLY)["steps"] == "3"


def test_every_parameter_in_range():
    got = parse(f"mode=mse&seed={MAX_SEED}&speed=paper&steps=5&priority=9&timeout=30&format=webp&stream=1")
    assert got == {"mode": "mse", "seed": MAX_SEED, "speed": "paper", "steps": "5", "priority": 9, "timeout": 30.0,
                   "format": "webp", "stream": True}
    assert parse("seed=0007")["seed"] == 7 and parse("timeout=0.5")["timeout"] == 0.5
    assert parse("speed=fast") == {**parse(""), "speed": "fast", "steps": "50"}  # a preset's own respacing


@pytest.mark.parametrize("seed", [
    str(2**63), str(2**64), str(2**70), "-1", "1e3", " 1", "1 ", "+1", "1_000", "0x10", "1.0", "", "seed",
    "\u0661",  # ARABIC-INDIC DIGIT ONE: int() takes it, a seed may not
    "\u00b2", "nan", "9" * 10**6, "0" * 10**6 + "1" * 20,
])
def test_hostile_seeds_are_422(seed):
    detail = rejected(urlencode({"seed": seed}))
    assert "seed" in detail and len(detail) < 300  # a huge value is never echoed back whole


def test_a_long_zero_padded_seed_is_its_value():
    assert parse("seed=" + "0" * 10**5 + "42")["seed"] == 42


@pytest.mark.parametrize("query", [
    "mode=fancy", "mode=", "mode=MSE", "speed=ludicrous", "steps=1000", "steps=3&speed=fast", "format=jpeg",
    "format=PNG", "stream=2", "stream=true", "priority=10", "priority=-1", "priority=1.0", "priority=",
    "timeout=0", "timeout=-1", "timeout=30.001", "timeout=nan", "timeout=inf", "timeout=1e3", "timeout=1e-3",
    "timeout= 1", "timeout=", "timeout=" + "1" * 40, "timeout=1" + "0" * 400,
])
def test_out_of_range_values_are_422(query):
    name = query.split("=")[0]
    assert name in rejected(query)


def test_priorities_and_timeouts_accepted_over_their_range():
    assert [parse(f"priority={p}")["priority"] for p in PRIORITIES] == list(PRIORITIES)
    assert parse("timeout=30.000")["timeout"] == 30.0 and parse("timeout=.25")["timeout"] == 0.25


def test_unknown_parameters_are_named_with_the_known_ones():
    detail = rejected("path=/etc/passwd&seed=1")
    assert "'path'" in detail and all(name in detail for name in DECODE_PARAMS)
    assert len(rejected("&".join(f"x{i}=1" for i in range(1000)))) < 500
    assert len(rejected(urlencode({"k" * 10**5: "1"}))) < 500


@pytest.mark.parametrize("query", ["mode=mse&mode=perceptual", "mode=mse&mode=mse", "seed=1&seed=2",
                                   "stream=0&stream=1", "steps=3&seed=1&steps=3"])
def test_a_repeated_parameter_is_422(query):
    assert "times" in rejected(query)


def test_perceptual_needs_a_diffusion_model():
    assert "only mode=mse" in rejected("", MSE_ONLY) and "only mode=mse" in rejected("mode=perceptual", MSE_ONLY)
    assert parse("mode=mse", MSE_ONLY)["mode"] == "mse"


def test_speeds_are_limited_to_the_configured_ones():
    config = ServeConfig(unet="unet.pt", speed="fast", speeds_allowed=["fast"])
    assert parse("", config)["speed"] == "fast"
    assert "must be one of ['fast']" in rejected("speed=paper", config)


def _check(got: dict, config: ServeConfig) -> None:
    assert set(got) == {"mode", "seed", "speed", "steps", "priority", "timeout", "format", "stream"}
    assert got["mode"] in ("perceptual", "mse") and (config.unet or got["mode"] == "mse")
    assert type(got["seed"]) is int and 0 <= got["seed"] <= MAX_SEED
    assert got["speed"] in config.speeds_allowed and got["steps"] in config.steps_for(got["speed"])
    assert type(got["priority"]) is int and got["priority"] in PRIORITIES
    assert got["timeout"] is None or (math.isfinite(got["timeout"]) and 0 < got["timeout"] <= config.timeout_s)
    assert got["format"] in FORMATS and type(got["stream"]) is bool


_VALUES = st.one_of(st.text(max_size=30), st.integers(-2**80, 2**80).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["perceptual", "mse", "paper", "fast", "balanced", "3", "5", "50", "png", "webp",
                                     "0", "1", "9", "30", "0.5", str(MAX_SEED), str(2**64)]))
_PAIRS = st.lists(st.tuples(st.one_of(st.sampled_from(DECODE_PARAMS), st.text(max_size=12)), _VALUES), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=_PAIRS, mse_only=st.booleans())
def test_any_urlencoded_query_parses_or_is_422(pairs, mse_only):
    config = MSE_ONLY if mse_only else CONFIG
    try:
        got = parse(urlencode(pairs), config)
    except Problem as problem:
        assert problem.status == 422 and problem.kind == "invalid-parameter" and problem.detail
    else:
        _check(got, config)
        assert len({k for k, _ in pairs}) == len(pairs)  # a repeat never parses


@settings(max_examples=300, deadline=None)
@given(query=st.text(max_size=80))
def test_any_raw_query_string_parses_or_is_422(query):
    try:
        got = parse(query)
    except Problem as problem:
        assert problem.status == 422
    else:
        _check(got, CONFIG)


# -- problem+json answers of the FastAPI app itself -------------------------------------------------------

def call(app, method: str, path: str, query: str = "", body: bytes = b""):
    """One HTTP request through an ASGI app: (status, headers, body)."""
    messages = []

    async def run():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query.encode(), "headers": [(b"host", b"testserver")],
                 "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)

        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Starlette re-raises an unhandled exception after answering it
            pass

    asyncio.run(run())
    start = next(m for m in messages if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def problem_of(status, headers, body, want_status):
    assert status == want_status and headers["content-type"] == PROBLEM_JSON
    problem = json.loads(body)
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == want_status
    assert b"Traceback" not in body and b"Error:" not in body
    return problem


@pytest.fixture(scope="module")
def service_api():
    pytest.importorskip("ray")
    from idemrt.serve.app import api

    return api


@pytest.mark.parametrize("path", ["/index.html", "/static", "/nope", "/v1/decode/x", "/v1/../../etc/passwd", "/" + "a" * 5000])
def test_unknown_paths_are_404_problems(service_api, path):
    problem = problem_of(*call(service_api, "GET", path), 404)
    assert problem["title"] == "Not Found" and problem["type"].endswith("/not-found") and len(problem["detail"]) < 200


@pytest.mark.parametrize("method", ["GET", "PUT", "OPTIONS", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/v1/decode", "/v1/encode"])
def test_other_methods_are_405_problems_with_allow(service_api, method, path):
    status, headers, body = call(service_api, method, path)
    problem = problem_of(status, headers, body, 405)
    assert headers["allow"] == "POST" and problem["title"] == "Method Not Allowed" and method in problem["detail"]


@pytest.fixture(scope="module")
def toy_app():
    from fastapi import FastAPI

    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/number")
    async def number(n: int):
        return {"n": n}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal state /home/model.pt")

    @app.get("/problem")
    async def problem():
        raise Problem(503, "overloaded", "the decode queue is full", 2)

    return app


def test_fastapi_validation_is_a_422_problem(toy_app):
    assert call(toy_app, "GET", "/number", "n=3")[2] == b'{"n":3}'
    problem = problem_of(*call(toy_app, "GET", "/number", "n=not-a-number-secret"), 422)
    assert problem["type"].endswith("/invalid-parameter") and "n" in problem["detail"]
    assert "secret" not in problem["detail"]  # the value is never echoed
    problem_of(*call(toy_app, "GET", "/number"), 422)


def test_unexpected_exceptions_are_500_without_internals(toy_app, caplog):
    with caplog.at_level(logging.ERROR, logger="idemrt.serve.problems"):
        status, headers, body = call(toy_app, "GET", "/boom")
    problem = problem_of(status, headers, body, 500)
    assert problem["type"].endswith("/internal") and problem["title"] == "Internal Server Error"
    assert b"secret" not in body and b"RuntimeError" not in body and b"model.pt" not in body
    assert "secret internal state" in caplog.text  # ... but it is in the server's log


def test_an_uncaught_problem_keeps_its_status_and_retry_after(toy_app):
    status, headers, body = call(toy_app, "GET", "/problem")
    assert problem_of(status, headers, body, 503)["detail"] == "the decode queue is full"
    assert headers["retry-after"] == "2"


def test_problem_from_hides_unknown_exception_text():
    class RayTaskError(Exception):  # Ray's wrapper: the replica's exception as .cause
        def __init__(self, cause):
            super().__init__(f"wrapped: {cause}")
            self.cause = cause

    for exc in (KeyError("/secret/path"), RayTaskError(ValueError("Traceback: boom"))):
        problem = problem_from(exc)
        assert (problem.status, problem.kind) == (500, "internal")
        assert "secret" not in problem.detail and "boom" not in problem.detail and "Error" not in problem.detail
    assert problem_from(RayTaskError(Problem(422, "invalid-parameter", "x"))).status == 422
