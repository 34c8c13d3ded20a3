"""Launch helpers shared by the kernels: device checks and stride bookkeeping."""
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from idemrt.errors import BackendError

# Enough programs to fill an H100/H200 (132 SMs) a few times over: the split heuristics of the
# reduction kernels aim for about this many programs when the batch alone is too small.
TARGET_PROGRAMS = 1024


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise BackendError unless ``kernel`` can run on the devices of ``tensors``.

    Compiled Triton needs CUDA tensors; the interpreter (TRITON_INTERPRET=1 set before triton is
    imported) runs on CPU tensors as well.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type != "cuda" and not isinstance(kernel, InterpretedFunction):
        raise BackendError(
            f"Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton to use the (slow) interpreter"
        )


def nchw_as_3d(t: torch.Tensor) -> torch.Tensor:
    """View a [N, C, H, W] tensor as [N, C, H*W] without copying when H and W can be merged.

    Contiguous NCHW and channels_last both qualify; any other layout is copied to contiguous.
    """
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    n, c, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        t = t.contiguous()
    return t.as_strided((n, c, h * w), (t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2)))


def per_sample_rows(t: torch.Tensor) -> torch.Tensor:
    """View [B, ...] as [B, M] rows that are each contiguous; the batch stride may be anything.

    This keeps channel slices of a model output (``out[:, :3]`` of a [B, 6, H, W] tensor) copy-free.
    """
    if t.dim() < 2 or t.numel() == 0:
        raise ValueError(f"expected a non-empty [B, ...] tensor, got shape {tuple(t.shape)}")
    if not t[0].is_contiguous():
        t = t.contiguous()
    return t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n, at least 2 (a block size: no 1-wide aranges)."""
    return max(triton.next_power_of_2(int(n)), 2)
