"""DDPM and DDIM reverse steps split into ``predict`` and ``step``.

``predict(model_out, x_t, i)`` turns one UNet output into the clipped x0
estimate, the step mean and the noise std; it is differentiable in ``x_t``
(DPS needs d||y - A(x0)|| / d x_t). ``step(pred, noise, i)`` adds the noise.
Neither draws random numbers nor keeps state, so any backend that computes the
UNet output elsewhere (ONNX Runtime, TensorRT, a CUDA graph) reuses them.

The step index ``i`` is the position in the respaced schedule (N'-1 down to 0),
**per sample**: a Python int or 0-dim integer tensor (every image at the same
step), or an ``(N,)`` integer tensor (image k at step ``i[k]``). Everything a
step needs sits in one float32 ``(N', K)`` table, :meth:`Sampler.coefficients`,
whose columns :attr:`Sampler.columns` names; a step gathers its rows on the
device (:meth:`Sampler.rows`), so a tensor ``i`` never forces a host sync
(CUDA-graph friendly). The last column, ``nonzero``, is 0 at i == 0: the
"no noise on the last step" rule as data. Backends, the fused kernels and the
ONNX step graph all read this one table; the first two columns are always
``sqrt(1/abar)`` and ``sqrt(1/abar - 1)``, the x0 formula's coefficients
(:meth:`.process.DiffusionProcess.x0`, its one definition).

The table is computed in float64 from the schedule and cast once; the reference
casts each float64 coefficient to float32 at use and computes the DDIM sigma in
float32, so coefficients can differ from it by one float32 ulp.

What the model output means is the sampler's :class:`~.process.DiffusionProcess` (default:
guided-diffusion's, ``ADM_PROCESS``: epsilon prediction with ``learned_range`` variance, a
``2·C``-channel output eps | v, x0 clipped to [-1, 1]); a diffusers prior brings its own
(prediction ``epsilon`` / ``sample`` / ``v_prediction``, variance ``fixed_small`` / ``fixed_large``
/ ``learned`` / ``learned_range``, ``clip_sample``), with the same table columns. DDPM needs the
variance channels exactly when the variance is learned; DDIM reads the first C channels only.
"""
from __future__ import annotations

import abc
import copy
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..decode_request import check_choice
from .process import ADM_PROCESS, DiffusionProcess
from .schedule import Schedule

__all__ = ["SAMPLERS", "DDIMSampler", "DDPMSampler", "Prediction", "Sampler", "StackedSampler", "make_sampler",
           "per_sample"]


class Prediction(NamedTuple):
    x0: Tensor  # clamped to [-1, 1]
    mean: Tensor  # mean of x_{t-1}
    sigma: Tensor  # std of x_{t-1} (x's shape); step() drops it at i == 0


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """An (N,) tensor shaped to broadcast over ``like`` (N, C, H, W); a 0-dim one stays as is."""
    return v if v.ndim == 0 else v.view(-1, *([1] * (like.ndim - 1)))


