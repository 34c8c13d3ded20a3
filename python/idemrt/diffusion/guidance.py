"""Idempotence guidance: the constraint distance, DPS, DSG and the retry rule.

The constraint is ``||y - A(x0_hat)||_2`` with y the MSE-codec reconstruction
and A the codec round trip, both in [-1, 1] units (docs/reference_code.md §2.8).

Deviation from the reference, on purpose: every norm here is taken **per
sample** (over C, H, W). The reference takes each norm over the whole tensor,
batch included, which couples the images of a batch (each gradient is divided
by the joint norm). At batch 1 the two agree; with per-sample norms an image
decodes the same alone or in a batch.

``update(sample, pred, grad, i, scale=None)`` takes a precomputed ``grad = d dist / d x_t``
(one sample's distance differentiated w.r.t. its own step input), so backends
that compute the gradient elsewhere reuse it. Like the samplers, guidance works
per sample: ``i`` may be an (N,) tensor of step indices, and ``scale`` an (N,)
tensor of DPS step lengths (the object's ``scale`` is the default), so a retry
at a larger scale is data, not a new object. Guidance objects hold constants
only; :data:`GUIDANCE` registers them by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .samplers import Prediction, per_sample

_EPS = 1e-8  # DSG's guard against a zero norm (reference constant)


def _per_sample_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def distance(target: Tensor, a_x0: Tensor) -> Tensor:
    """``||target - A(x0)||_2`` per sample, plain (not squared): shape (N,)."""
    if target.shape != a_x0.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from A(x0) shape {tuple(a_x0.shape)}")
    return _per_sample_norm(target - a_x0)


def _check_finite(name: str, value: float, minimum: float = 0.0) -> float:
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
    return value


StepKind = Literal["gradient", "proximal"]


@runtime_checkable
class Guidance(Protocol):
    """What a step function needs to know of a guidance, declared by each class.

    ``step_kind``: "gradient" (the UNet is differentiated: x_{t-1} = update(sample, grad)) or
    "proximal" (no UNet backward: a data step on x0 through the codec alone). Images whose
    guidance has the same step kind (and whose samplers stack, :meth:`Sampler.family`) can share
    one batched step; the others cannot. ``interval``: every how many steps it guides (1: every
    step; otherwise some steps run the UNet alone, and a backend needs that step too).
    ``default_scale()``: the DPS step length a retry scales, or None when the guidance has none
    (then no retry is made)."""

    name: ClassVar[str]
    step_kind: ClassVar[StepKind]
    interval: int

    def default_scale(self) -> Optional[float]: ...

    def active(self, i): ...


class StackRow(NamedTuple):
    """How one step of a gradient guidance runs in a stacked step table (:class:`StackedGuidance`)."""

    sphere: bool  # DSG's step on the sphere (else DPS's ``sample - scale·grad``)
    on: bool  # guided at this step
    rate: float  # the sphere step's guidance rate
    scale: float  # the DPS step's default scale


@runtime_checkable
class Stackable(Guidance, Protocol):
    """A gradient guidance whose steps a :class:`StackedGuidance` can run: it declares each step's row."""

    def stack_row(self, i: int) -> StackRow: ...


@dataclass(frozen=True)
class DPS:
    """Diffusion posterior sampling ('ps'): ``x_{t-1} = sample - scale·grad``.

    grad has a fixed length scale (the distance is a plain norm), so ``scale``
    is a step length; 0.6 in the shipped configs.
    """

    name: ClassVar[str] = "dps"
    step_kind: ClassVar[StepKind] = "gradient"
    interval: ClassVar[int] = 1
    scale: float = 0.6

    def __post_init__(self):
        _check_finite("DPS scale", self.scale)

    def default_scale(self) -> Optional[float]:
        return self.scale

    def active(self, i) -> bool:
        return True

    def stack_row(self, i: int) -> StackRow:
        return StackRow(sphere=False, on=True, rate=0.0, scale=self.scale)

    def update(self, sample: Tensor, pred: Prediction, grad: Tensor, i, scale: Tensor | None = None) -> Tensor:
        """``sample - scale·grad``; ``scale`` (N,) per sample, default this object's."""
        return sample - grad * (self.scale if scale is None else per_sample(scale, grad))


