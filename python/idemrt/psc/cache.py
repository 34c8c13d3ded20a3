"""Cache of the round-0 rows, which depend on the model and the seed only.

Round 0 conditions on nothing (H and y are empty), so its rows are a function of the UNet
weights, seed, s, r, steps, image shape and the arithmetic that ran them: the compute mode
(backend, dtype), the device and the library versions. All of these form the key. Entries live
in a small in-process LRU and, when a directory is given, in files of raw float32 bytes with a
checked header (no pickle).

A cached row set is only as good as the run that made it; the decoder's row hash still checks
it against the encoder's.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..fileio import atomic_write_bytes

RECIPE_VERSION = 1  # bump when the sampler, the noise keys or the row recipe change
_MAGIC = b"IDMPSC0\n"
_HEAD = struct.Struct("<8s32sII")  # magic, key digest, rows, columns
_DIGEST = 32


def platform_tag(device: torch.device) -> str:
    """What, besides the inputs, determines the numbers: device model and library versions."""
    parts = [f"torch {torch.__version__}", f"cpu {torch.backends.cpu.get_cpu_capability()}", device.type]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), f"cuda {torch.version.cuda}",
                  f"cudnn {torch.backends.cudnn.version()}"]
    return "; ".join(parts)


def cache_key(weights_hash: bytes, seed: int, s: int, r: int, steps: int, shape, device: torch.device,
              threads: int, compute) -> bytes:
    """``compute``: the :class:`.stream.Compute` mode of the acquisition sampler."""
    text = (f"psc-round0 v{RECIPE_VERSION} weights={bytes(weights_hash).hex()} seed={seed} s={s} r={r} "
            f"steps={steps} shape={tuple(shape)} threads={threads} compute={compute} "
            f"platform={platform_tag(device)}")
    return hashlib.sha256(text.encode()).digest()


class RowCache:
    """LRU of ``capacity`` row sets in memory, optionally backed by ``directory``."""

    def __init__(self, capacity: int = 4, directory=None):
        self.capacity = int(capacity)
        self.directory = Path(directory) if directory is not None else None
        self._mem: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, shape: tuple[int, int]) -> torch.Tensor | None:
        with self._lock:
            rows = self._mem.get(key)
            if rows is not None:
                self._mem.move_to_end(key)
                return rows.clone()
        rows = self._read(key, shape)
        if rows is not None:
            self._remember(key, rows)
        return rows

    def put(self, key: bytes, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float32).contiguous()
        self._remember(key, rows)
        if self.directory is not None:
            data = rows.numpy().astype("<f4", copy=False).tobytes()
            head = _HEAD.pack(_MAGIC, key, rows.shape[0], rows.shape[1])
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._path(key), head + data + hashlib.sha256(head + data).digest(), force=True)

    def _remember(self, key: bytes, rows: torch.Tensor) -> None:
        with self._lock:
            self._mem[key] = rows.clone()
            self._mem.move_to_end(key)
            while len(self._mem) > self.capacity:
                self._mem.popitem(last=False)

    def _path(self, key: bytes) -> Path:
        return self.directory / f"psc-round0-{key.hex()[:32]}.bin"

    def _read(self, key: bytes, shape: tuple[int, int]) -> torch.Tensor | None:
        """The rows stored for ``key`` if a file holds exactly them; anything else is a miss."""
        if self.directory is None:
            return None
        expected = _HEAD.size + 4 * shape[0] * shape[1] + _DIGEST
        path = self._path(key)
        try:
            if os.path.getsize(path) != expected:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if len(data) != expected or hashlib.sha256(body).digest() != digest:
            return None
        if _HEAD.unpack_from(body) != (_MAGIC, key, *shape):
            return None
        rows = torch.frombuffer(bytearray(body[_HEAD.size:]), dtype=torch.float32).reshape(shape)
        return rows if torch.isfinite(rows).all() else None


SHARED = RowCache()  # the default: shared by every Encoder and Decoder of the process
