"""``Encoder`` and ``Decoder`` of PSC, the progressive posterior-sampling codec.

    encoder: image x ──┐
                       ▼
      round k: s posterior samples | (H, y_q) ── top-r PCs ──▶ rows ──▶ q(rows·x) ──▶ bytes
                       ▲                                        │
                       └──────────── H += rows, y_q += q ◀──────┘
    decoder: the same loop with q(rows·x) read from the bytes, then one restoration from (H, y_q)

No side information: the decoder rebuilds every row from the same model, noise and y_q, which
works only when its arithmetic is bit-identical to the encoder's (docs/psc.md). The stream
records the encoder's compute mode (backend, dtype, device type), which the decoder's
acquisition then uses; row hashes turn any remaining divergence into :class:`idemrt.DecodeError`
instead of a wrong image.

Images are mapped to the diffusion model's [-1, 1] and padded (replicated edges) to a multiple
of the UNet's downsampling factor; measurements see the padded image, rates count the original
pixels.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import bitstream as bsfmt
from ..decode_request import OUTPUTS, check_choice
from ..defaults import default_backend, dtype_name, resolve_device
from ..deprecation import renamed_argument
from ..errors import DecodeError
from ..images import load_image, to_pil
from ..models.prior import prior_traits
from ..progress import progress_bar
from . import noise, stream
from .acquisition import Acquisition
from .cache import SHARED, RowCache
from .quantize import dequantize, quantize
from .rows import DegenerateSamplesError
from .sampling import deterministic, guided_sample, make_denoiser, projected_sample
from .stream import Code, Compute, Params

RESTORATIONS = ("projected", "guided")


@dataclass
class Stats:
    """Facts about the last encode or decode."""

    rounds: int = 0
    hashes_checked: int = 0
    unet_evals: int = 0  # sample evaluations: batch items x steps (the guided restoration counts one each)
    cache_hit: bool = False
    residual: float = float("nan")  # ||H x̂ - y_q|| / sqrt(m) of the restoration ([-1, 1] units)
    compute: str = ""  # the acquisition's compute mode, e.g. "fast-bf16-cuda"
    timings: dict = field(default_factory=dict)


def _factor(unet) -> int:
    """The UNet's size multiple (:attr:`idemrt.models.prior.Prior.size_multiple`: 2**(levels - 1)
    for an ADMUNet, 1 for a plain module)."""
    return prior_traits(unet).size_multiple


def _compute(backend, dtype, device: torch.device) -> Compute:
    """The compute mode of ``backend`` ("eager", "fast") and ``dtype`` (a torch dtype) on ``device``;
    by default :func:`idemrt.defaults.default_backend`'s, as :class:`idemrt.Decoder`."""
    backend = default_backend(device, backend)
    if dtype is None:
        return Compute(backend, "bf16" if backend == "fast" else "fp32", device.type)
    return Compute(backend, dtype_name(dtype), device.type)


def _cache(cache, cache_dir) -> RowCache | None:
    if cache_dir is not None:
        return RowCache(directory=cache_dir)
    return SHARED if cache else None


