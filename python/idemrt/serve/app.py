"""The Ray Serve application: a FastAPI ingress and decoder replicas running the step loop.

    HTTP ──▶ Ingress (FastAPI; parses and checks requests, rejects early)
                │ DeploymentHandle (Ray Serve routes to a replica; replicas on GPUs or CPUs)
                ▼
             DecoderReplica × N (one DecodeEngine each: models, step schedulers, loop thread)

Ray Serve gives replicas, placement (``num_gpus`` per replica), restarts of dead replicas,
clusters (``--address``) and the HTTP proxy; idemrt adds the step-level batching inside a
replica. The HTTP API is documented in docs/serving.md.
"""

import asyncio
import base64
import io
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from .. import bitstream as bsfmt
from .config import ServeConfig
from .engine import MODES, DecodeEngine
from .metrics import Metrics
from .params import DECODE_PARAMS, FORMATS, parse_decode_params  # noqa: F401 - DECODE_PARAMS re-exported
from .problems import PROBLEM_JSON, Problem, install_problem_handlers, problem_from

api = FastAPI(title="idemrt decode service")
install_problem_handlers(api)  # 404, 405, validation and unexpected errors answer problem+json too


def encode_image(image, fmt: str) -> bytes:
    """(1, 3, H, W) in [0, 1] -> PNG or WEBP (lossless) bytes."""
    from ..images import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


@serve.deployment
class DecoderReplica:
    """One replica: a :class:`DecodeEngine` on this replica's device."""

    def __init__(self, config: dict):
        self.engine = DecodeEngine(ServeConfig(**config))
        self.replica = serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict:
        return {"replica": self.replica, "weights_hash": self.engine.codec.weights_hash().hex(), **self.engine.stats()}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the step loop thread died")

    async def decode(self, data: bytes, mode: str, seed: int, steps: str, fmt: str) -> dict:
        future = self.engine.submit(data, mode=mode, seed=seed, steps=steps)
        result = await _await(future)
        return {"image": encode_image(result.image, fmt), "distance": result.distance, "steps": result.steps,
                "seconds": result.seconds, "replica": self.replica}

    async def decode_stream(self, data: bytes, mode: str, seed: int, steps: str, fmt: str):
        """Server-sent-event payloads: progress, previews, then the result (or an error)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            future = self.engine.submit(data, mode=mode, seed=seed, steps=steps,
                                        on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield _error_event(exc)
            return
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            while (event := await events.get()) is not None:
                if event["event"] == "preview":
                    event = {**event, "image": base64.b64encode(encode_image(event["image"], "png")).decode()}
                yield event
            result = future.result()
            yield {"event": "result", "format": fmt, "image": base64.b64encode(encode_image(result.image, fmt)).decode(),
                   "distance": result.distance, "steps": result.steps, "seconds": result.seconds,
                   "replica": self.replica}
        except asyncio.CancelledError:
            getattr(future, "job", future).cancel()  # the client went away: free the slot
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield _error_event(exc)

    def encode(self, image: bytes) -> bytes:
        from ..api import Encoder
        from ..images import load_image

        return Encoder(self.engine.codec).encode(load_image(image, max_pixels=self.engine.config.max_pixels))


async def _await(future):
    """Await a concurrent Future; if the request is cancelled (client gone), cancel its decode."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        getattr(future, "job", future).cancel()
        raise


def _error_event(exc) -> dict:
    problem = problem_from(exc)
    return {"event": "error", **json.loads(problem.body())}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, decoder, config: dict):
        self.decoder = decoder
        self.config = ServeConfig(**config)
        self.metrics = Metrics()

    # -- decode and encode ---------------------------------------------------------------------------
    @api.post("/v1/decode")
    async def decode(self, request: Request):
        t0, mode = time.monotonic(), request.query_params.get("mode", "perceptual")
        try:
            params = self._decode_params(request)
            data = await self._body(request)
            self._check_header(data)
            if params["stream"]:
                return self._stream(data, params, t0)
            out = await self.decoder.decode.remote(data, params["mode"], params["seed"], params["steps"],
                                                   params["format"])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a problem+json answer
            return self._problem(exc, mode, t0)
        self.metrics.observe_request(params["mode"], 200, time.monotonic() - t0)
        return Response(out["image"], media_type=FORMATS[params["format"]], headers={
            "X-Idemrt-Decode-Seconds": f"{out['seconds']:.4f}", "X-Idemrt-Steps": str(out["steps"]),
            "X-Idemrt-Distance": f"{out['distance']:.6g}", "X-Idemrt-Replica": out["replica"]})

    @api.post("/v1/encode")
    async def encode(self, request: Request):
        t0 = time.monotonic()
        try:
            if request.query_params:
                raise Problem(422, "invalid-parameter", f"unknown parameters {sorted(request.query_params)}")
            out = await self.decoder.encode.remote(await self._body(request))
        except Exception as exc:  # noqa: BLE001
            return self._problem(exc, "encode", t0)
        self.metrics.observe_request("encode", 200, time.monotonic() - t0)
        return Response(out, media_type="application/octet-stream")

    def _stream(self, data, params, t0):
        gen = self.decoder.options(stream=True).decode_stream.remote(data, params["mode"], params["seed"],
                                                                     params["steps"], params["format"])

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

    def _check_header(self, data: bytes) -> None:
        """Reject early what no replica could decode: a malformed, foreign or oversized stream."""
        bs = bsfmt.unpack(data, max_pixels=self.config.max_pixels)
        if (bs.codec, bs.quality) != (self.config.codec, self.config.quality):
            raise Problem(400, "bitstream", f"this file was made with {bs.codec} q{bs.quality}; this server decodes "
                                            f"{self.config.codec} q{self.config.quality}")

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
        return {"codec": c.codec, "quality": c.quality, "unet_preset": c.preset if c.unet else None,
                "modes": list(MODES) if c.unet else ["mse"], "steps_allowed": c.steps_allowed,
                "formats": list(FORMATS), "speed": c.speed or "paper", "sampler": c.sampler, "guidance": c.guidance,
                "max_body_bytes": c.max_body_bytes, "max_pixels": c.max_pixels, "timeout_s": c.timeout_s}

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
            info = await asyncio.wait_for(self.decoder.info.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - report what the ingress knows
            info = {}
        gauges = {"queue_depth": ("Images waiting for a batch slot (one replica).", info.get("waiting", 0)),
                  "running_images": ("Images in running batches (one replica).", info.get("running", 0)),
                  "replica_slot_occupancy": ("Slots used / slots in the last step (one replica).",
                                             info.get("slots_used", 0) / max(1, info.get("slots", 1))),
                  "replica_step_seconds": ("Last batched step (one replica).", info.get("step_seconds", 0.0))}
        return Response(self.metrics.render(gauges), media_type="text/plain; version=0.0.4")


def build_app(config: ServeConfig):
    """The Serve application of ``config`` (what ``serve.run`` and ``serve deploy`` take)."""
    options = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica > 0:
        options["num_gpus"] = config.gpus_per_replica
    decoder = DecoderReplica.options(num_replicas=config.replicas, ray_actor_options=options,
                                     max_ongoing_requests=config.queue + 8).bind(config.to_dict())
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * config.queue).bind(
        decoder, config.to_dict())


def app_builder(args: dict):
    """``serve deploy`` / ``serve run idemrt.serve.app:app_builder``: the application of the
    config's ``args`` (a :class:`ServeConfig` as a dict)."""
    return build_app(ServeConfig(**args))
