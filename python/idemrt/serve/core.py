"""The decode engine core of one service replica (no Ray here): the thread that owns the device.
(Not the top-level ``engine/`` folder, which is the C++ entropy coder.)

One thread — the **core** — does every device operation of the replica: loading the models,
entropy decoding's tensor side, g_s and the constraint target, the warm start, x_T, the steps
and graph captures, previews, the exact refinement and the copy of each image to the host (as an
8-bit array). A preview is the x0 estimate the step computed anyway, reduced on the device and
copied to the host without a sync (:mod:`.previews`): no extra network call. Callers on any
thread (the replica's asyncio loop) only parse and route the bitstream header
(:func:`idemrt.bitstream.route`) and check the request (:func:`idemrt.decode_request.check_request`,
the ingress's check too; the prior by :func:`idemrt.store.choose_prior`), all pure Python, are admitted or refused at once (:class:`~idemrt.errors.QueueFullError`), and
get a :class:`concurrent.futures.Future`; progress and previews reach them through a callback
run on the core thread.

A request is one :class:`DecodeRequest` (a :class:`~idemrt.batching.Job`), made when
it is admitted: it owns its status, its slot and its future (``future.job`` is the request) until
the batcher releases it (:meth:`StepBatcher.end`), exactly once, whichever way it leaves —
finished, cancelled (queued, running or parked), past its deadline, failed in prepare, start,
step, update, finish or a callback, or the engine closed (:class:`EngineClosedError`, a 503).
:meth:`DecodeEngine.reconfigure` only queues the new values; the core applies them between two
steps, in order with the requests submitted around it.

Every allowed (codec, prior, speed, respacing) is a **program**, made by the one factory the
Decoder uses too (:mod:`idemrt.programs`): a :class:`~idemrt.programs.DecodeProgram` (the
config made concrete: table, guidance, warm start, retries) and its
:class:`~idemrt.diffusion.Program` — its rows in a step table, its DPS scale, its warm start.
Programs of one codec and prior with equal step keys (:meth:`DecodeProgram.step_key`: sampler
family, guidance step kind — DPS and DSG stack into one
:class:`~idemrt.diffusion.guidance.StackedGuidance` —, constraint, device, backend settings,
retries, checks) form one **group** (:func:`~idemrt.programs.build_step_group`): one stacked step table, one backend (one set of CUDA graphs), one
:class:`GuidedSampler`. A 1000-step, a 100-step and a warm-started 20-step image of one group then
share a batched step. Images are prepared and finished by functions of the codec and the
program's settings (:func:`idemrt.api.prepare_image`, :func:`~idemrt.api.finish_image`): no
Decoder is built per program. One :class:`~idemrt.batching.StepBatcher` holds the jobs of every
group (priorities, deadlines, the pixel budget, preemption). With ``ServeConfig.tile`` (the default) an
image larger than the prior's native size steps in windows, each window a slot of the iteration's
budget, beside the images of every other size of its group (:mod:`idemrt.diffusion.window_steps`);
:meth:`DecodeEngine.windows` counts them before admission (``max_windows``: 413 past it).

Names: a request's ``steps`` (HTTP and :meth:`DecodeEngine.submit`) is a **respacing**
(``DecodeRequest.respacing``); ``Decoded.evaluations`` counts its network evaluations (the HTTP
answer's "steps"); the batcher's ``iterations`` count batched steps.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import bitstream as bsfmt
from ..api import finish_image, prepare_image, warm_from_target
from ..batching import Job, RequestStatus, StepBatcher, check_budget
from ..decode_request import check_request
from ..diffusion.tiling import window_count
from ..errors import EngineClosedError, ModelNotFoundError, TooLargeError
from ..models.codec import diffusion_operator
from ..models.prior import prior_traits
from ..programs import DecodeProgram, build_step_group
from ..exact import symbols_equal
from ..images import to_uint8
from ..store import choose_prior
from .config import ServeConfig
from .metrics import EngineMetrics
from .previews import PreviewCopies

log = logging.getLogger(__name__)

NATIVE_PIXELS = 256 * 256  # an image at the shipped UNets' training size: the pixel budget's unit
# While steps run, the queue gauges are refreshed at most this often: reading them walks every held
# request (about 0.15 ms an iteration at 128 requests on the CPU, 5 % of a zero-cost step), and a
# scrape every few seconds cannot tell 20 Hz from every step. An idle core refreshes them at once.
GAUGE_PERIOD_S = 0.05


@dataclass
class Decoded:
    image: torch.Tensor  # (1, 3, H, W) in [0, 1] on the CPU, cropped to the stored size
    pixels: np.ndarray  # the same as 8-bit (H, W, 3): what the service encodes, without torch
    distance: float  # final constraint distance (0 for MSE decodes)
    evaluations: int  # network evaluations of the program (0 for MSE decodes): the HTTP API's "steps"
    seconds: float  # from submission to the result
    speed: str = "mse"
    symbols_equal: float = 0.0  # fraction of latent symbols the 8-bit image re-encodes to (1: idempotent)
    windows: int = 1  # the windows its prior ran in (1: the whole image, or an MSE decode)


@dataclass(eq=False)
class DecodeRequest(Job):
    """One decode, from admission to release (see the module doc); its future resolves to
    :class:`Decoded`."""

    bitstream: Optional[bsfmt.Bitstream] = None
    mode: str = "perceptual"
    seed: int = 0
    speed: str = "mse"
    respacing: Optional[str] = None  # the program's respacing (the HTTP steps=), None for an MSE decode
    on_event: Optional[Callable[[dict], None]] = None
    codec: Optional[str] = None  # the id of the codec that decodes it (None: the one codec without a store)
    prior: Optional[str] = None  # the id of its prior (a model store's; None without a store)
    windows: int = 1  # the windows its image steps in (DecodeEngine.windows; 1: the whole image)

    @property
    def program_key(self) -> tuple:
        return (self.codec, self.prior, self.speed, self.respacing)


class _Call:
    """A function the core runs between two steps (device work that is not a decode, or a
    reconfiguration). ``admitted``: it holds a reservation of the queue (given back when done)."""

    def __init__(self, fn, admitted: bool = True):
        self.fn, self.future, self.admitted = fn, Future(), admitted

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as exc:  # noqa: BLE001 - the caller's error
            self.future.set_exception(exc)


def load_models(config: ServeConfig, device: str):
    """(codec, unet) from the server's configuration: files named there, never by a client."""
    from ..models.codec_loading import load_codec

    codec = load_codec(config.codec, quality=config.quality, checkpoint=config.codec_checkpoint,
                       pretrained=config.pretrained_codec, device=device)
    unet = None
    if config.unet:
        from ..models.unet_loading import load_unet

        unet = load_unet(config.unet, preset=None if config.unet_overrides else config.preset,
                         **config.unet_overrides)
    return codec, unet