class Sampler(abc.ABC):
    """Float32 per-step tables on one device, built once from a float64 schedule.

    Subclasses declare their ``name`` (the key of :data:`SAMPLERS`, and their :meth:`family`), name
    their table's columns in ``columns`` (first the two x0 coefficients, last ``nonzero``) and
    implement :meth:`predict_rows`.
    """

    name: ClassVar[str]
    columns: tuple[str, ...] = ()

    def __init__(self, schedule: Schedule, columns: list[np.ndarray]):
        self.schedule = schedule
        nonzero = np.ones(schedule.num_steps)
        nonzero[0] = 0.0
        table = np.stack([*columns, nonzero], axis=1)
        if table.shape[1] != len(self.columns):
            raise AssertionError(f"{type(self).__name__}: {table.shape[1]} columns for names {self.columns}")
        self._table = torch.from_numpy(table).float()
        self.timesteps = torch.from_numpy(schedule.timestep_map).long()
        # sqrt(abar) of step i - 1 per row (1 at i == 0): 1/sqrt(1/abar) of the previous row in
        # float32, kept as a vector so that stacked tables keep each respacing's own first row.
        self._sqrt_abar_prev = torch.cat([torch.ones(1), 1 / self._table[:-1, 0]])

    @classmethod
    def make(cls, schedule: Schedule, *, eta: float = 1.0, process: DiffusionProcess = ADM_PROCESS) -> Sampler:
        """The sampler of a decode's options (:func:`make_sampler`); ``eta`` is DDIM's only."""
        return cls(schedule, process=process)

    @property
    def num_steps(self) -> int:
        return self._table.shape[0]

    def family(self) -> tuple:
        """Samplers of one family share ``predict_rows``/``step_rows`` and differ only in their
        table rows, so their tables stack into one (:class:`StackedSampler`): the declared ``name``
        and whatever else the step functions depend on (the process; DDIM's eta)."""
        return (self.name, self.process.kind())

    @property
    def device(self) -> torch.device:
        return self._table.device

    def coefficients(self) -> Tensor:
        """The float32 ``(num_steps, len(columns))`` table: row i holds every scalar of step i."""
        return self._table

    def to(self, device) -> Sampler:
        """A copy whose tables live on ``device`` (the schedule is shared)."""
        moved = copy.copy(self)
        moved._table = self._table.to(device)
        moved.timesteps = self.timesteps.to(device)
        moved._sqrt_abar_prev = self._sqrt_abar_prev.to(device)
        return moved

    def _index(self, i) -> Tensor | int:
        """``i`` checked: an int, or an integer tensor of 0 or 1 dims (its values are not checked:
        that would sync with the device)."""
        if isinstance(i, Tensor):
            if i.ndim > 1 or i.dtype.is_floating_point or i.dtype == torch.bool:
                raise ValueError("a tensor step index must be a 0-dim or (N,) integer tensor")
            return i
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_steps:
            raise ValueError(f"step index must be an int in [0, {self.num_steps}), got {i!r}")
        return int(i)

    def rows(self, i) -> Tensor:
        """The table rows of step ``i``: ``(K,)`` for one index, ``(N, K)`` for an (N,) tensor."""
        i = self._index(i)
        if isinstance(i, int):
            return self._table[i]
        # index_select on the device: plain indexing with a tensor may read it back to the host.
        return self._table.index_select(0, i.reshape(-1)).reshape(*i.shape, -1)

    def sqrt_abar_prev(self, i) -> Tensor:
        """sqrt(abar) of step i - 1 (1 at i == 0), from column 0 (sqrt(1/abar)) of the previous
        row: 0-dim for an int, (N,) for an (N,) tensor, gathered on the device."""
        i = self._index(i)
        if isinstance(i, int):
            return self._sqrt_abar_prev[i]
        return self._sqrt_abar_prev.index_select(0, i.reshape(-1)).reshape(i.shape)

    def model_timesteps(self, i, batch: int) -> Tensor:
        """The UNet time input for step ``i``: ``timestep_map[i]`` as a long ``(batch,)`` tensor."""
        i = self._index(i)
        if isinstance(i, int):
            return self.timesteps[i].expand(batch)
        t = self.timesteps.index_select(0, i.reshape(-1))
        if i.ndim == 1 and i.shape[0] != batch:
            raise ValueError(f"{i.shape[0]} step indices for a batch of {batch}")
        return t.expand(batch)

    process: DiffusionProcess = ADM_PROCESS  # what the model output means (see the module doc)

    def _split(self, model_out: Tensor, x_t: Tensor, allow_eps_only: bool) -> tuple[Tensor, Tensor | None]:
        n, c = x_t.shape[:2]
        if model_out.ndim != x_t.ndim or model_out.shape[0] != n or model_out.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model output shape {tuple(model_out.shape)} does not match x_t {tuple(x_t.shape)}")
        if model_out.shape[1] == 2 * c:
            eps, v = model_out.split(c, dim=1)
            return eps, v
        if allow_eps_only and model_out.shape[1] == c:
            return model_out, None
        want = f"{2 * c} (eps | v)" + (f" or {c} (eps)" if allow_eps_only else "")
        raise ValueError(f"model output has {model_out.shape[1]} channels, expected {want}")

    @staticmethod
    def _columns(rows: Tensor, like: Tensor) -> list[Tensor]:
        """The columns of ``rows`` ((K,) or (N, K)), each broadcastable over ``like``."""
        return [per_sample(c, like) for c in rows.unbind(-1)]

    def predict(self, model_out: Tensor, x_t: Tensor, i) -> Prediction:
        """x0, mean and sigma of step ``i`` (see the module docstring)."""
        return self.predict_rows(model_out, x_t, self.rows(i))

    @abc.abstractmethod
    def predict_rows(self, model_out: Tensor, x_t: Tensor, rows: Tensor) -> Prediction:
        """:meth:`predict` on the table rows of the step (``(K,)`` or ``(N, K)``)."""

    def step(self, pred: Prediction, noise: Tensor, i) -> Tensor:
        """x_{t-1} = mean + sigma·noise, and mean alone at i == 0."""
        return self.step_rows(pred, noise, self.rows(i))

    def step_rows(self, pred: Prediction, noise: Tensor, rows: Tensor) -> Tensor:
        nonzero = per_sample(rows[..., -1], noise)
        return pred.mean + pred.sigma * noise * nonzero


