import os

# Triton kernels are tested on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The reference backend unless a test chooses: on a bf16-capable CPU the default is the fast (bf16)
# backend, and most tests compare with float64/fp32 references at fp32 tolerances. Subprocesses
# (the CLI, Ray workers) inherit it. tests/test_defaults*.py check the default itself.
os.environ.setdefault("IDEMRT_BACKEND", "eager")

import torch  # noqa: E402

# Tiny convolutions are far faster single-threaded on a shared 2-core machine.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_again():
    """The command line sets torch's threads to the physical cores (defaults.configure_cpu_threads):
    a test that runs it in-process must not change the next test's thread count."""
    yield
    torch.set_num_threads(1)