@dataclass(frozen=True)
class DSG:
    """Diffusion with spherical Gaussian constraint (the reference's 'DSG').

    On guided steps (``i % interval == 0``) the step is re-aimed on the sphere
    of radius ``r = sqrt(C·H·W)·sigma_t`` around the mean, between the sampled
    direction and the steepest descent of the distance:
    ``mix = d_sample + rate·(d_star - d_sample)``, ``x = mean + r·mix/||mix||``.
    sigma_t is the first element of each sample's std (a scalar for DDIM; at
    i == 0 it is 0, so DDIM's last step returns the mean). Off-interval steps
    return the sample unguided (and :func:`guided_step` reports distance 0).
    The config's ``scale`` is not used by DSG, as in the reference (nor is a
    per-sample ``scale``: DSG's step length is the sphere's radius).
    """

    name: ClassVar[str] = "dsg"
    step_kind: ClassVar[StepKind] = "gradient"
    interval: int = 1
    guidance_rate: float = 0.1  # hard-coded to 0.1 in the reference

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DSG interval must be an int >= 1, got {self.interval!r}")
        _check_finite("DSG guidance_rate", self.guidance_rate)

    def default_scale(self) -> Optional[float]:
        return None

    def active(self, i) -> bool | Tensor:
        """Whether step ``i`` is guided: a bool, or a bool tensor of ``i``'s shape (per sample)."""
        if self.interval == 1:
            return True
        return i % self.interval == 0

    def stack_row(self, i: int) -> StackRow:
        return StackRow(sphere=True, on=bool(self.active(i)), rate=self.guidance_rate, scale=0.0)

    def update(self, sample: Tensor, pred: Prediction, grad: Tensor, i, scale: Tensor | None = None) -> Tensor:
        on = self.active(i)
        if on is False:
            return sample
        guided = _sphere_step(sample, pred, grad, self.guidance_rate)
        # A tensor i (graph capture, per-sample steps) selects without a host sync.
        return guided if on is True else torch.where(per_sample(on, sample), guided, sample)


def _sphere_step(sample: Tensor, pred: Prediction, grad: Tensor, rate) -> Tensor:
    """DSG's guided sample (every sample guided); ``rate`` a float or per-sample (N, 1, 1, 1)."""
    c_h_w = sample[0].numel()
    r = per_sample(math.sqrt(c_h_w) * pred.sigma.expand_as(sample).flatten(1)[:, 0], sample)
    d_star = -r * grad / (per_sample(_per_sample_norm(grad), grad) + _EPS)
    d_sample = sample - pred.mean
    mix = d_sample + rate * (d_star - d_sample)
    return pred.mean + mix / (per_sample(_per_sample_norm(mix), mix) + _EPS) * r


