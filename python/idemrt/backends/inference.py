"""Inference copies of the networks for the low-precision backends (fast backend, PSC's fast
denoiser): frozen weights, channels_last, ADM's mixed-precision layout, optionally fused kernels.

A copy is shared by every user of the same UNet, device, dtype and kernel choice: backends of
one UNet (a Decoder per preset, PSC's denoiser) hold one copy between them instead of one each
(about 1.1 GB in bf16 for imagenet256).
"""
from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import nn

from ..errors import BackendError
from ..models.codec import Codec, diffusion_operator
from ..models.unet import ADMUNet, norm_act_mixed

__all__ = ["DTYPES", "inference_unet", "operator_copy"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # compute dtypes of the inference copies

_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def inference_unet(unet: nn.Module, dtype: torch.dtype, device: torch.device, variant="torch") -> nn.Module:
    """The UNet's inference copy for ``dtype`` (one of :data:`DTYPES`), shared by every user of
    this UNet, device, dtype and ``variant`` (see :func:`_inference_copy`): any hashable naming
    what a user changes on its copy (the fast backend: its kernels, GroupNorm pass and compile)."""
    if dtype != torch.float32 and not isinstance(unet, ADMUNet):
        raise BackendError(f"bfloat16/float16 need an idemrt ADMUNet (its mixed-precision layout), got "
                           f"{type(unet).__name__}; use dtype=torch.float32")
    # kernels="triton" rewires the copy's norm hook, compiling wraps its blocks: a copy per variant.
    key = (dtype, str(device), variant)
    with _COPIES_LOCK:
        per_module = _COPIES.setdefault(unet, {})
        if key not in per_module:
            per_module[key] = _inference_copy(unet, dtype, device)
        return per_module[key]


def _inference_copy(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A private copy of the UNet on ``device``: parameters frozen, 4-D weights channels_last and,
    following ADM's fp16 convention (guided-diffusion's ``convert_to_fp16``), the convolutions of
    ``input_blocks``, ``middle_block`` and ``output_blocks`` in ``dtype``. The time embedding,
    GroupNorm (computed in fp32 by GroupNorm32; in bf16 on the CPU, by the mixed-type kernel of
    :func:`~idemrt.models.unet.norm_act_mixed`: fp32 statistics too) and the output head stay fp32;
    ADMUNet casts activations at those boundaries itself."""
    low = set()
    if dtype != torch.float32:
        for name in ("input_blocks", "middle_block", "output_blocks"):
            low.update(m for m in getattr(module, name).modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    memo = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            t = p.detach().to(device=device, dtype=dtype if m in low else p.dtype, copy=True)
            if t.ndim == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            memo[id(p)] = nn.Parameter(t, requires_grad=False)
    unet = copy.deepcopy(module, memo).eval()
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        # The same numbers as GroupNorm32 (fp32 statistics, a low-precision output) without its
        # bf16->fp32->bf16 copies: 5 % of the FFHQ-256 bf16 step on the CPU (benchmarks/RESULTS.md).
        unet.set_norm_act(norm_act_mixed)
    return unet


def operator_copy(codec, constraint: str, *, gdn_backward=None, channels_last: bool = False):
    """A (:func:`~idemrt.models.codec.diffusion_operator`) on a private copy of the codec's network:
    the same A, computed by other kernels. ``gdn_backward``: None keeps compressai's GDN/IGDN layers;
    else they run the Triton kernel, with the input gradient by ``gdn_backward`` (one of
    ``idemrt.kernels.gdn.BACKWARDS``; a codec without GDN layers, ELIC, keeps its own).
    ``channels_last``: the copy's 4-D weights in channels_last, which the caller's input should
    match (on a CPU with AMX/AVX-512-BF16, oneDNN's fast convolutions are the channels_last ones:
    benchmarks/RESULTS.md, issue 30)."""
    from compressai.layers import GDN

    if not isinstance(codec, Codec):
        raise BackendError("rebuilding the operator needs StepSpec.codec to be an idemrt Codec")
    model = copy.deepcopy(codec.model)
    if gdn_backward is not None:
        for name, m in list(model.named_modules()):
            if type(m) is GDN:
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, _FusedGDN(m, gdn_backward))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return diffusion_operator(Codec(codec.name, model, quality=codec.quality), constraint)


class _FusedGDN(nn.Module):
    """compressai's GDN/IGDN through ``idemrt.kernels.gdn`` (parameters reparametrised once)."""

    def __init__(self, gdn_module, backward: str = "triton"):
        super().__init__()
        from idemrt.kernels.gdn import gdn_parameters

        gamma, beta, self.inverse = gdn_parameters(gdn_module)
        self.backward = backward
        self.register_buffer("gamma", gamma)
        self.register_buffer("beta", beta)

    def forward(self, x):
        from idemrt.kernels.gdn import gdn

        return gdn(x, self.gamma, self.beta, self.inverse, backward=self.backward)