def load_store(config: ServeConfig, device: str):
    """``(codecs, priors, unavailable)`` of the model store ``config.models`` (docs/model_store.md):
    every model that verifies, by id, and the rows of those that do not (with the reason)."""
    from ..store import ModelStore

    store = ModelStore(config.models, device=device)
    store.verify()
    loaded = {e.id: e.get(device) for e in store.entries.values() if e.available}
    by_kind = {kind: {e.id: loaded[e.id] for e in store.of_kind(kind) if e.id in loaded}
               for kind in ("codec", "prior")}
    unavailable = [{**r, "reason": (r["reason"] or "").replace(store.root, "STORE")}  # no server paths
                   for r in store.rows() if r["status"] != "available"]
    return by_kind["codec"], by_kind["prior"], unavailable


class DecodeEngine:
    """See the module doc. ``codec``/``unet``: models already loaded (tests); else the config's."""

    def __init__(self, config: ServeConfig, codec=None, unet=None, *, device: Optional[str] = None):
        self.config = config
        self.device = device or config.device
        self.metrics = EngineMetrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Lock()  # admission + inbox put vs close(): nothing enters after close
        self._closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._init_error: Optional[BaseException] = None
        self.core_thread_id: Optional[int] = None
        self._thread = threading.Thread(target=self._run, args=(codec, unet), name="idemrt-engine-core", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    # -- built on the core thread -----------------------------------------------------------------
    def _build(self, codec, unet) -> None:
        config = self.config
        self.unavailable: list = []  # a model store's models that did not verify
        if config.models:
            codecs, priors, self.unavailable = load_store(config, self.device)
            if not codecs:
                raise ModelNotFoundError(f"the model store {config.models} has no available codec")
        else:
            if codec is None:
                codec, unet = load_models(config, self.device)
            codecs, priors = {None: codec}, ({} if unet is None else {None: unet})
        self.codecs, self.priors = codecs, priors
        self.default_prior = config.prior if config.models else None  # the configured one (store.choose_prior)
        # (codec id, prior id, speed, respacing) -> (DecodeProgram, Program, GuidedSampler); ids are None without a store.
        self.programs: dict = {}
        self.weights_hashes: dict = {}  # codec id -> weights_hash (cached: routing then does no torch work)
        self.groups = []
        for codec_id, codec in codecs.items():
            codecs[codec_id] = codec = codec.to(self.device)
            self.weights_hashes[codec_id] = codec.weights_hash()
            for prior_id, unet in priors.items():
                unet = unet.to(self.device)
                by_group: dict = {}  # programs of one codec and one prior share a step function, never across
                for speed in config.speeds_allowed:
                    for respacing in config.steps_for(speed):
                        program = DecodeProgram.build(config.decode_config(speed, respacing), unet, self.device)
                        key = (codec_id, prior_id, speed, respacing)
                        by_group.setdefault(program.step_key(), []).append((key, program))
                for members in by_group.values():
                    group = build_step_group([p for _, p in members], unet, codec,
                                             names=[f"{key[2]}/{key[3]}" for key, _ in members])
                    self.groups.append(group.sampler)
                    for (key, p), program in zip(members, group.programs):
                        self.programs[key] = (p, program, group.sampler)
        first_id = next(iter(codecs))
        self.codec = codecs[first_id]  # the first codec: /v1/encode's without a store
        self.weights_hash = self.weights_hashes[first_id]
        self.identities = {cid: bsfmt.CodecIdentity(c.name, c.quality, bytes(self.weights_hashes[cid]))
                           for cid, c in codecs.items()}  # what bitstream.route compares a header with
        sizes = [prior_traits(u).image_size for u in priors.values()]
        native = max((s for s in sizes if s), default=None)
        self.native_pixels = int(native) ** 2 if native else NATIVE_PIXELS
        self._memory_pixels = None  # on CUDA: what the free memory holds, measured once
        self.previews = PreviewCopies(config.preview_size)
        self.batcher = StepBatcher(max_slots=config.max_slots, max_queue=config.queue,
                                       slot_counts=self._slot_counts(), pixel_budget=self._pixel_budget(),
                                       policy=config.batching, batch_wait_s=config.batch_wait_s)

    def _slot_counts(self):
        counts = [g.backend.slot_counts for g in self.groups]  # declared (backends.base.Backend)
        return next((c for c in counts if c), None)

    def _pixel_budget(self) -> int:
        """The configured budget, or max_slots images of the UNet's native size — on CUDA no more
        than the measured memory allows (:meth:`_memory_budget`)."""
        if self.config.pixel_budget:
            return int(self.config.pixel_budget)
        budget = self.config.max_slots * self.native_pixels
        if self._memory_pixels is None and torch.device(self.device).type == "cuda" and self.groups:
            self._memory_pixels = self._memory_budget()
        return budget if self._memory_pixels is None else max(self.native_pixels, min(budget, self._memory_pixels))

    def _memory_budget(self) -> int:
        """Pixels whose guided steps fit in 80 % of the device's free memory: one warm-up step per
        step function at batch 1 and the native size measures the peak bytes per pixel (batch-1
        overheads make this conservative); the warm-up also captures those graphs."""
        side = int(round(self.native_pixels ** 0.5))
        shape, per_pixel = (1, 3, side, side), 0.0
        for sampler in self.groups:
            (codec_id, _, _, _), (plan, program, _) = next((k, v) for k, v in self.programs.items() if v[2] is sampler)
            codec, constraint = self.codecs[codec_id], plan.config.constraint
            with torch.no_grad():
                target = diffusion_operator(codec, constraint)(torch.rand(shape, device=self.device) * 2 - 1)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            state = sampler.start(target, 0, shape, warm=warm_from_target(codec, target, constraint, plan.warm_start),
                                  program=program)
            sampler.advance([state])
            sampler.release(state)
            torch.cuda.synchronize(self.device)
            per_pixel = max(per_pixel, (torch.cuda.max_memory_allocated(self.device) - base) / (side * side))
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(0.8 * free / max(per_pixel, 1.0))

    # -- any thread ------------------------------------------------------------------------------
    def _route(self, data) -> tuple:
        """``(bitstream, codec id)`` (:func:`idemrt.bitstream.route`, pure Python: the weights hashes
        were computed on the core when the engine was built). BitstreamError / TooLargeError; with
        a model store, ModelNotFoundError naming the codec the stream needs."""
        bs = bsfmt.parse(data, max_pixels=self.config.max_pixels)
        return bs, bsfmt.route(bs, self.identities, where="this server", store=bool(self.config.models))

    def _served_default(self):
        """The prior a request without ``prior=`` gets (:func:`idemrt.store.choose_prior`), or None."""
        try:
            return choose_prior(self.priors, None, self.default_prior)
        except ModelNotFoundError:
            return None

    def models(self) -> dict:
        """What a model store gave this engine: ``{"codecs", "priors", "unavailable"}`` (ids and facts,
        no file paths); empty lists without a store."""
        if not self.config.models:
            return {"codecs": [], "priors": [], "unavailable": []}
        codecs = [{"id": cid, "codec": c.name, "quality": c.quality, "weights_digest": self.weights_hashes[cid].hex()}
                  for cid, c in self.codecs.items()]
        default = self._served_default()
        priors = [{"id": pid, "image_size": prior_traits(u).image_size, "default": pid == default}
                  for pid, u in self.priors.items()]
        return {"codecs": codecs, "priors": priors, "unavailable": list(self.unavailable)}

    def submit(self, data, *, mode: str = "perceptual", seed: int = 0, speed: Optional[str] = None,
               steps: Optional[str] = None, priority: int = 0, timeout: Optional[float] = None,
               on_event: Optional[Callable[[dict], None]] = None, prior: Optional[str] = None) -> Future:
        """Queue one decode (``data``: the .idm bytes or a parsed Bitstream); the Future resolves to
        :class:`Decoded`. Raises at once what can be known at once: a bad or foreign bitstream, an
        unknown program, a full queue. ``steps``: a respacing ``speed`` allows (default: its first).
        ``on_event`` receives ``{"event": "progress", "step", "steps"}`` (network evaluations done and
        in all) and ``{"event": "preview", "step", "image": (h, w, 3) uint8}`` on the core thread.
        ``prior``: with a model store, the id of the prior (default: the server's ``prior``)."""
        bs, codec_id = self._route(data)
        # the ingress's and the API's check too (InvalidParameterError, a ValueError)
        req = check_request(mode, choices=self.config, speed=speed, steps=steps, seed=seed, priority=priority)
        perceptual = mode == "perceptual"
        prior_id = choose_prior(self.priors, prior, self.default_prior) if perceptual else None
        timeout = self.config.timeout_s if timeout is None else float(timeout)
        request = DecodeRequest(priority=req["priority"], bitstream=bs, mode=mode, seed=req["seed"],
                                speed=req["speed"] if perceptual else "mse", respacing=req["steps"],
                                on_event=on_event, codec=codec_id, prior=prior_id)
        request.deadline = request.submitted + timeout
        if perceptual:
            request.windows = self._check_windows(request)
        self._enqueue(request, lambda: self.batcher.admit(request))  # QueueFullError when full
        return request.future

    def windows(self, request: DecodeRequest) -> int:
        """The windows a perceptual request's image steps in (1 if it is not tiled); pure Python."""
        windows = self.programs[request.program_key][2].windows
        bs = request.bitstream
        if windows is None:
            return 1
        return window_count(bs.padded_height, bs.padded_width, windows.tiled.window, windows.tiled.stride)

    def _check_windows(self, request: DecodeRequest) -> int:
        """The request's windows, or TooLargeError (413) for more than ``max_windows``."""
        n = self.windows(request)
        if n > self.config.max_windows:
            bs = request.bitstream
            raise TooLargeError(f"a {bs.width}x{bs.height} image decodes in {n} windows; this server takes at "
                                f"most {self.config.max_windows} per image")
        return n

    def encode(self, image, codec: Optional[str] = None) -> Future:
        """Compress an image (bytes, path, PIL, ...) with this server's codec (with a model store:
        the codec of id ``codec``, needed when the store has several), on the core: a Future of the
        .idm bytes. Admitted like a decode (it is device work too)."""
        from ..api import Encoder
        from ..images import load_image

        if codec is None and len(self.codecs) == 1:
            codec = next(iter(self.codecs))
        if codec not in self.codecs:
            known = ", ".join(str(c) for c in self.codecs)
            what = "choose the codec with codec=ID" if codec is None else f"no codec {str(codec)[:40]!r}"
            raise ModelNotFoundError(f"{what}; this server's codecs: {known}", model_id=codec)
        model = self.codecs[codec]

        def run():
            return Encoder(model).encode(load_image(image, max_pixels=self.config.max_pixels))

        call = _Call(run)
        self._enqueue(call, self.batcher.admit)
        return call.future

    def reconfigure(self, *, max_slots: Optional[int] = None, queue: Optional[int] = None,
                    pixel_budget: Optional[int] = None) -> None:
        """Change the tunables that need no restart (Ray Serve's ``user_config``). Checks the values
        (ValueError at once for bad ones) and queues them; the core applies them between two steps,
        after the requests submitted before and before those submitted after. Returns once they
        are applied (this thread does no torch work: on CUDA the budget's measurement runs on the core)."""
        c = self.config
        check_budget(c.max_slots if max_slots is None else max_slots, c.queue if queue is None else queue,
                     (c.pixel_budget if pixel_budget is None else pixel_budget) or 0)
        new = {"max_slots": max_slots, "queue": queue, "pixel_budget": pixel_budget}
        values = {k: int(v) for k, v in new.items() if v is not None}
        call = _Call(lambda: self._apply_config(values), admitted=False)
        self._enqueue(call, lambda: None)
        while not wait([call.future], timeout=1.0).done:  # the core applies it after its current step
            if not self.alive:
                raise RuntimeError("the engine's core is not running")
        call.future.result()

    def _apply_config(self, values: dict) -> None:
        """On the core: the new tunables in the config and the batcher's budget."""
        for name, value in values.items():
            setattr(self.config, name, value)
        self.batcher.configure(max_slots=self.config.max_slots, max_queue=self.config.queue,
                                 pixel_budget=self._pixel_budget())

    def _enqueue(self, item, admit) -> None:
        """Admit ``item`` (``admit()`` raises if it cannot be) and hand it to the core — refused
        with EngineClosedError once the engine is closing, so nothing is left in the inbox."""
        with self._closing:
            if self._closed:
                raise EngineClosedError("the decode engine is shutting down")
            admit()
            self._inbox.put(item)
        self._wake.set()

    def stats(self) -> dict:
        s = self.batcher.stats()
        return {**s, "slots": self.config.max_slots, "inbox": self._inbox.qsize()}

    @property
    def alive(self) -> bool:
        """Whether the core runs (a replica whose core died is unhealthy)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the core. Every request not yet done resolves with :class:`EngineClosedError`."""
        with self._closing:
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    # -- the core ----------------------------------------------------------------------------------
    def _run(self, codec, unet) -> None:
        self.core_thread_id = threading.get_ident()
        try:
            self._build(codec, unet)
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self._init_error = exc
            self._ready.set()
            return
        self._ready.set()
        gauges_at = -math.inf
        while not self._stop.is_set():
            worked, out = self._take_requests(), None
            try:
                out = self.batcher.plan()
                if out.run:
                    self.batcher.execute(out)
                    self.batcher.update_from_output(out)
                    self.metrics.observe_step(self.batcher.step_seconds, sum(j.pixels for j in out.stepped),
                                              len(out.stepped), len(out.preempted))
                worked |= bool(out.run or out.left)
                self.metrics.observe_deadline_misses(sum(1 for _, s in out.left if s is RequestStatus.DEADLINE))
            except Exception as exc:  # noqa: BLE001 - fail the images of this step, keep serving the others
                log.exception("decode step failed")
                self.batcher.fail([] if out is None else out.run, exc)
                worked = True
            self.previews.deliver()
            if not worked or time.monotonic() - gauges_at >= GAUGE_PERIOD_S:
                self.metrics.set_gauges(self.batcher.stats(), self._inbox.qsize())
                gauges_at = time.monotonic()
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        """On the core, after the loop: every request and call still queued or in flight resolves
        with EngineClosedError (close() let nothing new in)."""
        closed = EngineClosedError("the decode engine shut down")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                item.future.set_exception(closed)
                if item.admitted:
                    self.batcher.release()
        self.batcher.close(closed)  # the requests: admitted jobs, started or not

    def _take_requests(self) -> bool:
        took = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return took
            took = True
            if isinstance(item, _Call):
                item.run()
                if item.admitted:
                    self.batcher.release()
                continue
            status = item.due(time.monotonic())
            if status is not None:  # cancelled or past its deadline while queued
                self.batcher.end(item, status)
                self.metrics.observe_deadline_misses(int(status is RequestStatus.DEADLINE))
                continue
            try:
                self._start(item)
            except Exception as exc:  # noqa: BLE001 - this request fails, the service goes on
                self.batcher.end(item, RequestStatus.FAILED, error=exc)

    def _start(self, request: DecodeRequest) -> None:
        """Prepare a request (entropy decode, target, warm start) and start its sampling; an MSE
        decode ends here."""
        codec = self.codecs[request.codec]
        if request.mode == "mse":
            prepared = prepare_image(codec, request.bitstream, request.seed, "mse")
            self.batcher.end(request, RequestStatus.FINISHED, result=self._decoded(request, None, prepared, None))
            return
        plan, program, sampler = self.programs[request.program_key]
        prepared = prepare_image(codec, request.bitstream, request.seed, constraint=plan.config.constraint,
                                 warm_start=plan.warm_start)
        request.sampler = sampler
        request.finish = lambda result: self._decoded(request, plan, prepared, result)
        request.on_step = None if request.on_event is None else self._reporter(request)
        self.batcher.start(request, prepared.target, prepared.seed, prepared.shape, warm=prepared.warm,
                             program=program)

    def _decoded(self, request: DecodeRequest, plan: Optional[DecodeProgram], prepared, result) -> Decoded:
        """Everything after sampling (exact refinement, crop, the host copy as 8-bit, the
        re-compression check), on the core. ``plan``/``result``: None for an MSE decode."""
        codec = self.codecs[request.codec]
        image, _ = finish_image(codec, prepared, result, exact=plan is not None and plan.config.exact)
        pixels = to_uint8(image)
        seconds = time.monotonic() - request.submitted
        evaluations = 0 if result is None else plan.evaluations
        self.metrics.observe_decode(request.speed, seconds)
        return Decoded(image, pixels, 0.0 if result is None else result.distance, evaluations, seconds, request.speed,
                       self._recompressed(pixels, prepared.y_hat, codec), request.windows)

    def _recompressed(self, pixels: np.ndarray, y_hat: torch.Tensor, codec=None) -> float:
        """The re-compression check of what the client receives: the fraction of latent symbols
        that the 8-bit image, padded as an encoder pads it, quantizes to (one g_a of its codec)."""
        codec = self.codec if codec is None else codec
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(codec.device, torch.float32).div_(255)
        return symbols_equal(codec, codec.pad(x)[0], y_hat)

    def _reporter(self, request: DecodeRequest):
        evaluations = self.programs[request.program_key][0].evaluations
        every = self.config.preview_every or max(1, evaluations // 10)
        bs = request.bitstream

        def report(job) -> None:
            state = job.state
            done = state.evaluations
            request.on_event({"event": "progress", "step": done, "steps": evaluations,  # the stream's names
                              "windows": request.windows})
            if state.running and done % every == 0:  # the step's own x0 estimate (no network call)
                self.previews.add(state.x0[..., : bs.height, : bs.width],
                                  lambda image: request.on_event({"event": "preview", "step": done, "image": image}))

        return report
