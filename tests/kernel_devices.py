"""Where the Triton kernel tests run: CPU through the interpreter (TRITON_INTERPRET=1, set by
conftest.py unless already set) and CUDA when a device is present (then with TRITON_INTERPRET=0)."""
import os

import pytest
import torch

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                  reason="CPU tensors need the Triton interpreter")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]
