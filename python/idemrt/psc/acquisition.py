"""The acquisition loop that encoder and decoder both run: posterior samples -> new rows.

Round k (0-based) draws s posterior samples given the rows H and quantized measurements y of
rounds < k, in one UNet batch, with noise keyed by (seed, round k, step); their top-r principal
directions (:mod:`.rows`) become the round's rows. The UNet runs through the denoiser of the
stream's compute mode, under deterministic cuDNN settings (:func:`.sampling.deterministic`).
The encoder then measures the image along them; the decoder reads the measurements from the
bitstream. Both feed the rows, in order, into one running sha256 whose prefix is stored
(encoder) or checked (decoder) at checkpoint rounds.
"""
from __future__ import annotations

import hashlib

import torch

from . import noise
from .cache import RowCache, cache_key
from .rows import principal_rows, rows_digest
from .sampling import Denoiser, deterministic, projected_sample
from .stream import Params

_HASH_DOMAIN = b"idemrt.psc.rows.v1\0"


class Acquisition:
    """Rows H (float32 on the device for the sampler, and exactly as float64 on the CPU for the
    row recipe) and the measurements y. ``denoiser`` runs ``params.steps`` steps in the stream's
    compute mode; it may be reused across images (its CUDA graphs too)."""

    def __init__(self, denoiser: Denoiser, params: Params, shape: tuple[int, int, int], weights_hash: bytes,
                 cache: RowCache | None = None):
        self.params = params
        self.shape = tuple(shape)
        self.device = denoiser.device
        self.denoiser = denoiser
        self.weights_hash = weights_hash
        self.cache = cache
        n = shape[0] * shape[1] * shape[2]
        self.h64 = torch.empty(0, n, dtype=torch.float64)
        self.h = torch.empty(0, n, device=self.device)
        self.y = torch.empty(0, device=self.device)
        self._hasher = hashlib.sha256(_HASH_DOMAIN)
        self.unet_evals = 0  # sample evaluations (batch items x steps)
        self.cache_hit = False

    @property
    def rounds(self) -> int:
        return self.h.shape[0] // self.params.r

    def samples(self, k: int) -> torch.Tensor:
        """The s posterior samples (s, 3, H, W) of round k given the current (H, y)."""
        p = self.params
        batch = (p.s, *self.shape)
        z = noise.prefetch(p.seed, noise.ACQUIRE, k, self.denoiser.noise_steps(), batch, self.device)
        self.unet_evals += p.s * p.steps
        with deterministic():
            return projected_sample(self.denoiser, self.h, self.y, batch, z)

    def next_rows(self) -> torch.Tensor:
        """The rows (r, n) of the next round; raises DegenerateSamplesError if there are none."""
        k, p = self.rounds, self.params
        key = None
        if k == 0 and self.cache is not None:
            threads = torch.get_num_threads() if self.device.type == "cpu" else 0
            key = cache_key(self.weights_hash, p.seed, p.s, p.r, p.steps, self.shape, self.device, threads,
                            self.denoiser.compute)
            rows = self.cache.get(key, (p.r, self.h.shape[1]))
            if rows is not None:
                self.cache_hit = True
                return rows
        rows = principal_rows(self.samples(k).reshape(p.s, -1), self.h64, p.r)
        if key is not None:
            self.cache.put(key, rows)
        return rows

    def append(self, rows: torch.Tensor, y_q: torch.Tensor) -> bytes:
        """Add a round's rows and dequantized measurements; return the hash of all rows so far."""
        self.h64 = torch.cat([self.h64, rows.double()])
        self.h = torch.cat([self.h, rows.to(self.device)])
        self.y = torch.cat([self.y, y_q.to(self.device, torch.float32)])
        rows_digest(self._hasher, rows)
        return self._hasher.copy().digest()[: self.params.hash_bytes]
