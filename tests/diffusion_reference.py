"""Independent float64 re-implementation of the reference sampler, for tests only.

Written from docs/reference_code.md (§2.2-§2.8), not from
idemrt.diffusion, which it must never import. It follows the reference's
structure instead of idemrt's: coefficients are recomputed from scratch in
float64 for each call, norms span the whole tensor as in the reference, and
batches are handled by looping over samples (each sample alone is exactly the
reference at batch 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


# --- schedule (§2.2, §2.3) ---------------------------------------------------------------

def betas(T: int) -> list[float]:
    """Linear betas by the closed form of linspace, element by element."""
    scale = 1000 / T
    lo, hi = scale * 1e-4, scale * 0.02
    return [lo + (hi - lo) * k / (T - 1) for k in range(T)]


def kept_steps(T: int, counts: list[int]) -> list[int]:
    """§2.3 sections: T // n steps per part, the first T % n parts one more."""
    out = []
    start = 0
    for k, c in enumerate(counts):
        size = T // len(counts) + (1 if k < T % len(counts) else 0)
        stride = 1 if c <= 1 else (size - 1) / (c - 1)
        cur = 0.0
        for _ in range(c):
            out.append(start + round(cur))
            cur += stride
        start += size
    return sorted(out)


def process(T: int, kept: list[int]) -> dict[str, torch.Tensor]:
    """The respaced process of §2.3, all of §2.2 recomputed from the rebuilt betas."""
    abar_orig = torch.cumprod(1 - torch.tensor(betas(T), dtype=F64), 0)
    new_betas, last = [], 1.0
    for t in sorted(kept):
        new_betas.append(1 - abar_orig[t].item() / last)
        last = abar_orig[t].item()
    b = torch.tensor(new_betas, dtype=F64)
    a = 1 - b
    abar = torch.cumprod(a, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    pv = b * (1 - abar_prev) / (1 - abar)
    return {
        "betas": b,
        "abar": abar,
        "abar_prev": abar_prev,
        "sqrt_recip": (1 / abar).sqrt(),
        "sqrt_recipm1": (1 / abar - 1).sqrt(),
        "pv": pv,
        "plv": torch.cat([pv[1:2], pv[1:]]).log(),
        "c1": b * abar_prev.sqrt() / (1 - abar),
        "c2": (1 - abar_prev) * a.sqrt() / (1 - abar),
        "timestep_map": torch.tensor(sorted(kept)),
    }


# --- one step (§2.4-§2.6), float64, batch 1 semantics -------------------------------------

def _x0(P, model, x, i):
    out = model(x, P["timestep_map"][i].repeat(x.shape[0]))
    eps, v = out[:, :3], out[:, 3:]
    x0 = torch.clamp(P["sqrt_recip"][i] * x - P["sqrt_recipm1"][i] * eps, -1, 1)
    return x0, v


def ddpm(P, model, x, i, noise):
    """-> (x0, mean, sigma, sample), §2.4 + §2.5."""
    x0, v = _x0(P, model, x, i)
    mean = P["c1"][i] * x0 + P["c2"][i] * x
    frac = (v + 1) / 2
    sigma = torch.exp(0.5 * (frac * P["betas"][i].log() + (1 - frac) * P["plv"][i]))
    sample = mean + sigma * noise if i != 0 else mean
    return x0, mean, sigma, sample


def ddim(P, model, x, i, noise, eta=1.0):
    """-> (x0, mean, sigma, sample), §2.4 + §2.6."""
    x0, _ = _x0(P, model, x, i)
    eps = (P["sqrt_recip"][i] * x - x0) / P["sqrt_recipm1"][i]
    ab, abp = P["abar"][i], P["abar_prev"][i]
    sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    mean = x0 * abp.sqrt() + torch.sqrt(1 - abp - sigma**2) * eps
    sample = mean + sigma * noise if i != 0 else mean
    return x0, mean, sigma * torch.ones_like(x), sample


# --- guidance (§2.8), whole-tensor norms per call; batches looped ----------------------

def _guided_one(P, step_fn, model, op, x, i, y, noise, update):
    x = x.detach().requires_grad_(True)
    x0, mean, sigma, sample = step_fn(P, model, x, i, noise)
    dist = torch.linalg.norm(y - op(x0))
    grad = torch.autograd.grad(dist, x)[0]
    return update(sample.detach(), mean.detach(), sigma.detach(), grad, x.shape).detach(), dist.detach()


def dps(P, step_fn, model, op, x, i, y, noise, scale):
    """'ps' for each sample alone -> (x_prev, dist (N,))."""
    def update(sample, mean, sigma, grad, shape):
        return sample - grad * scale
    outs = [_guided_one(P, step_fn, model, op, x[k:k + 1], i, y[k:k + 1], noise[k:k + 1], update)
            for k in range(x.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def dsg(P, step_fn, model, op, x, i, y, noise, interval=1):
    """'DSG' for each sample alone -> (x_prev, dist (N,))."""
    if i % interval != 0:
        samples = [step_fn(P, model, x[k:k + 1], i, noise[k:k + 1])[3] for k in range(x.shape[0])]
        return torch.cat(samples).detach(), torch.zeros(x.shape[0], dtype=x.dtype)

    def update(sample, mean, sigma, grad, shape):
        _, c, h, w = shape
        r = math.sqrt(c * h * w) * sigma[0, 0, 0, 0]
        d_star = -r * grad / (torch.linalg.norm(grad) + 1e-8)
        d_sample = sample - mean
        mix = d_sample + 0.1 * (d_star - d_sample)
        return mean + mix / (torch.linalg.norm(mix) + 1e-8) * r

    outs = [_guided_one(P, step_fn, model, op, x[k:k + 1], i, y[k:k + 1], noise[k:k + 1], update)
            for k in range(x.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.stack([o[1] for o in outs])


# --- test fixtures: a toy codec operator --------------------------------------------

def round_ste(x):
    """Round half to even forward, identity backward (the codecs' STE rounding)."""
    return x + (torch.round(x) - x).detach()


def toy_operator(x, factor=2, levels=4.0):
    """A(x): average-pool by ``factor``, quantize to 1/levels with STE rounding, upsample back."""
    q = round_ste(F.avg_pool2d(x, factor) * levels) / levels
    return F.interpolate(q, scale_factor=factor, mode="nearest")


# --- test fixtures: tiny eps | v networks --------------------------------------------

class TinyEpsNet(torch.nn.Module):
    """A random conv net with a time input and 6 output channels (eps | v)."""

    def __init__(self, seed: int = 0, width: int = 8, gain: float = 0.15):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, width, 3, padding=1)
        self.time = torch.nn.Linear(2, width)
        self.out = torch.nn.Conv2d(width, 6, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * gain)

    def forward(self, x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        tt = t.to(x.dtype)[:, None] / 1000
        emb = self.time(torch.cat([torch.sin(3 * tt), torch.cos(3 * tt)], 1))
        return self.out(F.silu(self.inp(x) + emb[:, :, None, None]))


class GaussianPriorNet(torch.nn.Module):
    """The exact eps predictor for data ~ N(0, std² I) under the 1000-step linear
    schedule (a diffusion model of a known prior), with v = 0."""

    def __init__(self, std: float = 0.5):
        super().__init__()
        self.var = std**2
        self.register_buffer("abar", torch.cumprod(1 - torch.tensor(betas(1000), dtype=F64), 0))

    def forward(self, x, t):
        ab = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * self.var + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1)