class DDPMSampler(Sampler):
    """Ancestral sampling (guided-diffusion "ddpm", diffusers' ``DDPMScheduler.step``): the mean
    of q(x_{t-1} | x_t, x0) and the std of the process's variance type (guided-diffusion's
    learned range by default)."""

    name = "ddpm"
    columns = ("sqrt_recip_abar", "sqrt_recipm1_abar", "c1", "c2", "log_beta", "plv", "nonzero")

    def __init__(self, schedule: Schedule, process: DiffusionProcess = ADM_PROCESS):
        self.process = process
        s = schedule
        super().__init__(s, [
            s.sqrt_recip_alphas_cumprod,
            s.sqrt_recipm1_alphas_cumprod,
            s.posterior_mean_coef1,
            s.posterior_mean_coef2,
            np.log(s.betas),  # upper bound of the learned log-variance
            s.posterior_log_variance_clipped,  # lower bound
        ])

    def predict_rows(self, model_out: Tensor, x_t: Tensor, rows: Tensor) -> Prediction:
        recip, recipm1, coef1, coef2, max_log, min_log, _ = self._columns(rows, x_t)
        variance = self.process.variance
        if variance.learned:
            out, v = self._split(model_out, x_t, allow_eps_only=False)
        else:
            out, v = self._split_fixed(model_out, x_t), None
        x0 = self.process.x0(out, x_t, recip, recipm1)
        mean = coef1 * x0 + coef2 * x_t
        return Prediction(x0, mean, variance.sigma(v, max_log, min_log, x_t))

    def _split_fixed(self, model_out: Tensor, x_t: Tensor) -> Tensor:
        """The C-channel output of a fixed-variance process (diffusers also ignores a second half)."""
        return self._split(model_out, x_t, allow_eps_only=True)[0]


