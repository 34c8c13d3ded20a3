"""The product API: ``Encoder`` writes an ``.idm`` bitstream, ``Decoder`` reads it back.

Data flows one way: bitstream -> entropy decode -> y_hat -> target -> guided sampler -> image.
The Decoder only wires these together: the step is :mod:`idemrt.diffusion.step`'s, the loop
(per-image state, noise order, retries) :class:`idemrt.diffusion.GuidedSampler`'s, the bytes
:mod:`idemrt.bitstream`'s and how a step runs the backend's (:mod:`idemrt.backends`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import bitstream as bsfmt
from .defaults import resolve_device
from .batching import StepBatcher, sample_jobs
from .diffusion import SAMPLERS, GuidedSampler, diffusion_process
from .errors import BitstreamError
from .exact import exact_idempotence
from .images import load_image, to_pil
from .models.codec import diffusion_operator
from .programs import DecodeProgram, StepFunction, build_step_function, group_sampler
from .decode_config import DecodeConfig
from .decode_request import check_request
from .speeds import decode_config, speed_name

__all__ = ["Decoder", "DecodeStats", "Encoder", "Prepared", "entropy_decode", "read_bitstream"]


class Encoder:
    """Compress images with an MSE codec into ``.idm`` bitstreams."""

    def __init__(self, codec):
        self.codec = codec

    @torch.no_grad()
    def encode(self, image) -> bytes:
        """``image``: PIL image, uint8 HxWx3 array, float tensor in [0, 1], path or bytes."""
        codec = self.codec
        x = load_image(image).to(codec.device)
        padded, _ = codec.pad(x)
        latent = codec.compress(padded)
        return bsfmt.pack(bsfmt.Bitstream(
            codec=codec.name, quality=codec.quality, weights_hash=codec.weights_hash(),
            height=int(x.shape[-2]), width=int(x.shape[-1]),
            padded_height=int(padded.shape[-2]), padded_width=int(padded.shape[-1]),
            streams=list(latent.strings), latent_shape=tuple(int(s) for s in latent.shape),
        ))


@dataclass
class DecodeStats:
    """Facts about the last decode (per image where it makes sense)."""

    distance: list = field(default_factory=list)  # final constraint distance per image
    retries: list = field(default_factory=list)  # distance retries used per image
    scales: list = field(default_factory=list)  # DPS scale of each image's final attempt
    timings: dict = field(default_factory=dict)  # seconds: entropy_decode, sample, total
    steps: int = 0  # network evaluations per image (the steps run: fewer than the schedule's with a warm start)
    exact: list = field(default_factory=list)  # with exact=True: per image {"before", "after", "steps"}

    @classmethod
    def for_images(cls, n: int) -> DecodeStats:
        return cls(distance=[0.0] * n, retries=[0] * n, scales=[None] * n)


@dataclass
class Prepared:
    """One bitstream made ready to sample (:meth:`Decoder.prepare`): everything before the loop."""

    bitstream: bsfmt.Bitstream
    y_hat: torch.Tensor  # the entropy-decoded latent
    target: Optional[torch.Tensor]  # the constraint target (None for an MSE decode)
    warm: Optional[torch.Tensor]  # the warm start's x_mse in [-1, 1], or None
    seed: int

    @property
    def shape(self) -> tuple:
        """The sampled image's shape (1, 3, H, W), padded."""
        return (1, 3, self.bitstream.padded_height, self.bitstream.padded_width)