@dataclass(frozen=True)
class PIR:
    """Codec-gradient guidance ('pir', plug-and-play image restoration in the manner of DiffPIR).

    No UNet backward: x0 comes from one UNet forward, then a *data step* pulls it towards the
    codec's constraint, ``x0' ≈ argmin_z ½||A(z) - y||² + ½ρ_t||z - x0||²``, by ``iters``
    gradient steps through the codec operator only (A's vector-Jacobian product), each of length
    ``step_size/(jac_norm2 + ρ_t)``, ``jac_norm2`` an estimate of ||J_A||² (1: exact proximal point
    in one step for A = I, ``(y + ρ x0)/(1 + ρ)``). Gradient descent converges while
    ``step_size·(||J||² + ρ_t)/(jac_norm2 + ρ_t) < 2``; the demo codec's ||J||² is about 2.9.
    ``ρ_t = lam·abar_t/(1 - abar_t)``, DiffPIR's ``λσ_n²/σ_t²`` with ``lam`` = λσ_n²: early (noisy)
    steps follow the codec, late ones trust the denoiser. The update re-noises x0' with the noise
    it implies, ``x_{t-1} = sqrt(abar')·x0' + sqrt(1-abar')·(sqrt(1-zeta)·eps_hat + sqrt(zeta)·eps)``
    (:func:`idemrt.diffusion.step.finish_proximal`). ``iters`` is fixed, so a step is a fixed
    graph (CUDA-graph capturable, ONNX-exportable). ``clip``: clamp x0' to [-1, 1] (off only for
    checking the data step against its closed form).
    """

    name: ClassVar[str] = "pir"
    step_kind: ClassVar[StepKind] = "proximal"  # backends run the proximal step, not gradient + update
    interval: ClassVar[int] = 1
    # Defaults from a sweep on the demo models (docs/fast_modes.md): the demo codec's ||J||² is
    # about 2.9, so jac_norm2 = 3 keeps every data step contracting.
    iters: int = 4
    lam: float = 0.03
    zeta: float = 0.9
    step_size: float = 1.0
    jac_norm2: float = 3.0
    clip: bool = True

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"PIR iters must be an int >= 0, got {self.iters!r}")
        _check_finite("PIR lam", self.lam)
        _check_finite("PIR step_size", self.step_size)
        if _check_finite("PIR jac_norm2", self.jac_norm2) <= 0:
            raise ValueError(f"PIR jac_norm2 must be > 0, got {self.jac_norm2}")
        if not 0 <= _check_finite("PIR zeta", self.zeta) <= 1:
            raise ValueError(f"PIR zeta must lie in [0, 1], got {self.zeta}")

    def active(self, i) -> bool:
        return True

    def default_scale(self) -> Optional[float]:
        return None

    def rho(self, rows: Tensor, like: Tensor) -> Tensor:
        """ρ_t per sample from the sampler rows (column 1 is sqrt(1/abar - 1): ρ = lam/it²)."""
        return per_sample(self.lam / rows[..., 1].square(), like)

    def data_step(self, operator, x0: Tensor, target: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0', ||target - A(x0')||)``: the proximal data step from ``x0`` (detached outputs).
        Only the operator is differentiated, with respect to its input."""
        rho = self.rho(rows, x0)
        eta = self.step_size / (self.jac_norm2 + rho)
        z = x0.detach()
        for _ in range(self.iters):
            with torch.enable_grad():
                zz = z.requires_grad_(True)
                residual = operator(zz) - target
                # J^T r: the gradient of ½||A(z) - y||², each sample's own (samples are independent).
                (jt_r,) = torch.autograd.grad(residual, zz, grad_outputs=residual.detach())
            z = (z - eta * (jt_r + rho * (z - x0))).detach()
        if self.clip:
            z = z.clamp(-1, 1)
        with torch.no_grad():
            return z, distance(target, operator(z))


class StackedGuidance:
    """Gradient guidances (DPS, DSG) of several programs as one, per row of a stacked step table
    (:class:`~idemrt.diffusion.samplers.StackedSampler`): rows ``offsets[k]`` to
    ``offsets[k] + lengths[k] - 1`` are guided by ``members[k]``. One step function then runs a
    batch mixing DPS and DSG images: both updates are computed and each sample keeps its own. A
    DPS row's default scale is its member's; a per-sample ``scale`` overrides it, as for DPS."""

    name: ClassVar[str] = "stacked"
    step_kind: ClassVar[StepKind] = "gradient"

    def __init__(self, members: Sequence, offsets: Sequence[int], lengths: Sequence[int]):
        if any(m.step_kind != "gradient" or not isinstance(m, Stackable) for m in members):
            raise ValueError(f"only gradient guidances that declare their stack rows (DPS, DSG) stack, got "
                             f"{[m.name for m in members]}")
        rows = max(o + n for o, n in zip(offsets, lengths))
        self.members = tuple(members)
        # Every member guides every interval-th row of its own (its offset aligned to it: stack_alignment).
        self.interval = stack_alignment(members)
        self._dsg, self._on, self._rate, self._scale = [False] * rows, [True] * rows, [0.0] * rows, [0.0] * rows
        for m, offset, n in zip(members, offsets, lengths):
            for i in range(n):
                r = offset + i
                self._dsg[r], self._on[r], self._rate[r], self._scale[r] = m.stack_row(i)
        self._tables: dict = {}  # device -> the per-row tensors

    def default_scale(self) -> Optional[float]:
        return None  # per row: see update()

    def _rows(self, i, like: Tensor):
        key = str(like.device)
        if key not in self._tables:
            self._tables[key] = tuple(torch.tensor(v, device=like.device) for v in
                                      (self._dsg, self._on, self._rate, self._scale))
        return tuple(t[i] if isinstance(i, int) else t.index_select(0, i.reshape(-1)) for t in self._tables[key])

    def active(self, i) -> bool | Tensor:
        if isinstance(i, int):
            return self._on[i]
        dsg, on, _, _ = self._rows(i, i)
        return on

    def update(self, sample: Tensor, pred: Prediction, grad: Tensor, i, scale: Tensor | None = None) -> Tensor:
        dsg, on, rate, default = (per_sample(t, sample) if t.ndim else t for t in self._rows(i, sample))
        dps = sample - grad * (default if scale is None else per_sample(scale, grad))
        guided = _sphere_step(sample, pred, grad, rate)
        return torch.where(dsg, torch.where(on, guided, sample), dps)


def stack_guidance(members: Sequence, offsets: Sequence[int], lengths: Sequence[int]):
    """One guidance for programs stacked at ``offsets`` (see :class:`StackedGuidance`): the shared
    member itself when all are equal (DSG's interval then needs offsets aligned to it:
    :func:`stack_alignment`), else a :class:`StackedGuidance`."""
    if len(set(members)) == 1:
        return members[0]
    return StackedGuidance(members, offsets, lengths)


def stack_alignment(members: Sequence) -> int:
    """The row alignment stacked programs of these guidances need: their intervals' least common
    multiple (1 unless DSG guides every few steps)."""
    return math.lcm(*(m.interval for m in members))


GUIDANCE = {g.name: g for g in (DPS, DSG, PIR)}  # by name, as Decoder(guidance=...) and the CLI take it


def make_guidance(name: str, *, scale: Optional[float] = None, interval: int = 1, options: Optional[dict] = None):
    """The guidance object of ``name`` ("none": None): DPS's ``scale`` (default 0.6), DSG's
    ``interval``, and ``options`` — further fields of the class (e.g. PIR's iters, lam, zeta)."""
    if name == "none":
        return None
    if name not in GUIDANCE:
        raise ValueError(f"guidance must be one of {(*GUIDANCE, 'none')}, got {name!r}")
    kind = GUIDANCE[name]
    fields = {"dps": {"scale": 0.6 if scale is None else scale}, "dsg": {"interval": interval}}.get(name, {})
    fields.update(options or {})
    try:
        return kind(**fields)
    except TypeError:
        raise ValueError(f"guidance {name!r} does not take these options: {sorted(options or {})}") from None


@dataclass(frozen=True)
class RetryPolicy:
    """When an image is sampled again (a fresh x_T from its own generator), per image.

    * The reference's outer loop (run_codec.py): while the final distance exceeds
      ``threshold``, multiply the DPS scale by ``factor``, at most ``max_retries`` times (0 in
      every shipped config: ``maxrepeat = 1``). The last attempt is kept even if worse. Unlike
      the reference, a non-finite distance counts as above the threshold.
    * Non-finite values (idemrt's own): multiply the DPS scale by ``nan_factor``, at most
      ``nan_retries`` times; after that the decode fails.

    Only DPS has a scale to change: with other guidance no retry is made.
    """

    threshold: float = 20.0
    factor: float = 1.5
    max_retries: int = 0
    nan_factor: float = 0.5
    nan_retries: int = 1

    def __post_init__(self):
        _check_finite("retry threshold", self.threshold)
        _check_finite("retry factor", self.factor)
        _check_finite("non-finite retry factor", self.nan_factor)
        for name in ("max_retries", "nan_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def needs_retry(self, distances: Tensor, retries_done) -> Tensor:
        """Per sample (bool (N,)): retry this image for its distance? ``retries_done``: an int or
        an (N,) tensor of the distance retries each image has had."""
        retries_done = torch.as_tensor(retries_done, device=distances.device)
        return (retries_done < self.max_retries) & ~(distances <= self.threshold)

    def next_scale(self, scale: float) -> float:
        return scale * self.factor
