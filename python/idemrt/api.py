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
from .diffusion import GuidedSampler
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


# The Decoder's deprecated options: its old positional order, and every loose keyword (each a
# DecodeConfig field, or ``speed``, a preset's name). ``device`` was positional, and stays a keyword.
_POSITIONAL = ("steps", "sampler", "guidance", "scale", "constraint", "device", "dtype", "backend")
_DEPRECATED = frozenset(_POSITIONAL) - {"device"} | {
    "speed", "start", "exact", "guidance_options", "backend_options", "eta", "interval", "max_retries",
    "retry_threshold", "nan_retries", "check_every", "deterministic"}


def deprecated_options(args: tuple, options: dict, device=None) -> tuple:
    """``(loose options, device)`` of a Decoder given the old signature's positional ``args`` and
    loose keyword ``options``: what :func:`idemrt.speeds.decode_config` (which warns once, naming
    them) turns into a DecodeConfig. TypeError for an unknown or twice-given option."""
    if len(args) > len(_POSITIONAL):
        raise TypeError(f"Decoder() takes at most {2 + len(_POSITIONAL)} positional arguments")
    named = dict(zip(_POSITIONAL, args))
    twice = sorted(named.keys() & (options.keys() | ({"device"} if device is not None else set())))
    unknown = sorted(options.keys() - _DEPRECATED)
    if twice or unknown:
        raise TypeError(f"Decoder() got {'multiple values for' if twice else 'unexpected'} {twice or unknown}")
    loose = {**options, **named}
    device = loose.pop("device", device)
    for flag in ("exact", "deterministic"):  # a truthy value as the bool the config holds
        loose[flag] = None if loose.get(flag) is None else bool(loose[flag])
    return loose, device


class Decoder:
    """Decode ``.idm`` bitstreams to the MSE image or to a perceptual image.

    The perceptual decode samples the UNet's diffusion process under the idempotence constraint
    (``constraint="x"``: ||2·g_s(round(g_a(x0)))-1 - (2·g_s(y_hat)-1)||, target unclamped as in the
    reference; ``"y"``: ||round(g_a(x0)) - y_hat||). ``config``: a
    :class:`~idemrt.decode_config.DecodeConfig` — the preset, respacing (``steps``), sampler,
    guidance, scale, warm start, exact refinement, backend, retries — or a preset name of
    :data:`idemrt.speeds.SPEEDS` (default: "paper"). ``decoder.config`` is the resolved configuration
    (``Decoder(codec, unet, config=decoder.config)`` decodes the same). The loose keyword arguments of
    earlier releases (``speed``, ``steps``, ``sampler``, ...; :func:`deprecated_options`) still work,
    with a DeprecationWarning, and override ``config``.

    ``unet``: an ADM UNet or a diffusers prior (:func:`idemrt.load_unet` of a folder); the schedule,
    prediction and variance types the samplers use are the prior's
    (:func:`idemrt.diffusion.diffusion_process`), ``steps`` a respacing of its training steps.
    ``steps_run`` (and ``last.steps``): the network evaluations of one image."""

    def __init__(self, codec, unet=None, *args, config: DecodeConfig | str | None = None, device=None,
                 noise_device=None, progress: bool = False, max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS, **deprecated):
        loose, device = deprecated_options(args, deprecated, device)
        cfg = self.config = decode_config(config, owner="Decoder", **loose)
        speed = loose.get("speed")  # the preset the config came from, if any
        self.speed = config if isinstance(config, str) else None if config is not None else speed_name(speed)
        self.device = resolve_device(device)
        self.codec = codec.to(self.device)
        self.unet = unet.to(self.device) if unet is not None else None  # None: MSE decodes only
        self.operator = diffusion_operator(self.codec, cfg.constraint)  # A(x0) in the target's units
        # The config made concrete for this prior by the one factory (idemrt.programs, the engine's too).
        self.program = p = DecodeProgram.build(cfg, self.unet, self.device)
        self.process, self.schedule, self.warm_start, self.sampler = p.process, p.schedule, p.warm_start, p.sampler
        self.guidance, self.retry, self.steps_run, self.dtype = p.guidance, p.retry, p.evaluations, p.dtype
        self.start, self.exact, self.constraint, self.check_every = cfg.start, cfg.exact, cfg.constraint, cfg.check_every
        self.deterministic, self.backend_name, self.backend_options = cfg.deterministic, p.backend_name, dict(
            cfg.backend_options)
        self.progress, self.max_pixels = progress, max_pixels
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
        return _sample_targets(self, target, seed, x_T, shape)

    def decode(self, bitstream, seed=None, mode: str = "perceptual", output: str = "pil"):
        """Decode one bitstream. ``mode``: "perceptual" or "mse"; ``output``: "pil" or "tensor"."""
        return self.decode_batch([bitstream], seeds=None if seed is None else [seed], mode=mode, output=output)[0]

    def decode_batch(self, bitstreams: Sequence, seeds=None, mode: str = "perceptual", output: str = "pil"):
        """Decode several bitstreams; images of the same padded size run as one batch."""
        return _decode_batch(self, bitstreams, seeds, mode, output)

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


def _decode_batch(decoder: Decoder, bitstreams: Sequence, seeds, mode: str, output: str) -> list:
    """:meth:`Decoder.decode_batch`: prepare each, sample the perceptual ones through one batcher,
    finish each; ``decoder.last`` filled."""
    check_request(mode, output=output)  # the ingress's and the engine's check too
    t0 = time.perf_counter()
    parsed = [read_bitstream(decoder.codec, b, decoder.max_pixels) for b in bitstreams]
    prepared = [decoder.prepare(bs, seed, mode) for bs, seed in zip(parsed, _seeds(seeds, len(parsed)))]
    t1 = time.perf_counter()
    stats = decoder._local.stats = DecodeStats.for_images(len(parsed))
    results = [None] * len(prepared)
    if mode == "perceptual":
        results = _sample_results(decoder, [(p.target, p.seed, p.shape, None, p.warm) for p in prepared], stats)
    images = [decoder.finish(p, r) for p, r in zip(prepared, results)]
    t2 = time.perf_counter()
    stats.exact = [extra for _, extra in images if extra is not None]
    stats.timings = {"entropy_decode": t1 - t0, "sample": t2 - t1, "total": time.perf_counter() - t0}
    return [to_pil(img) if output == "pil" else img for img, _ in images]


def _sample_targets(decoder: Decoder, target: torch.Tensor, seed, x_T, shape) -> tuple:
    """:meth:`Decoder.sample`: ``(x, distance)``, one image a target, through one batcher (images of
    a size share steps, sizes take turns); ``decoder.last`` filled."""
    if shape is None and decoder.constraint != "x":
        raise ValueError("shape is required with constraint='y'")
    target, n = target.to(decoder.device), target.shape[0]
    stats = decoder._local.stats = DecodeStats.for_images(n)
    shapes, x_Ts = [(1, *(shape or target.shape)[1:])] * n, [None] * n if x_T is None else list(x_T.split(1))
    requests = [(t, s, sh, x, decoder.warm_from_target(t))
                for t, s, sh, x in zip(target.split(1), _seeds(seed, n), shapes, x_Ts)]
    xs = [r.x for r in _sample_results(decoder, requests, stats)]
    return torch.cat(xs), torch.tensor(stats.distance)


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