class Decoder:
    """Decode ``.idm`` bitstreams to the MSE image or to a perceptual image.

    The perceptual decode samples the UNet's diffusion process under the idempotence constraint
    (``constraint="x"``: ||2·g_s(round(g_a(x0)))-1 - (2·g_s(y_hat)-1)||, target unclamped as in the
    reference; ``"y"``: ||round(g_a(x0)) - y_hat||). ``speed``: a preset of :data:`idemrt.speeds.SPEEDS`
    (default "paper": DPS, 1000 steps) that ``steps``, ``sampler``, ``guidance`` (:data:`SAMPLERS`,
    ``GUIDANCE`` or "none"), ``scale`` (DPS's), ``start`` (warm start from the MSE decode at t0 =
    round(start·T), T the prior's training steps, 1000 for ADM; 1: pure noise) and ``guidance_options``
    (e.g. PIR's iters, lam, zeta) override; ``interval``: DSG's, ``eta``: DDIM's. ``exact``: refine
    each image until it re-encodes to the received latent (:mod:`idemrt.exact`; ``last.exact``).
    ``deterministic``: each image's step is its own backend call, so its result does not depend on
    the other images of its batch (see :class:`idemrt.diffusion.GuidedSampler`; slower).

    ``config``: a :class:`~idemrt.decode_config.DecodeConfig` holding all of these at once, or a preset
    name (default: "paper"). The loose keyword arguments (``speed``, ``steps``, ``sampler``, ...) are
    deprecated aliases (a DeprecationWarning) that override it. ``decoder.config`` is the resolved
    configuration (``Decoder(codec, unet, config=decoder.config)`` decodes the same).

    ``unet``: an ADM UNet or a diffusers prior (:func:`idemrt.load_unet` of a folder); the schedule,
    prediction and variance types the samplers use are the prior's
    (:func:`idemrt.diffusion.diffusion_process`), ``steps`` a respacing of its training steps."""

    def __init__(self, codec, unet=None, steps: int | str | None = None, sampler: Optional[str] = None,
                 guidance: Optional[str] = None, scale: Optional[float] = None, constraint: Optional[str] = None,
                 device=None, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None, *,
                 config: DecodeConfig | str | None = None, speed: Optional[str] = None, start: Optional[float] = None,
                 exact: Optional[bool] = None, guidance_options: Optional[dict] = None,
                 backend_options: Optional[dict] = None, noise_device=None, eta: Optional[float] = None,
                 interval: Optional[int] = None, max_retries: Optional[int] = None,
                 retry_threshold: Optional[float] = None, nan_retries: Optional[int] = None,
                 check_every: Optional[int] = None, progress: bool = False,
                 max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS, deterministic: Optional[bool] = None):
        cfg = self.config = decode_config(
            config, owner="Decoder", speed=speed, steps=steps, sampler=sampler, guidance=guidance, scale=scale,
            start=start, guidance_options=guidance_options, exact=None if exact is None else bool(exact),
            constraint=constraint, dtype=dtype, backend=backend, backend_options=backend_options, eta=eta,
            interval=interval, max_retries=max_retries, retry_threshold=retry_threshold, nan_retries=nan_retries,
            check_every=check_every, deterministic=None if deterministic is None else bool(deterministic))
        # the preset the config came from, if any
        self.speed = config if isinstance(config, str) else None if config is not None else speed_name(speed)
        self.start, self.exact, self.constraint = cfg.start, cfg.exact, cfg.constraint
        self.device = resolve_device(device)
        self.codec = codec.to(self.device)
        self.unet = unet.to(self.device) if unet is not None else None  # None: MSE decodes only
        self.operator = diffusion_operator(self.codec, cfg.constraint)  # A(x0) in the target's units
        # The config made concrete for this prior (idemrt.programs, the one factory, the engine's too): the
        # prior's diffusion (an ADM UNet's: 1000 linear steps; a diffusers folder's: its scheduler config)
        # respaced by ``steps``, the warm start, the sampler's table, the guidance, the retry policy.
        self.program = p = DecodeProgram.build(cfg, self.unet, self.device)
        self.process, self.schedule, self.warm_start, self.sampler = p.process, p.schedule, p.warm_start, p.sampler
        self.guidance, self.retry, self.steps_run = p.guidance, p.retry, p.steps_run
        self.check_every, self.progress, self.max_pixels = cfg.check_every, progress, max_pixels
        self.deterministic = cfg.deterministic
        self.backend_name, self.backend_options, self.dtype = p.backend_name, dict(cfg.backend_options), p.dtype
        self.noise_device = torch.device(noise_device) if noise_device is not None else self.device
        self._backend, self._lock, self._local = None, threading.Lock(), threading.local()

    @property
    def last(self) -> DecodeStats:
        """Facts about this thread's last decode (each thread sees its own)."""
        if not hasattr(self._local, "stats"):
            self._local.stats = DecodeStats()
        return self._local.stats

    @property
    def backend(self):
        """The backend running this decoder's steps (created on first use; shared by threads)."""
        if self.unet is None:
            raise ValueError("this Decoder has no UNet: only mode='mse' decodes are possible")
        with self._lock:
            if self._backend is None:
                self._backend = build_step_function([self.program], self.unet, self.codec).backend
            return self._backend

    def guided_sampler(self) -> GuidedSampler:
        """Per-image sampling over this decoder's backend (what a step batcher drives)."""
        fn = StepFunction(self.backend, self.schedule.num_steps, [0])
        return group_sampler(fn, [self.program], noise_device=self.noise_device).sampler

    def batcher(self, max_slots: int = 16, max_queue: int = 256) -> StepBatcher:
        """A step batcher (continuous batching) over this decoder: see :mod:`idemrt.batching`."""
        return StepBatcher(self.guided_sampler(), max_slots=max_slots, max_queue=max_queue)

    def step(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor, scale=None):
        """One guided step, a pure function: ``(x_prev, distance)`` with distance per sample (N,), and
        the step's x0 estimate as ``.x0`` (:class:`~idemrt.diffusion.step.StepResult`); ``i`` an int or
        one per sample, ``scale`` None or the (N,) DPS scales."""
        return self.backend.step(x_t, i, target, noise, scale)

    def target_from_latent(self, y_hat: torch.Tensor, constraint: Optional[str] = None) -> torch.Tensor:
        """The constraint target the reference forms: unclamped 2·g_s(y_hat) - 1, or y_hat itself."""
        return target_from_latent(self.codec, y_hat, constraint or self.constraint)

    def warm_from_target(self, target: torch.Tensor) -> Optional[torch.Tensor]:
        """The warm start's x_mse in [-1, 1] (2·g_s(y_hat) - 1, clamped) from a target; None without one."""
        return warm_from_target(self.codec, target, self.constraint, self.warm_start)

    def sample(self, target: torch.Tensor, seed=None, x_T: Optional[torch.Tensor] = None, shape=None):
        """Run the guided sampler for a batch of targets: ``(x, distance)``, x in [-1, 1] fp32.

        ``seed``: an int (one image; consecutive seeds for a batch) or one int per image.
        ``shape``: the image shape (N, 3, H, W), needed with ``constraint="y"``. Retries and the
        noise order: :class:`~idemrt.diffusion.GuidedSampler`."""
        if shape is None and self.constraint != "x":
            raise ValueError("shape is required with constraint='y'")
        target, n = target.to(self.device), target.shape[0]
        stats = self._local.stats = DecodeStats.for_images(n)
        xs = _sample(self, list(target.split(1)), _seeds(seed, n), [(1, *(shape or target.shape)[1:])] * n,
                     [None] * n if x_T is None else list(x_T.split(1)), stats)
        return torch.cat(xs), torch.tensor(stats.distance)

    def decode(self, bitstream, seed=None, mode: str = "perceptual", output: str = "pil"):
        """Decode one bitstream. ``mode``: "perceptual" or "mse"; ``output``: "pil" or "tensor"."""
        return self.decode_batch([bitstream], seeds=None if seed is None else [seed], mode=mode, output=output)[0]

    def decode_batch(self, bitstreams: Sequence, seeds=None, mode: str = "perceptual", output: str = "pil"):
        """Decode several bitstreams; images of the same padded size run as one batch."""
        check_request(mode, output=output)  # the ingress's and the engine's check too
        t0 = time.perf_counter()
        parsed = [read_bitstream(self.codec, b, self.max_pixels) for b in bitstreams]
        prepared = [self.prepare(bs, seed, mode) for bs, seed in zip(parsed, _seeds(seeds, len(parsed)))]
        t1 = time.perf_counter()
        stats = self._local.stats = DecodeStats.for_images(len(parsed))
        results = [None] * len(prepared)
        if mode == "perceptual":
            results = _sample_results(self, [(p.target, p.seed, p.shape, None, p.warm) for p in prepared], stats)
        images = [self.finish(p, r) for p, r in zip(prepared, results)]
        t2 = time.perf_counter()
        stats.exact = [extra for _, extra in images if extra is not None]
        stats.timings = {"entropy_decode": t1 - t0, "sample": t2 - t1, "total": time.perf_counter() - t0}
        return [to_pil(img) if output == "pil" else img for img, _ in images]

    # -- the two halves around the sampling loop (Decoder.decode_batch and the decode service) -------
    @torch.no_grad()
    def prepare(self, bitstream, seed: int = 0, mode: str = "perceptual") -> Prepared:
        """Everything before the loop: the parsed bitstream (bytes are parsed here, a
        :class:`~idemrt.bitstream.Bitstream` is taken as parsed), its latent, and for a perceptual
        decode the constraint target and the warm start."""
        return prepare_image(self.codec, bitstream, seed, mode, constraint=self.constraint,
                             warm_start=self.warm_start, max_pixels=self.max_pixels)

    def finish(self, prepared: Prepared, result=None) -> tuple:
        """Everything after the loop: ``(image (1, 3, H, W) in [0, 1] on the CPU, cropped to the stored
        size; exact-refinement facts or None)``. ``result``: the sampler's
        :class:`~idemrt.batching.JobResult`, or None for the MSE decode."""
        return finish_image(self.codec, prepared, result, exact=self.exact)


