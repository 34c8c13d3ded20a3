"""Noise schedule and timestep respacing of guided-diffusion (ADM), in float64.

A :class:`Schedule` is the *respaced* process that the samplers walk: ``N'``
kept steps of the original ``T``-step linear schedule, with every derived array
recomputed from the rebuilt betas (guided-diffusion's ``SpacedDiffusion``).
Position ``i`` in the respaced process (counting down ``N'-1 .. 0`` while
sampling) maps to the original step ``timestep_map[i]``, which is what the
UNet receives as its time input.

Model time: the reference can "rescale" that time to ``timestep_map[i] *
1000 / T``; with ``T = 1000`` (every shipped config) the factor is 1.0 and
the UNet's sinusoidal embedding is the same for the long and the float value,
so idemrt always feeds the long ``timestep_map[i]``.

Arrays stay float64 numpy here (the reference computes them so); the samplers
cast the few coefficients they need to one float32 torch table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np


def linear_betas(num_timesteps: int) -> np.ndarray:
    """ADM's linear schedule, scaled so that any ``num_timesteps`` spans the
    same total noise as 1000 steps of ``1e-4 .. 0.02``."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _parse_count(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"bad timestep respacing {spec!r}: {text!r} is not an integer") from None


def parse_respacing(section_counts: int | str | list[int]) -> tuple[str, list[int]]:
    """A respacing's form, checked without the process it respaces: ``("ddim", [N])`` for
    ``"ddimN"``, else ``("sections", counts)``. ValueError for anything :func:`space_timesteps`
    cannot read (what ``DecodeConfig`` checks before a prior is known)."""
    if isinstance(section_counts, bool):
        raise ValueError(f"bad timestep respacing {section_counts!r}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], section_counts)
            if desired < 1:
                raise ValueError(f"bad timestep respacing {section_counts!r}: needs at least 1 step")
            return "ddim", [desired]
        counts = [_parse_count(part, section_counts) for part in spec.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, (list, tuple)) and section_counts and all(
            isinstance(c, int) and not isinstance(c, bool) for c in section_counts):
        counts = list(section_counts)
    else:
        raise ValueError(f"timestep respacing must be an int, a list of ints or a string, got {section_counts!r}")
    if any(c < 1 for c in counts):
        raise ValueError(f"bad timestep respacing {section_counts!r}: every section needs at least 1 step")
    return "sections", counts


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> set[int]:
    """The original steps kept by a respacing (guided-diffusion's rules).

    ``section_counts`` is an int (one section), a list of counts or a
    comma-separated string of them (``[10, 20]`` or ``"10,20"``: the process is
    cut into that many contiguous parts,
    the first ``T % n`` of which get one extra step), or ``"ddimN"`` (the
    smallest integer stride giving exactly N steps: ``range(0, T, stride)``).
    Inside a part of ``size`` steps, ``c`` positions are picked at
    ``round(cur)`` with ``cur`` accumulated by repeated float addition of
    ``(size - 1) / (c - 1)``; Python's round (half to even) is part of the
    rule, so it is kept as is.

    Unlike the reference, a count below 1 is an error (it would silently drop
    a section).
    """
    kind, counts = parse_respacing(section_counts)
    if kind == "ddim":
        desired = counts[0]
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A (respaced) diffusion process; every array has one entry per kept step."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray  # int64: respaced position -> original step (the model's time input)
    original_num_steps: int

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map=None, original_num_steps: int | None = None) -> Schedule:
        """Derive every array from ``betas`` (guided-diffusion's GaussianDiffusion.__init__)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be 1-D with at least 2 steps")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        if timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
            posterior_variance=posterior_variance,
            # pv_0 = 0: the log is clipped by repeating pv_1 in front.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            timestep_map=timestep_map.astype(np.int64),
            original_num_steps=len(betas) if original_num_steps is None else original_num_steps,
        )

    @classmethod
    def create(cls, steps: int = 1000, respacing: int | str | None = None) -> Schedule:
        """The linear ``steps``-step process (guided-diffusion's), respaced (:meth:`respace`)."""
        return cls.respace(cls.from_betas(linear_betas(steps)).alphas_cumprod, respacing)

    @classmethod
    def respace(cls, alphas_cumprod, respacing: int | str | None = None) -> Schedule:
        """The process of cumulative alphas ``alphas_cumprod`` (one per original step), respaced.

        ``respacing`` None or "" keeps all steps; otherwise see
        :func:`space_timesteps`. The kept steps are rebuilt into a process of
        their own: walking the original cumulative alphas upwards,
        ``beta'_k = 1 - abar[t_k] / abar[t_{k-1}]`` (with ``abar[t_{-1}] = 1``),
        so the respaced ``alphas_cumprod`` are the original ones at the kept
        steps (diffusers' schedulers compute a step between two kept timesteps the same way).
        """
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        steps = len(alphas_cumprod)
        if respacing is None or respacing == "":
            respacing = steps
        kept = space_timesteps(steps, respacing)
        new_betas = []
        timestep_map = []
        last = 1.0
        for t, abar in enumerate(alphas_cumprod):
            if t in kept:
                new_betas.append(1 - abar / last)
                last = abar
                timestep_map.append(t)
        return cls.from_betas(np.array(new_betas), timestep_map, original_num_steps=steps)

    def warm_start(self, start: float) -> Optional[WarmStart]:
        """Where a decode warm-started at ``start`` in (0, 1] begins; None for 1 (x_T ~ N(0, I)).

        t0 = round(start·T) on the original T-step process; the first step run is the last respaced
        position whose original timestep is <= t0, and x is noised to that position's own abar
        (so the model's time input matches the noise level it sees). ``start == 1`` is the plain
        decode, pure noise: sqrt(abar_T) is about 0.006, and keeping that decode bit-for-bit
        matters more than a 0.6% trace of the MSE image."""
        check_start(start)
        if start == 1:
            return None
        t0 = round(start * self.original_num_steps)
        below = np.nonzero(self.timestep_map <= t0)[0]
        if len(below) == 0:
            raise ValueError(f"start={start}: no step of the schedule lies at or below t0 = {t0}")
        p = int(below[-1])
        abar = float(self.alphas_cumprod[p])
        return WarmStart(p, math.sqrt(abar), math.sqrt(1.0 - abar))


def check_start(start) -> float:
    """``start`` (a warm start's t0 / T) if it is a number in (0, 1], else ValueError."""
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1:
        raise ValueError(f"start must be a number in (0, 1], got {start!r}")
    return start


class WarmStart(NamedTuple):
    """A warm start: x_t = sqrt_abar·x_mse + sqrt_one_minus_abar·eps, first step ``position``."""

    position: int
    sqrt_abar: float
    sqrt_one_minus_abar: float
