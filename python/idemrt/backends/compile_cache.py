"""A torch.compile cache a deployer can keep: inductor's portable artifacts in one file per key.

torch.compile's costly part is inductor's code generation (and, with max-autotune, its
benchmarking); PyTorch can serialise what it produced (``torch.compiler.save_cache_artifacts``)
and put it back into its caches in another process (``torch.compiler.load_cache_artifacts``),
after which dynamo still traces but inductor compiles nothing (its FX-graph and AOTAutograd
caches hit). The fast backend loads the cache when it is created and saves after the first run of
each new step shape, so the first start pays the compile and later ones (``idemrt serve``,
``Decoder``, ``benchmarks/latency.py``) do not.

One file per key and part (the fast backend's part: a step kind and shape): torch serialises what
this process compiled or used, not what it loaded and did not use, so one file rewritten by a
process that ran other shapes would lose the first process's; a file per part keeps each. Loading
reads every part of the key.

Key: the machine (GPU name, or the CPU's model name), torch, Triton and the model's digest (its
structure and the backend's options: compiled code does not depend on weight values, which
inductor receives as inputs). The file name is a hash of the key, and the file starts with the key
itself, so a copied or renamed file made for another key is recognised. Concurrent writers of one
part (replicas starting together) are harmless: the last rename wins, and both wrote the same
shapes. A missing file is a miss;
a mismatched, unreadable or corrupt one is ignored with one log line (never an exception); files
are written to a temporary name and renamed, so a reader never sees half a file.

Directory: the backend option ``compile_cache`` (a path; ``False`` turns the cache off), else
``$IDEMRT_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/idemrt/compile`` (``~/.cache/idemrt/compile``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ..defaults import cpu_model

__all__ = ["ENV_VAR", "CompileCache", "default_directory", "machine_name", "model_digest"]

ENV_VAR = "IDEMRT_COMPILE_CACHE"
FORMAT = 1  # of the file: a JSON key line, then torch's artifact bytes
log = logging.getLogger(__name__)

_LOADED: set = set()  # paths loaded in this process: loading once is enough
_LOADED_LOCK = threading.Lock()


def default_directory() -> Path:
    """``$IDEMRT_COMPILE_CACHE``, else the user's cache directory."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "idemrt" / "compile"


def machine_name(device: torch.device) -> str:
    """What compiled code is specific to: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def model_digest(*modules: torch.nn.Module, options=()) -> str:
    """A hash of the modules' structure (classes, parameter and buffer names, shapes, dtypes,
    memory formats) and of ``options`` (their repr): what the compiled code depends on."""
    h = hashlib.sha256()
    for module in modules:
        h.update(type(module).__qualname__.encode())
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            layout = "cl" if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) else "c"
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{layout};".encode())
    h.update(repr(options).encode())
    return h.hexdigest()[:32]


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


class CompileCache:
    """The cache files of one key: ``load()`` before the first compile, ``save(part)`` after a warm-up."""

    def __init__(self, directory, *, device: torch.device, digest: str):
        self.key = {"format": FORMAT, "machine": machine_name(device), "torch": torch.__version__,
                    "triton": _triton_version(), "model": digest}
        self.directory = Path(directory).expanduser()
        self.name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        self.path = self.part_path(None)

    def part_path(self, part) -> Path:
        """The file of ``part`` (any value with a stable repr; None: the key's plain file)."""
        if part is None:
            return self.directory / f"{self.name}.bin"
        return self.directory / f"{self.name}-{hashlib.sha256(repr(part).encode()).hexdigest()[:12]}.bin"

    def load(self) -> bool:
        """Put the artifacts of every part of this key into torch's caches; False when there was
        nothing usable (one log line per file that exists but cannot be used)."""
        paths = sorted(self.directory.glob(f"{self.name}*.bin")) if self.directory.is_dir() else []
        return sum(self._load(path) for path in paths) > 0

    def _load(self, path: Path) -> bool:
        with _LOADED_LOCK:
            if path in _LOADED:
                return True
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("compile cache %s unreadable (%s); ignored", path, exc)
                return False
            head, sep, artifacts = data.partition(b"\n")
            try:
                key = json.loads(head) if sep else None
            except ValueError:
                key = None
            if key != self.key:
                what = "is not a compile cache file" if key is None else f"was made for {key}, not {self.key}"
                log.warning("compile cache %s %s; ignored", path, what)
                return False
            # torch reports unreadable artifacts by returning None after a logged traceback of its
            # own; that traceback is silenced here, the one line below says it.
            torch_log = logging.getLogger("torch.compiler._cache")
            level = torch_log.level
            torch_log.setLevel(logging.ERROR)
            try:
                info = torch.compiler.load_cache_artifacts(artifacts)
                problem = None if info is not None else "torch could not read its artifacts"
            except Exception as exc:  # noqa: BLE001 - a corrupt cache must never stop a decode
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                torch_log.setLevel(level)
            if problem is not None:
                log.warning("compile cache %s could not be loaded (%s); ignored", path, problem)
                return False
            _LOADED.add(path)
            return True

    def save(self, part=None) -> bool:
        """Write what this process has compiled or used so far as ``part``'s file (atomically);
        False if there was nothing or the directory is not writable (one log line)."""
        try:
            out = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - saving is an optimisation, never a failure
            log.warning("compile cache: torch could not serialise its artifacts (%s: %s)", type(exc).__name__, exc)
            return False
        if out is None:
            return False
        path = self.part_path(part)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the temporary name does not end in .bin, so a concurrent load() never reads it
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps(self.key, sort_keys=True).encode() + b"\n" + out[0])
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("compile cache %s not written (%s)", path, exc)
            return False
        with _LOADED_LOCK:
            _LOADED.add(path)  # what is in the file is in this process's caches already
        return True