# -- the two halves as functions of the codec and the program's settings (the engine calls them too) ------
@torch.no_grad()
def prepare_image(codec, bitstream, seed: int = 0, mode: str = "perceptual", *, constraint: str = "x",
                  warm_start=None, max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS) -> Prepared:
    """:meth:`Decoder.prepare` of a decoder of ``codec`` with this constraint and warm start."""
    bs = bitstream if isinstance(bitstream, bsfmt.Bitstream) else read_bitstream(codec, bitstream, max_pixels)
    y_hat = entropy_decode(codec, bs)
    target = target_from_latent(codec, y_hat, constraint) if mode == "perceptual" else None
    warm = None if target is None else warm_from_target(codec, target, constraint, warm_start)
    return Prepared(bs, y_hat, target, warm, int(seed))


def finish_image(codec, prepared: Prepared, result=None, *, exact: bool = False) -> tuple:
    """:meth:`Decoder.finish` of a decoder of ``codec`` (``exact``: its exact refinement)."""
    bs, extra = prepared.bitstream, None
    if result is None:
        with torch.no_grad():  # frozen codec: no graph
            image = codec.synthesis(prepared.y_hat).clamp_(0, 1)
    else:
        image = ((result.x + 1) / 2).clamp_(0, 1)
        if exact:
            r = exact_idempotence(codec, image, prepared.y_hat)
            image, extra = r.x, {"before": r.before, "after": r.after, "steps": r.steps}
    return image[..., : bs.height, : bs.width].float().cpu(), extra


