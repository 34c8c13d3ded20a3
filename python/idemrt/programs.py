"""One factory: a :class:`~idemrt.decode_config.DecodeConfig` becomes what runs it, in one place,
for the :class:`~idemrt.Decoder` and the decode service's engine alike.

* :class:`DecodeProgram` — a config made concrete for one prior on one device: its respaced
  schedule, warm start, sampler table, guidance, retry policy and network evaluations, its
  :class:`~idemrt.diffusion.Program` (step rows, scale, warm start), and its :meth:`step key
  <DecodeProgram.step_key>`: programs with equal keys share one step function — one step table,
  one backend (one set of CUDA graphs), one :class:`~idemrt.diffusion.GuidedSampler`.
* :func:`build_step_function` — the backend of programs of one key: their tables stacked
  (:class:`~idemrt.diffusion.StackedSampler`; a lone program keeps its own), their guidance
  stacked, the codec's operator (:func:`~idemrt.models.codec.diffusion_operator`), the backend
  the config names. :func:`build_step_group` adds the GuidedSampler and each program's rows.

Which programs share a step function is declared, not probed: the sampler's family
(:meth:`Sampler.family`), the guidance's step kind (DPS and DSG stack; a proximal guidance's data
step is part of the step function, so only equal ones share it), the constraint (the operator),
and how the step runs and is looped (backend, dtype, options, tiling, retries, checks, determinism).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from .backends.base import StepSpec, create_backend
from .decode_config import DecodeConfig
from .defaults import default_backend
from .diffusion import GuidedSampler, Program, RetryPolicy, StackedSampler, diffusion_process, make_guidance
from .diffusion.guidance import stack_alignment, stack_guidance
from .diffusion.samplers import make_sampler
from .models.codec import diffusion_operator
from .models.prior import prior_traits

__all__ = ["DecodeProgram", "StepFunction", "StepGroup", "build_step_function", "build_step_group", "group_sampler"]


@dataclass(eq=False)
class DecodeProgram:
    """A :class:`DecodeConfig` made concrete for ``unet`` (None: the ADM process, MSE decodes only)
    on ``device`` (:meth:`build`)."""

    config: DecodeConfig
    device: torch.device
    process: object  # the prior's diffusion (idemrt.diffusion.DiffusionProcess)
    schedule: object  # its respacing (idemrt.diffusion.Schedule)
    warm_start: object  # Optional[WarmStart]
    sampler: object  # the sampler and its table
    guidance: object  # None without guidance
    retry: RetryPolicy
    backend_name: str
    dtype: Optional[torch.dtype]  # the UNet's compute dtype (None: the backend's)

    @classmethod
    def build(cls, config: DecodeConfig, unet, device) -> DecodeProgram:
        device = torch.device(device)
        process = diffusion_process(unet)
        schedule = process.schedule(config.steps)
        return cls(config=config, device=device, process=process, schedule=schedule,
                   warm_start=schedule.warm_start(config.start),
                   sampler=make_sampler(config.sampler, schedule, eta=config.eta, process=process).to(device),
                   guidance=make_guidance(config.guidance, scale=config.scale, interval=config.interval,
                                          options=config.guidance_options),
                   retry=RetryPolicy(threshold=config.retry_threshold, max_retries=config.max_retries,
                                     nan_retries=config.nan_retries),
                   backend_name=default_backend(device, config.backend),
                   # a prior may name the dtype it computes in (a diffusers prior: float32, not bf16)
                   dtype=prior_traits(unet).compute_dtype if config.dtype is None else config.dtype)

    @property
    def evaluations(self) -> int:
        """Network evaluations of one image (a warm start skips the steps above t0)."""
        return self.schedule.num_steps if self.warm_start is None else self.warm_start.position + 1

    @property
    def scale(self) -> Optional[float]:
        return None if self.guidance is None else self.guidance.default_scale()

    def program(self, offset: int = 0, name: str = "") -> Program:
        """Its :class:`Program`, its rows starting at ``offset`` of a stacked table."""
        return Program(self.schedule.num_steps, self.scale, self.warm_start, offset=offset, name=name)

    def step_key(self) -> tuple:
        """Programs with equal keys share one step function and one GuidedSampler (module doc). It
        holds every setting a group takes from its first member (:func:`build_step_function`,
        :func:`group_sampler`), so a group never takes one that its other members do not share."""
        g, c = self.guidance, self.config
        kind = "none" if g is None else g.step_kind
        return (self.sampler.family(), kind, g if kind == "proximal" else None, c.constraint, self.device,
                self.backend_name, self.dtype, repr(sorted(c.backend_options.items())), repr(c.tile), self.retry,
                c.check_every, c.deterministic)


class StepFunction(NamedTuple):
    backend: object  # runs the step (idemrt.backends)
    num_steps: int  # rows of its step table
    offsets: list  # each member's first row


def build_step_function(members: Sequence[DecodeProgram], unet, codec) -> StepFunction:
    """One backend for ``members`` (programs of one step key): their tables stacked (each
    program's rows from its offset), or a lone program's own table."""
    _one_key(members, "build_step_function")
    first, guidances = members[0], [m.guidance for m in members]
    if len(members) == 1:
        table, guidance, offsets = first.sampler, first.guidance, [0]
    else:
        align = stack_alignment(guidances) if len(set(guidances)) == 1 else 1
        table = StackedSampler([m.sampler for m in members], align=align)
        offsets = table.offsets
        guidance = None if first.guidance is None else stack_guidance(
            guidances, offsets, [m.schedule.num_steps for m in members])
    config = first.config
    spec = StepSpec(unet=unet, operator=diffusion_operator(codec, config.constraint) if guidance is not None else None,
                    codec=codec, constraint=config.constraint, sampler=table, guidance=guidance, tile=config.tile)
    backend = create_backend(first.backend_name, spec, device=first.device, dtype=first.dtype,
                             **dict(config.backend_options))
    return StepFunction(backend, table.num_steps, list(offsets))


class StepGroup(NamedTuple):
    sampler: GuidedSampler  # the loop over the group's backend
    programs: list  # each member's Program, rows at its offset of the group's table


def group_sampler(fn: StepFunction, members: Sequence[DecodeProgram], names=None, noise_device=None) -> StepGroup:
    """The GuidedSampler of ``fn`` (built for ``members`` by :func:`build_step_function`) and each
    member's Program; a lone member's is also the sampler's default program."""
    _one_key(members, "group_sampler")
    first = members[0]
    c = first.config
    sampler = GuidedSampler(fn.backend, fn.num_steps, device=first.device,
                            scale=first.scale if len(members) == 1 else None,
                            retry=first.retry, noise_device=noise_device, check_every=c.check_every,
                            warm_start=first.warm_start if len(members) == 1 else None,
                            deterministic=c.deterministic)
    names = names or [""] * len(members)
    return StepGroup(sampler, [m.program(off, name) for m, off, name in zip(members, fn.offsets, names)])


def _one_key(members: Sequence[DecodeProgram], who: str) -> None:
    """ValueError unless ``members`` share one step key (a group takes its settings from the first)."""
    if len({m.step_key() for m in members}) != 1:
        raise ValueError(f"{who}() takes programs of one step key")


def build_step_group(members: Sequence[DecodeProgram], unet, codec, names=None, noise_device=None) -> StepGroup:
    """One backend and GuidedSampler for ``members`` (programs of one step key): see the module doc."""
    return group_sampler(build_step_function(members, unet, codec), members, names, noise_device)
