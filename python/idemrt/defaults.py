"""Defaults every entry point shares: device, backend and dtype names.

The fast backend (bf16, CUDA graphs) is the default on CUDA, the eager one (fp32) elsewhere.
Dtypes are named "fp32", "bf16", "fp16" on the command line and in PSC streams. Torch is
imported inside the functions, so the command line can read the names without it.
"""
from __future__ import annotations

import os
from typing import Optional

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def _dtypes() -> dict:
    import torch

    return dict(zip(DTYPE_CHOICES, (torch.float32, torch.bfloat16, torch.float16)))


def dtype_from_name(name: Optional[str]):
    """"fp32" / "bf16" / "fp16" -> the torch dtype; None stays None (the backend's default)."""
    if name is None:
        return None
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}")
    return _dtypes()[name]


def dtype_name(dtype) -> str:
    """The name of a torch dtype among :data:`DTYPE_CHOICES`; ValueError for others."""
    for name, value in _dtypes().items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {', '.join(map(str, _dtypes().values()))}, got {dtype!r}")


def _cpuinfo(field: str) -> Optional[str]:
    """The first ``field`` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_flags() -> set:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty elsewhere."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a user's thread count, which idemrt keeps


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask, which containers'
    cpusets narrow): distinct (package, core) pairs from Linux's sysfs topology; the number of
    those CPUs where the topology cannot be read."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = os.path.join(sysfs, f"cpu{cpu}", "topology")
        try:
            with open(os.path.join(topology, "physical_package_id")) as f, open(os.path.join(topology, "core_id")) as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            return len(cpus)
    return max(len(cores), 1)


def configure_cpu_threads() -> Optional[int]:
    """Set torch's intra-op threads to :func:`physical_cores` unless ``$OMP_NUM_THREADS`` or
    ``$MKL_NUM_THREADS`` chose a number (then torch already follows it); returns the number set,
    or None. Called by the command line, which owns its process; a library user sets
    ``torch.set_num_threads`` as they see fit.

    Why physical cores: the guided step is mostly convolutions running near the CPU's bf16 matmul
    peak (benchmarks/RESULTS.md), and the two hardware threads of one core share its vector units,
    so a second thread per core adds no arithmetic (the usual advice for compute-bound oneDNN work;
    not measured here: the machine idemrt is developed on has one thread per core); a count taken
    from ``os.cpu_count()`` would also ignore a container's CPU set."""
    if any(os.environ.get(name) for name in THREAD_ENVS):
        return None
    import torch

    n = physical_cores()
    torch.set_num_threads(n)
    return n


def cpu_supports_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 matmuls and
    convolutions run about twice as fast as fp32; without them oneDNN emulates bf16, slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def default_fast_dtype(device):
    """The fast backend's compute dtype on ``device``: bf16 on CUDA and on bf16-capable CPUs,
    fp32 on other CPUs."""
    import torch

    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" or cpu_supports_bf16() else torch.float32


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None):
    """``device`` as a torch.device, or the default one."""
    import torch

    return torch.device(device) if device is not None else default_device()


BACKEND_ENV = "IDEMRT_BACKEND"  # pins the default backend of a process (the tests pin "eager", the reference)


def default_backend(device, backend: Optional[str] = None) -> str:
    """``backend``, else ``$IDEMRT_BACKEND``, else "fast" on CUDA and on CPUs that compute bf16
    natively (:func:`cpu_supports_bf16`), "eager" elsewhere.

    On such a CPU the fast backend (bf16, channels-last) decodes with the realism and idempotence
    of eager fp32 (the demo models, ``paper`` at 100 steps, ``balanced`` and ``fast``: PSNR,
    sharpness and patch SWD within 5.5 %, the same share of equal latent symbols, re-compression
    MSE +4 % on ``paper``; benchmarks/RESULTS.md) at about twice eager's speed (per step 1.7-2.6x
    across runs, 2.0-2.4x in one run; whole decodes 2.0-2.2x; FFHQ-256 and ImageNet-256 on a
    2-core AVX-512-BF16 CPU); on a CPU without native bf16 it would emulate bf16, slower than
    fp32, so eager stays the default there.
    """
    import os

    return backend or os.environ.get(BACKEND_ENV) or ("fast" if device.type == "cuda" or cpu_supports_bf16() else "eager")