@torch.no_grad()
def target_from_latent(codec, y_hat: torch.Tensor, constraint: str) -> torch.Tensor:
    """The constraint target the reference forms: unclamped 2·g_s(y_hat) - 1, or y_hat itself."""
    return 2 * codec.synthesis(y_hat) - 1 if constraint == "x" else y_hat


def warm_from_target(codec, target: torch.Tensor, constraint: str, warm_start) -> Optional[torch.Tensor]:
    """The warm start's x_mse in [-1, 1] (2·g_s(y_hat) - 1, clamped) from a target; None without one."""
    if warm_start is None:
        return None
    return (target if constraint == "x" else target_from_latent(codec, target, "x")).clamp(-1, 1)


def _sample(decoder: Decoder, targets: list, seeds: list, shapes: list, x_Ts: list, stats: DecodeStats) -> list:
    """Samples (1, C, H, W) in [-1, 1] of one target each, through one batcher (images of a size
    share steps, sizes take turns); ``stats`` filled."""
    requests = [(t, s, shape, x_T, decoder.warm_from_target(t))
                for t, s, shape, x_T in zip(targets, seeds, shapes, x_Ts)]
    return [r.x for r in _sample_results(decoder, requests, stats)]


def _sample_results(decoder: Decoder, requests: list, stats: DecodeStats) -> list:
    """The :class:`~idemrt.batching.JobResult` of ``(target, seed, shape, x_T, warm)`` requests."""
    results = sample_jobs(decoder.batcher(len(requests), len(requests)), requests, decoder.progress)
    stats.distance, stats.retries = [r.distance for r in results], [r.retries for r in results]
    stats.scales, stats.steps = [r.scale for r in results], decoder.steps_run
    return results


def read_bitstream(codec, data, max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS) -> bsfmt.Bitstream:
    """A bitstream (bytes or :class:`~idemrt.bitstream.Bitstream`) checked against ``codec``
    (:func:`idemrt.bitstream.route`: BitstreamError unless ``codec`` made it)."""
    bs = bsfmt.parse(data, max_pixels=max_pixels)
    bsfmt.route(bs, {None: bsfmt.CodecIdentity.of(codec)})
    return bs


@torch.no_grad()
def entropy_decode(codec, bs: bsfmt.Bitstream) -> torch.Tensor:
    """The y_hat of a parsed bitstream; BitstreamError if its streams do not decode."""
    try:
        return codec.decompress_latent(bs.streams, bs.latent_shape)
    except BitstreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad stream
        raise BitstreamError(f"entropy decoding failed: {exc}") from None


def _seeds(seed, n: int) -> list[int]:
    if seed is None:
        return [int(s) for s in torch.randint(0, 2**62, (n,))]
    if isinstance(seed, int):
        if n != 1:
            # One seed for a batch: derive distinct, reproducible per-image seeds.
            return [seed + k for k in range(n)]
        return [seed]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    return seeds
