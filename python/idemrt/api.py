"""The product API: ``Encoder`` writes an ``.idm`` bitstream, ``Decoder`` reads it back.

Data flows one way: bitstream -> entropy decode -> y_hat -> x_mse -> guided sampler -> image.

Random numbers (documented order, so a decode is reproducible and the same alone or in a batch):
each image owns one ``torch.Generator`` seeded with its seed, on ``noise_device``. From it the
decoder draws x_T ~ N(0, I) of the padded image shape first, then one noise tensor of the same
shape per step, for i = N-1 down to 0 (the last one is drawn but multiplied by 0, as in the
reference). A retry continues drawing from the same generator. ``noise_device`` defaults to the
decoding device: on a GPU the noise is drawn there (no per-step host work), so the same seed gives
the same noise on every backend of that device; ``noise_device="cpu"`` gives the same noise on
every device (docs/reliability.md).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import bitstream as bsfmt
from .backends.base import StepSpec, create_backend
from .diffusion import DDIMSampler, DDPMSampler, DPS, DSG, RetryPolicy, Schedule
from .errors import BitstreamError, DecodeError
from .images import load_image, to_pil
from .models.codec import diffusion_operator

_SAMPLERS = ("ddpm", "ddim")
_GUIDANCE = ("dps", "dsg", "none")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """Compress images with an MSE codec into ``.idm`` bitstreams."""

    def __init__(self, codec):
        self.codec = codec

    @torch.no_grad()
    def encode(self, image) -> bytes:
        """``image``: PIL image, uint8 HxWx3 array, float tensor in [0, 1], path or bytes."""
        codec = self.codec
        x = load_image(image).to(codec.device)
        height, width = x.shape[-2:]
        padded, _ = codec.pad(x)
        latent = codec.compress(padded)
        bs = bsfmt.Bitstream(
            codec=codec.name,
            quality=codec.quality,
            weights_hash=codec.weights_hash(),
            height=int(height),
            width=int(width),
            padded_height=int(padded.shape[-2]),
            padded_width=int(padded.shape[-1]),
            streams=list(latent.strings),
            latent_shape=tuple(int(s) for s in latent.shape),
        )
        return bsfmt.encode(bs)


@dataclass
class DecodeStats:
    """Facts about the last decode (per image where it makes sense)."""

    distance: list = field(default_factory=list)  # final constraint distance per image
    retries: list = field(default_factory=list)  # retries used per image
    timings: dict = field(default_factory=dict)  # seconds: entropy_decode, sample, total
    steps: int = 0


class Decoder:
    """Decode ``.idm`` bitstreams to the MSE image or to a perceptual image.

    The perceptual decode samples the UNet's diffusion process under the idempotence constraint:
    at every step the x0 prediction, re-encoded by the codec, must reproduce the received code
    (``constraint="x"``: ||2·g_s(round(g_a(x0)))-1 - (2·g_s(y_hat)-1)||, in the diffusion model's
    [-1, 1] units, target unclamped as in the reference; ``constraint="y"``: ||round(g_a(x0)) - y_hat||).
    """

    def __init__(
        self,
        codec,
        unet=None,
        steps: int | str = 1000,
        sampler: str = "ddpm",
        guidance: str = "dps",
        scale: Optional[float] = None,
        constraint: str = "x",
        device=None,
        dtype: Optional[torch.dtype] = None,
        backend: Optional[str] = None,
        *,
        backend_options: Optional[dict] = None,
        noise_device=None,
        eta: float = 1.0,
        max_retries: int = 0,
        retry_threshold: float = 20.0,
        nan_retries: int = 1,
        check_every: int = 10,
        progress: bool = False,
        max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS,
    ):
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {_SAMPLERS}, got {sampler!r}")
        if guidance not in _GUIDANCE:
            raise ValueError(f"guidance must be one of {_GUIDANCE}, got {guidance!r}")
        if constraint not in ("x", "y"):
            raise ValueError(f"constraint must be 'x' or 'y', got {constraint!r}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.codec = codec.to(self.device)
        self.unet = unet.to(self.device) if unet is not None else None  # None: MSE decodes only
        self.constraint = constraint
        self._operator = diffusion_operator(self.codec, constraint)  # A(x0) in the target's domain
        self.progress = progress
        self.max_pixels = max_pixels
        self.schedule = Schedule.create(steps=1000, respacing=steps)
        self.sampler = (
            DDPMSampler(self.schedule) if sampler == "ddpm" else DDIMSampler(self.schedule, eta=eta)
        ).to(self.device)
        if guidance == "dps":
            self.guidance = DPS(scale=0.6 if scale is None else scale)
        elif guidance == "dsg":
            self.guidance = DSG()
        else:
            self.guidance = None
        self.retry = RetryPolicy(threshold=retry_threshold, factor=1.5, max_retries=max_retries)
        self.nan_retries = nan_retries
        self.check_every = max(1, int(check_every))
        # The fast backend (bf16, CUDA graphs) is the default on CUDA; eager (fp32) elsewhere.
        self.backend_name = backend or ("fast" if self.device.type == "cuda" else "eager")
        self.backend_options = dict(backend_options or {})
        self.noise_device = torch.device(noise_device) if noise_device is not None else self.device
        self.dtype = dtype
        self._backends: dict = {}  # guidance -> backend (a retry escalates the scale)
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def last(self) -> DecodeStats:
        """Facts about this thread's last decode (each thread sees its own)."""
        if not hasattr(self._local, "stats"):
            self._local.stats = DecodeStats()
        return self._local.stats

    # -- the math of one step -------------------------------------------------------------
    def _backend_for(self, guidance):
        """The backend running ``guidance`` (created once; a Decoder may be shared by threads)."""
        if self.unet is None:
            raise ValueError("this Decoder has no UNet: only mode='mse' decodes are possible")
        with self._lock:
            backend = self._backends.get(guidance)
            if backend is None:
                spec = StepSpec(
                    unet=self.unet,
                    operator=self._operator if guidance is not None else None,
                    codec=self.codec,
                    domain=self.constraint,
                    sampler=self.sampler,
                    guidance=guidance,
                )
                backend = create_backend(
                    self.backend_name, spec, device=self.device, dtype=self.dtype, **self.backend_options
                )
                self._backends[guidance] = backend
            return backend

    def step(self, x_t: torch.Tensor, i: int, target: torch.Tensor, noise: torch.Tensor):
        """One guided step, a pure function: ``(x_prev, distance)`` with distance per sample (N,)."""
        return self._backend_for(self.guidance).step(x_t, i, target, noise)

    def target_from_latent(self, y_hat: torch.Tensor) -> torch.Tensor:
        """The constraint target the reference forms: unclamped 2·g_s(y_hat) - 1, or y_hat itself."""
        with torch.no_grad():
            return 2 * self.codec.synthesis(y_hat) - 1 if self.constraint == "x" else y_hat

    # -- the loop ---------------------------------------------------------------------------
    def sample(self, target: torch.Tensor, seed=None, x_T: Optional[torch.Tensor] = None, shape=None):
        """Run the guided sampler for a batch of targets.

        ``seed``: an int (one image) or a sequence of ints, one per batch item. ``shape``: the
        image shape (N, 3, H, W) (needed for ``constraint="y"``, where the target is a latent).
        Returns ``(x, distance)``: x in [-1, 1], fp32, distance (N,) of the last step.

        Two kinds of retry, each re-drawing x_T from the image's generator: the reference's
        (final distance above ``retry_threshold`` -> DPS scale x1.5, at most ``max_retries``), and
        non-finite values (-> DPS scale x0.5, at most ``nan_retries``, then :class:`DecodeError`).
        """
        n = target.shape[0]
        if shape is None:
            if self.constraint != "x":
                raise ValueError("shape is required with constraint='y'")
            shape = tuple(target.shape)
        shape = (n, *shape[1:])
        gens = [torch.Generator(self.noise_device).manual_seed(s) for s in _seeds(seed, n)]
        x, dist, failed = self._run_with_nan_retries(self.guidance, target, gens, x_T, shape)
        retries = [0] * n
        guidance = self.guidance
        for attempt in range(self.retry.max_retries):
            bad = self.retry.needs_retry(dist.cpu(), attempt).nonzero().flatten().tolist()
            if not bad or not isinstance(guidance, DPS):  # DSG has no scale to escalate
                break
            guidance = DPS(scale=self.retry.next_scale(guidance.scale))
            sub = (len(bad), *shape[1:])
            xb, db, _ = self._run_with_nan_retries(guidance, target[bad], [gens[b] for b in bad], None, sub)
            for k, b in enumerate(bad):
                x[b], dist[b] = xb[k], db[k]
                retries[b] = attempt + 1
        self.last.distance = [float(d) for d in dist]
        self.last.retries = retries
        return x, dist

    def _run_with_nan_retries(self, guidance, target, gens, x_T, shape):
        """Sample; images that went non-finite are re-sampled with a smaller DPS step."""
        x, dist, bad_at = self._run(self._backend_for(guidance), target, gens, x_T, shape)
        scale = getattr(guidance, "scale", None)
        for _ in range(self.nan_retries):
            bad = [b for b, step in enumerate(bad_at) if step is not None]
            if not bad or scale is None:
                break
            scale = scale * 0.5
            sub = (len(bad), *shape[1:])
            xb, db, bad_b = self._run(self._backend_for(DPS(scale=scale)), target[bad], [gens[b] for b in bad], None, sub)
            for k, b in enumerate(bad):
                x[b], dist[b], bad_at[b] = xb[k], db[k], bad_b[k]
        failed = [(b, step) for b, step in enumerate(bad_at) if step is not None]
        if failed:
            where = ", ".join(f"image {b} at step {step}" for b, step in failed)
            raise DecodeError(
                f"the sampler produced non-finite values ({where}) with guidance {guidance}"
                f"{f' and {self.nan_retries} retries down to scale {scale:g}' if scale is not None else ''}; "
                "check the UNet checkpoint and preset, or lower --scale"
            )
        return x, dist, bad_at

    def _noise(self, gens, shape):
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=self.noise_device) for g in gens])
        return noise.to(self.device, non_blocking=True)

    def _run(self, backend, target, gens, x_T, shape):
        """The loop proper. Returns x, the last distances and, per image, the step (index i) at
        which it first became non-finite (None if it stayed finite)."""
        n = len(gens)
        num_steps = self.schedule.num_steps
        if x_T is None:
            x = self._noise(gens, shape)
        else:
            x = x_T.to(self.device, torch.float32)
        target = target.to(self.device)
        dist = torch.zeros(n, device=self.device)
        bad_at: list = [None] * n
        bar = _progress(num_steps, self.progress)
        for i in range(num_steps - 1, -1, -1):
            noise = self._noise(gens, shape)
            x, dist = backend.step(x, i, target, noise)
            # Non-finite values never heal, so a check every few steps (one host sync) is enough.
            if i % self.check_every == 0:
                finite = (torch.isfinite(x).flatten(1).all(1) & torch.isfinite(dist)).tolist()
                bad_at = [i if (b is None and not ok) else b for b, ok in zip(bad_at, finite)]
                if all(b is not None for b in bad_at):
                    break  # images are independent: the others go on; when none is left, stop
                if bar is not None:
                    bar.set_postfix(distance=f"{float(dist.max()):.4g}", refresh=False)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.last.steps = num_steps
        return x, dist, bad_at

    # -- bitstreams ---------------------------------------------------------------------------
    def _parse(self, data) -> bsfmt.Bitstream:
        if isinstance(data, bsfmt.Bitstream):
            bs = data
        else:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"expected the bytes of an .idm bitstream, got {type(data).__name__}")
            bs = bsfmt.decode(bytes(data), max_pixels=self.max_pixels)
        bsfmt.check_codec(bs, self.codec.name, self.codec.quality, self.codec.weights_hash())
        return bs

    def decode(self, bitstream, seed=None, mode: str = "perceptual", output: str = "pil"):
        """Decode one bitstream. ``mode``: "perceptual" or "mse"; ``output``: "pil" or "tensor"."""
        return self.decode_batch([bitstream], seeds=None if seed is None else [seed], mode=mode, output=output)[0]

    def decode_batch(self, bitstreams: Sequence, seeds=None, mode: str = "perceptual", output: str = "pil"):
        """Decode several bitstreams; images of the same padded size run as one batch."""
        if mode not in ("perceptual", "mse"):
            raise ValueError(f"mode must be 'perceptual' or 'mse', got {mode!r}")
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        t0 = time.perf_counter()
        parsed = [self._parse(b) for b in bitstreams]
        seeds = _seeds(seeds, len(parsed))
        self._local.stats = DecodeStats()
        latents = []
        with torch.no_grad():
            for bs in parsed:
                try:
                    latents.append(self.codec.decompress_latent(bs.streams, bs.latent_shape))
                except BitstreamError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure here is a bad stream
                    raise BitstreamError(f"entropy decoding failed: {exc}") from None
        t1 = time.perf_counter()
        results: list = [None] * len(parsed)
        distances = [0.0] * len(parsed)
        retries = [0] * len(parsed)
        if mode == "mse":
            with torch.no_grad():
                for k, (bs, y_hat) in enumerate(zip(parsed, latents)):
                    results[k] = self.codec.synthesis(y_hat).clamp_(0, 1)
        else:
            groups: dict = {}
            for k, bs in enumerate(parsed):
                groups.setdefault((bs.padded_height, bs.padded_width), []).append(k)
            for (ph, pw), idx in groups.items():
                y_hat = torch.cat([latents[k] for k in idx])
                target = self.target_from_latent(y_hat)
                x, dist = self.sample(target, seed=[seeds[k] for k in idx], shape=(len(idx), 3, ph, pw))
                for j, k in enumerate(idx):
                    results[k] = ((x[j : j + 1] + 1) / 2).clamp_(0, 1)
                    distances[k] = float(dist[j])
                    retries[k] = self.last.retries[j]
        t2 = time.perf_counter()
        images = []
        for bs, img in zip(parsed, results):
            img = img[..., : bs.height, : bs.width].float().cpu()
            images.append(to_pil(img) if output == "pil" else img)
        self.last.distance = distances
        self.last.retries = retries
        self.last.timings = {"entropy_decode": t1 - t0, "sample": t2 - t1, "total": time.perf_counter() - t0}
        return images


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


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="decoding", unit="step")


__all__ = ["Decoder", "DecodeStats", "Encoder"]
