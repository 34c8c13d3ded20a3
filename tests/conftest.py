import os

# Triton kernels are tested on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Tiny convolutions are far faster single-threaded on a shared 2-core machine.
torch.set_num_threads(1)