def rounds_for_bpp(params: Params, bpp: float, height: int, width: int) -> int:
    """The most rounds whose uncompressed payload (measurement and hash bytes) fits ``bpp``."""
    bpp = float(bpp)
    if not math.isfinite(bpp) or bpp <= 0:
        raise ValueError(f"bpp must be a positive number, got {bpp}")
    budget = bpp * height * width / 8 * (1 + 1e-9)  # bytes; a rate exactly at bpp fits despite rounding
    rounds = int(budget // params.r)
    while rounds > 0 and stream.payload_bytes(params, rounds) > budget:
        rounds -= 1
    if rounds == 0:
        least = 8 * stream.payload_bytes(params, 1) / (height * width)
        raise ValueError(f"bpp {bpp:g} is below one round ({least:.4g} bpp at r={params.r} for "
                         f"{height}x{width}); lower r or raise bpp")
    return rounds


class Encoder:
    """Compress images into PSC ``.idm`` bitstreams with an ADM UNet.

    ``s`` posterior samples per round (one UNet batch), ``r`` new measurements per round
    (``r <= s - 1``), ``steps`` sampler steps, ``seed`` of the shared noise. ``hash_bits`` (0..64,
    multiple of 8) of a running hash of the rows are stored every ``hash_every`` rounds and at
    the last one. ``entropy``: "zlib" (kept only if smaller) or "raw". ``cache``: reuse round 0
    across images (in memory), or ``cache_dir`` for a persistent cache.

    ``backend`` and ``dtype`` choose how the sampler's UNet runs: "eager" (the UNet as given,
    fp32) or "fast" (the fast backend's inference copy in ``dtype``: torch.bfloat16 by default,
    torch.float16 or torch.float32; one CUDA graph per batch shape on CUDA). Default:
    :func:`idemrt.defaults.default_backend` (fast on CUDA and on bf16-capable CPUs). The mode is written into the stream and decoders follow it; the fast
    path snapshots the weights here.
    """

    def __init__(self, unet: torch.nn.Module, s: int = 16, r: int = 12, steps: int = 25, seed: int = 0,
                 device=None, *, backend: str | None = None, dtype: torch.dtype | None = None,
                 hash_bits: int = 16, hash_every: int = 1, entropy: str = "zlib",
                 cache: bool = True, cache_dir=None, progress: bool = False):
        if entropy not in stream.ENTROPY:
            raise ValueError(f"entropy must be one of {stream.ENTROPY}, got {entropy!r}")
        self.params = Params(s=s, r=r, steps=steps, seed=seed, hash_bits=hash_bits, hash_every=hash_every)
        self.device = resolve_device(device)
        self.compute = _compute(backend, dtype, self.device)
        self.unet = unet.to(self.device).eval()
        self.weights_hash = bsfmt.weights_digest(self.unet.state_dict())
        self.denoiser = make_denoiser(self.unet, steps, self.device, self.compute)
        self.factor = _factor(self.unet)
        self.entropy = entropy
        self.cache = _cache(cache, cache_dir)
        self.progress = progress
        self.last = Stats()

    def encode(self, image, bpp: float | None = None, rounds: int | None = None) -> bytes:
        """``image``: anything :func:`idemrt.images.load_image` reads. Give ``bpp`` (payload
        bits per pixel, an upper bound) or ``rounds``."""
        t0 = time.perf_counter()
        x = load_image(image).to("cpu")
        height, width = x.shape[-2:]
        rounds = self._rounds(bpp, rounds, height, width)
        x = _pad(2 * x - 1, self.factor)
        shape = tuple(x.shape[1:])
        n = math.prod(shape)
        if rounds * self.params.r > n:
            raise ValueError(f"{rounds} rounds of {self.params.r} exceed the {n} dimensions of the image")
        flat = x.reshape(-1).double()
        acq = Acquisition(self.denoiser, self.params, shape, self.weights_hash, self.cache)
        marks = set(stream.checkpoints(rounds, self.params.hash_every))
        codes, hashes = [], []
        for k in progress_bar(rounds, self.progress, "encoding", "round", range(rounds)):
            rows = acq.next_rows()
            c = quantize((rows.double() @ flat).float())  # float64 product: encoder only
            digest = acq.append(rows, dequantize(c))
            codes.append(c)
            if k in marks and self.params.hash_bytes:
                hashes.append(digest)
        code = Code(params=self.params, rounds=rounds, codes=b"".join(codes), hashes=hashes,
                    height=int(height), width=int(width), padded_height=shape[1], padded_width=shape[2],
                    weights_hash=self.weights_hash, compute=self.compute)
        data = stream.pack(code, self.entropy)
        self.last = Stats(rounds=rounds, unet_evals=acq.unet_evals, cache_hit=acq.cache_hit,
                          compute=str(self.compute), timings={"total": time.perf_counter() - t0})
        return data

    def _rounds(self, bpp, rounds, height, width) -> int:
        if (bpp is None) == (rounds is None):
            raise ValueError("give exactly one of bpp and rounds")
        if bpp is not None:
            return rounds_for_bpp(self.params, bpp, height, width)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds < stream.MAX_ROUNDS:
            raise ValueError(f"rounds must be an int in [1, {stream.MAX_ROUNDS}), got {rounds!r}")
        return rounds


class Decoder:
    """Decode PSC ``.idm`` bitstreams with the encoder's UNet, on the encoder's kind of machine.

    The rows are rebuilt in the compute mode the stream records (the encoder's backend and
    dtype), on this decoder's device, which must be of the encoder's device type. ``backend`` and
    ``dtype`` (as for :class:`Encoder`; default as the Encoder's),
    ``restoration_steps`` (default: the stream's sampler steps), ``restoration_seed``,
    ``scale`` (the guided restoration's step; ``guidance_scale`` is its deprecated name) and ``eta``
    shape the final restoration only, which need not match the
    encoder. ``max_measurements`` bounds the rows held in memory (reader policy).
    """

    def __init__(self, unet: torch.nn.Module, device=None, *, backend: str | None = None,
                 dtype: torch.dtype | None = None, restoration_steps: int | None = None,
                 restoration_seed: int = 0, scale: float = 1.0, eta: float = 1.0,
                 max_measurements: int = stream.DEFAULT_MAX_MEASUREMENTS, max_pixels: int = bsfmt.DEFAULT_MAX_PIXELS,
                 cache: bool = True, cache_dir=None, progress: bool = False, guidance_scale: float | None = None):
        self.device = resolve_device(device)
        self.compute = _compute(backend, dtype, self.device)  # the restoration's
        self.unet = unet.to(self.device).eval()
        self.weights_hash = bsfmt.weights_digest(self.unet.state_dict())
        self.factor = _factor(self.unet)
        self.restoration_steps = restoration_steps
        self.restoration_seed = int(restoration_seed)
        self.scale = float(renamed_argument("guidance_scale", guidance_scale, "scale", scale))
        self.eta = float(eta)
        self.max_measurements = int(max_measurements)
        self.max_pixels = max_pixels
        self.cache = _cache(cache, cache_dir)
        self.progress = progress
        self.last = Stats()
        self._denoisers: dict = {}

    def parse(self, data) -> Code:
        """Check a bitstream (bytes, or an already decoded :class:`idemrt.bitstream.Bitstream`)
        against the format and this decoder's UNet; BitstreamError if unfit."""
        bs = bsfmt.parse(data, max_pixels=self.max_pixels)
        code = stream.unpack(bs, factor=self.factor, max_measurements=self.max_measurements)
        bsfmt.route(bs, {None: bsfmt.CodecIdentity(stream.CODEC, None, self.weights_hash)}, where="this PSC decoder")
        return code

    def measurements(self, data, rounds: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Code]:
        """Rebuild (H, y_q) of the first ``rounds`` rounds (default all), checking the row hashes.

        H is (rounds·r, n) float32 on the decoder's device, y_q (rounds·r,). Raises DecodeError
        when a hash disagrees: this machine's arithmetic differs from the encoder's.
        """
        code = self.parse(data)
        rounds = code.rounds if rounds is None else rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= code.rounds:
            raise ValueError(f"rounds must be an int in [1, {code.rounds}] (the stream's rounds), got {rounds!r}")
        p = code.params
        compute = self._acquisition_mode(code)
        y_all = dequantize(code.codes)
        shape = (3, code.padded_height, code.padded_width)
        acq = Acquisition(self._denoiser(p.steps, compute), p, shape, code.weights_hash, self.cache)
        marks = {k: i for i, k in enumerate(stream.checkpoints(code.rounds, p.hash_every))}
        checked = 0
        for k in progress_bar(rounds, self.progress, "rebuilding rows", "round", range(rounds)):
            try:
                rows = acq.next_rows()
            except DegenerateSamplesError as exc:
                raise DecodeError(f"round {k}: {exc}; the encoder's samples were not degenerate, so this "
                                  f"decoder's arithmetic differs from the encoder's") from None
            digest = acq.append(rows, y_all[k * p.r:(k + 1) * p.r])
            if k in marks and p.hash_bytes:
                if digest != code.hashes[marks[k]]:
                    raise DecodeError(
                        f"the rows of round {k} differ from the encoder's (hash {digest.hex()} != "
                        f"{code.hashes[marks[k]].hex()}): this decoder's arithmetic is not bit-identical "
                        f"to the encoder's. Decode on the encoder's kind of machine, with the same GPU model, "
                        f"torch/CUDA versions and CPU thread count (docs/psc.md)"
                    )
                checked += 1
        self.last = Stats(rounds=rounds, hashes_checked=checked, unet_evals=acq.unet_evals, cache_hit=acq.cache_hit,
                          compute=str(compute))
        return acq.h, acq.y, code

    def _acquisition_mode(self, code: Code) -> Compute:
        """The encoder's compute mode, which rebuilding its rows needs; DecodeError if this decoder
        cannot run it."""
        c = code.compute
        if c is None:  # a version-1 stream: eager fp32, on a device type it does not record
            return Compute("eager", "fp32", self.device.type)
        if c.device != self.device.type:
            raise DecodeError(
                f"this file's rows were computed by the {c.backend} {c.dtype} UNet on {c.device} "
                f"(compute mode {c}), but this decoder runs on {self.device.type}: a UNet on another kind of "
                f"device computes different last bits, so the rows would diverge from the encoder's. Decode "
                f"on a {c.device} device of the encoder's kind (device='{c.device}', or --device {c.device})"
            )
        return c

    def _denoiser(self, steps: int, compute: Compute):
        """One denoiser per (steps, mode), kept so that its CUDA graphs serve every later decode."""
        key = (steps, compute)
        if key not in self._denoisers:
            self._denoisers[key] = make_denoiser(self.unet, steps, self.device, compute)
        return self._denoisers[key]

    def decode(self, data, restoration: str = "projected", rounds: int | None = None, output: str = "pil"):
        """The image of the first ``rounds`` rounds (default all). ``restoration``: "projected"
        (DDRM: meets every measurement) or "guided" (ΠGDM). ``output``: "pil" or "tensor"
        ((1, 3, H, W) float32 in [0, 1] on the CPU)."""
        check_choice("restoration", restoration, RESTORATIONS)
        check_choice("output", output, OUTPUTS)
        t0 = time.perf_counter()
        h, y, code = self.measurements(data, rounds)
        t1 = time.perf_counter()
        x = self.restore(h, y, (1, 3, code.padded_height, code.padded_width), code.params.steps, restoration)
        stats = self.last
        stats.unet_evals += self.restoration_steps or code.params.steps
        stats.residual = float(torch.linalg.vector_norm(x.reshape(1, -1) @ h.T - y) / math.sqrt(y.numel()))
        img = ((x + 1) / 2).clamp_(0, 1)[..., : code.height, : code.width].float().cpu()
        stats.timings = {"rows": t1 - t0, "restoration": time.perf_counter() - t1, "total": time.perf_counter() - t0}
        if not torch.isfinite(img).all():
            raise DecodeError("the restoration produced non-finite values; check the UNet checkpoint and preset")
        return to_pil(img) if output == "pil" else img

    def restore(self, h: torch.Tensor, y: torch.Tensor, shape, steps: int, restoration: str = "projected"):
        """A restoration x̂ (shape, [-1, 1] units, unclamped) from rows h and measurements y, in
        this decoder's compute mode."""
        den = self._denoiser(self.restoration_steps or steps, self.compute)
        z = noise.prefetch(self.restoration_seed, noise.RESTORE, h.shape[0], den.noise_steps(), shape, self.device)
        with deterministic():
            if restoration == "projected":
                return projected_sample(den, h, y, shape, z)
            return guided_sample(den, h, y, shape, z, scale=self.scale, eta=self.eta)


def truncate(data, rounds: int) -> bytes:
    """The bitstream of the first ``rounds`` rounds of ``data`` (no model needed).

    Hashes are cumulative, so the prefix keeps those of its rounds; ``rounds`` must end on a
    hashed round (a multiple of ``hash_every``, or all rounds) unless the stream has no hashes.
    """
    if isinstance(data, bsfmt.Bitstream):
        raise TypeError("expected the bytes of an .idm bitstream, got a Bitstream")
    bs = bsfmt.parse(data)
    code = stream.unpack(bs, factor=None, max_measurements=stream.MAX_ROUNDS * stream.MAX_S)
    p = code.params
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= code.rounds:
        raise ValueError(f"rounds must be an int in [1, {code.rounds}], got {rounds!r}")
    old = stream.checkpoints(code.rounds, p.hash_every)
    new = stream.checkpoints(rounds, p.hash_every)
    if p.hash_bytes and not set(new) <= set(old):
        raise ValueError(f"a prefix of {rounds} rounds would end on an unhashed round; use a multiple of "
                         f"hash_every={p.hash_every}")
    hashes = [code.hashes[old.index(k)] for k in new] if p.hash_bytes else []
    prefix = Code(params=p, rounds=rounds, codes=code.codes[: rounds * p.r], hashes=hashes, height=code.height,
                  width=code.width, padded_height=code.padded_height, padded_width=code.padded_width,
                  weights_hash=code.weights_hash, compute=code.compute)
    return stream.pack(prefix, bs.extra["entropy"])


def _pad(x: torch.Tensor, factor: int) -> torch.Tensor:
    ph, pw = (-x.shape[-2]) % factor, (-x.shape[-1]) % factor
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


__all__ = ["Decoder", "Encoder", "RESTORATIONS", "Stats", "rounds_for_bpp", "truncate"]
