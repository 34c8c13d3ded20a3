"""Exact idempotence: a codec-only refinement after sampling (``Decoder(..., exact=True)``).

The guided sampler makes re-encoding the decode reproduce the received latent *approximately*
(the constraint is a distance). Here the decoded image x gets a few gradient steps (Adam, in
[0, 1] pixel units) on ``sum(relu(|g_a(x) - y_hat| - margin)²)``: a latent element whose
analysis lies within 0.5 of its received symbol rounds to it (y_hat - mu is an integer for every
codec family, so ``round(y - mu) + mu = y_hat`` exactly then), and the margin keeps it clear of the
rounding boundary. Elements already inside the margin contribute nothing, so the image only moves
where a symbol is wrong. It stops when ``codec.quantize(g_a(x))`` equals y_hat symbol for symbol,
or after ``max_steps``. No UNet is involved.

The symbol check is in float, on the image before it is saved in 8 bits; the 8-bit rounding can
still flip a symbol that sits near a boundary (``margin`` makes that rare).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ExactResult", "exact_idempotence", "symbols_equal"]


class ExactResult(NamedTuple):
    x: Tensor  # the refined image (1, 3, H, W) in [0, 1]
    before: float  # fraction of latent symbols equal to y_hat before the refinement
    after: float  # ... and after it
    steps: int  # gradient steps taken


@torch.no_grad()
def symbols_equal(codec, x01: Tensor, y_hat: Tensor) -> float:
    """Fraction of the latent symbols of ``x01`` (image in [0, 1], padded size) equal to y_hat."""
    return float((codec.quantize(codec.analysis(x01)) == y_hat).double().mean())


def exact_idempotence(codec, x01: Tensor, y_hat: Tensor, *, max_steps: int = 50, lr: float = 2e-3,
                      margin: float = 0.3) -> ExactResult:
    """Refine ``x01`` (1, 3, H, W) in [0, 1] until it re-encodes to ``y_hat`` (see the module doc)."""
    y_hat = y_hat.to(x01.device)
    before = symbols_equal(codec, x01, y_hat)
    x = x01.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    equal, steps = before, 0
    while equal < 1.0 and steps < max_steps:
        with torch.enable_grad():
            loss = torch.relu((codec.analysis(x) - y_hat).abs() - margin).square().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        steps += 1
        equal = symbols_equal(codec, x.detach(), y_hat)
    return ExactResult(x.detach(), before, equal, steps)
