"""Counter-based Gaussian noise: every tensor is a pure function of (seed, purpose, round, step).

Nothing is carried from one draw to the next, so the encoder, a decoder that stops after a
prefix of rounds, and the round-0 cache all see the same numbers no matter which rounds they
run or in which order. Each key is hashed (sha256) into the seed of a fresh CPU
``torch.Generator``; the tensor is drawn on the CPU and then moved, so the accelerator never
influences it. What it does depend on: the torch version and the CPU kernel torch dispatches to
(``torch.backends.cpu.get_cpu_capability()``); both belong to the determinism contract
(docs/psc.md).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

ACQUIRE = 0  # the encoder/decoder's posterior samples: must agree
RESTORE = 1  # the decoder's final restoration: free to differ
_DOMAIN = b"idemrt.psc.noise.v1\0"
_KEY = struct.Struct("<QBqq")


def key_seed(seed: int, purpose: int, round_: int, step: int) -> int:
    """The 63-bit generator seed of one noise tensor."""
    digest = hashlib.sha256(_DOMAIN + _KEY.pack(seed, purpose, round_, step)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def normal(seed: int, purpose: int, round_: int, step: int, shape, device=None) -> torch.Tensor:
    """Standard-normal float32 tensor of ``shape`` for one key, drawn on the CPU."""
    gen = torch.Generator().manual_seed(key_seed(seed, purpose, round_, step))
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    if device is not None and torch.device(device).type != "cpu":
        return z.pin_memory().to(device, non_blocking=True)
    return z


def prefetch(seed: int, purpose: int, round_: int, steps: Iterable[int], shape, device=None) -> Iterator[torch.Tensor]:
    """``normal`` for each step in order, the next one drawn in a worker thread meanwhile.

    Drawing 16 x 3 x 256 x 256 normals takes tens of milliseconds on a CPU: overlapping it with
    the UNet keeps it off the critical path. The numbers are those of ``normal``.
    """
    steps = list(steps)
    if not steps:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(normal, seed, purpose, round_, steps[0], shape, device)
        for nxt in steps[1:]:
            current = pending.result()
            pending = pool.submit(normal, seed, purpose, round_, nxt, shape, device)
            yield current
        yield pending.result()
