"""The default backend and compute dtype: fast (bf16) on CUDA and on CPUs with native bf16, eager
(fp32) on other CPUs; $IDEMRT_BACKEND and an explicit choice override it (the CPU's flags are
simulated: the test must hold on any machine)."""
import pytest
import torch

import idemrt
from idemrt import defaults
from tiny_models import tiny_codec, tiny_unet

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_pin(monkeypatch):
    monkeypatch.delenv(defaults.BACKEND_ENV, raising=False)


@pytest.mark.parametrize("flags, backend, dtype", [
    ({"avx2", "avx512f", "avx512_bf16"}, "fast", torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, "fast", torch.bfloat16),
    ({"avx2", "avx512f"}, "eager", torch.float32),  # bf16 would be emulated: slower than fp32
    (set(), "eager", torch.float32),  # not Linux, or no /proc/cpuinfo
])
def test_cpu_default_follows_native_bf16(monkeypatch, no_pin, flags, backend, dtype):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: flags)
    assert defaults.default_backend(CPU) == backend
    assert defaults.default_fast_dtype(CPU) == dtype
    assert defaults.default_backend(CUDA) == "fast" and defaults.default_fast_dtype(CUDA) == torch.bfloat16


def test_environment_and_explicit_choice_override(monkeypatch, no_pin):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv(defaults.BACKEND_ENV, "eager")
    assert defaults.default_backend(CPU) == "eager" and defaults.default_backend(CUDA) == "eager"
    assert defaults.default_backend(CPU, "fast") == "fast"


def test_decoder_takes_the_default(monkeypatch, no_pin):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx512_bf16"})
    codec, unet = tiny_codec(), tiny_unet()
    decoder = idemrt.Decoder(codec, unet, steps=2, device="cpu")
    assert decoder.backend_name == "fast" and decoder.backend.dtype == torch.bfloat16
    assert idemrt.Decoder(codec, unet, steps=2, device="cpu", backend="eager").backend_name == "eager"
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx2"})
    assert idemrt.Decoder(codec, unet, steps=2, device="cpu").backend_name == "eager"


def _fake_topology(root, cores):
    """A sysfs cpu directory: CPU k on (package, core) = cores[k]."""
    for cpu, (package, core) in enumerate(cores):
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_smt_siblings_once(tmp_path, monkeypatch):
    # 2 packages x 2 cores x 2 hardware threads; Linux numbers the second threads last.
    _fake_topology(tmp_path, [(0, 0), (0, 1), (1, 0), (1, 1)] * 2)
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert defaults.physical_cores(str(tmp_path)) == 4
    # A container's CPU set: the two threads of one core, and one thread of another.
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: {0, 4, 1})
    assert defaults.physical_cores(str(tmp_path)) == 2
    # No topology to read (not Linux, or sysfs hidden): every allowed CPU counts.
    assert defaults.physical_cores(str(tmp_path / "missing")) == 3


@pytest.mark.parametrize("env", [None, "OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_configure_cpu_threads_keeps_a_users_choice(monkeypatch, env):
    for name in defaults.THREAD_ENVS:
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv(env, "3")
    monkeypatch.setattr(defaults, "physical_cores", lambda: 2)
    torch.set_num_threads(1)
    assert defaults.configure_cpu_threads() == (None if env else 2)
    assert torch.get_num_threads() == (1 if env else 2)


def test_the_command_line_sets_physical_cores(monkeypatch, tmp_path, capsys):
    from idemrt.cli import main

    for name in defaults.THREAD_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(defaults, "physical_cores", lambda: 2)
    torch.set_num_threads(1)
    main(["info", str(tmp_path / "missing.idm")])  # fails (no file) after the threads are set
    assert torch.get_num_threads() == 2