class DDIMSampler(Sampler):
    """DDIM (guided-diffusion "ddim"); eta = 1 as in the shipped configs.

    eps is re-derived from the clipped x0, and
    ``sigma = eta·sqrt((1 - abar_prev)/(1 - abar))·sqrt(1 - abar/abar_prev)``
    is one scalar per step and sample (0 at i == 0, where abar_prev = 1).
    """

    name = "ddim"
    columns = ("sqrt_recip_abar", "sqrt_recipm1_abar", "sqrt_abar_prev", "sigma", "eps_coef", "nonzero")

    def __init__(self, schedule: Schedule, eta: float = 1.0, process: DiffusionProcess = ADM_PROCESS):
        self.process = process
        eta = float(eta)
        if not np.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        s = schedule
        abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        eps_var = 1 - abar_prev - sigma**2
        if (eps_var < -1e-12).any():
            raise ValueError(f"eta = {eta} makes the DDIM noise variance exceed 1 - abar_prev")
        super().__init__(s, [
            s.sqrt_recip_alphas_cumprod,
            s.sqrt_recipm1_alphas_cumprod,
            np.sqrt(abar_prev),
            sigma,
            np.sqrt(np.maximum(eps_var, 0.0)),
        ])
        self.eta = eta

    @classmethod
    def make(cls, schedule: Schedule, *, eta: float = 1.0, process: DiffusionProcess = ADM_PROCESS) -> Sampler:
        return cls(schedule, eta=eta, process=process)

    def family(self) -> tuple:
        return (*super().family(), self.eta)

    def predict_rows(self, model_out: Tensor, x_t: Tensor, rows: Tensor) -> Prediction:
        recip, recipm1, sqrt_abar_prev, sigma, eps_coef, _ = self._columns(rows, x_t)
        out, _ = self._split(model_out, x_t, allow_eps_only=True)
        x0 = self.process.x0(out, x_t, recip, recipm1)
        # eps implied by the clipped x0 (diffusers' use_clipped_model_output=True)
        eps = (recip * x_t - x0) / recipm1
        mean = x0 * sqrt_abar_prev + eps_coef * eps
        return Prediction(x0, mean, sigma.expand_as(x_t))


class StackedSampler(Sampler):
    """Several samplers of one :meth:`~Sampler.family` (e.g. the 1000-, 100- and 50-step
    respacings of DDPM) as one table: row ``offsets[k] + i`` is step i of ``samplers[k]``, so one
    batched step runs images of different respacings, each at its own row. ``align``: every
    offset is a multiple of it (DSG's interval then reads ``row % interval`` as ``i % interval``).
    """

    name = "stacked"  # its family is its members'

    def __init__(self, samplers, align: int = 1):
        samplers = list(samplers)
        if not samplers or len({s.family() for s in samplers}) != 1:
            raise ValueError(f"only samplers of one family stack, got {[s.family() for s in samplers]}")
        if len({s.device for s in samplers}) != 1:
            raise ValueError("samplers to stack must have their tables on one device")
        self.samplers, self.columns, self.offsets = samplers, samplers[0].columns, []
        tables, timesteps, prev, rows = [], [], [], 0
        for s in samplers:
            pad = -rows % align
            if pad:  # unused rows (never indexed): copies of the next sampler's first row
                tables.append(s._table[:1].expand(pad, -1))
                timesteps.append(s.timesteps[:1].expand(pad))
                prev.append(s._sqrt_abar_prev[:1].expand(pad))
                rows += pad
            self.offsets.append(rows)
            tables.append(s._table)
            timesteps.append(s.timesteps)
            prev.append(s._sqrt_abar_prev)
            rows += s.num_steps
        self.schedule = None  # one per stacked sampler: ``samplers[k].schedule``
        self.process = samplers[0].process
        self._table, self.timesteps, self._sqrt_abar_prev = torch.cat(tables), torch.cat(timesteps), torch.cat(prev)

    def family(self) -> tuple:
        return self.samplers[0].family()

    def predict_rows(self, model_out: Tensor, x_t: Tensor, rows: Tensor) -> Prediction:
        return self.samplers[0].predict_rows(model_out, x_t, rows)


SAMPLERS = {s.name: s for s in (DDPMSampler, DDIMSampler)}  # by name, as Decoder(sampler=...) and the CLI take it


def make_sampler(name: str, schedule: Schedule, *, eta: float = 1.0,
                 process: DiffusionProcess = ADM_PROCESS) -> Sampler:
    """The sampler ``name`` of :data:`SAMPLERS` on ``schedule`` (``eta``: DDIM's) for a prior of
    diffusion ``process`` (whose respacing ``schedule`` is)."""
    return SAMPLERS[check_choice("sampler", name, tuple(SAMPLERS))].make(schedule, eta=eta, process=process)
