"""Diffusion sampling: schedules, DDPM/DDIM steps, idempotence guidance (DPS, DSG), the guided
step written once (:mod:`.step`) and the per-image sampling state (:mod:`.guided_sampler`). The
step-level batching of requests is serving, not diffusion: :mod:`idemrt.batching`.

Small stateless pieces in the style of diffusers' schedulers; the loop owns the random numbers.
"""
from .guidance import DPS, DSG, GUIDANCE, PIR, Guidance, RetryPolicy, distance, make_guidance
from .guided_sampler import GuidedSampler, ImageState, Program
from .samplers import SAMPLERS, DDIMSampler, DDPMSampler, Prediction, Sampler, StackedSampler, make_sampler
from .process import ADM_PROCESS, PREDICTIONS, VARIANCES, DiffusionProcess, diffusion_process
from .schedule import Schedule, WarmStart, linear_betas, space_timesteps
from .step import (ProximalStep, StepGradient, finish_proximal, finish_step, guided_step, plain_step, proximal_step,
                   proximal_x0, step_gradient)


__all__ = [
    "ADM_PROCESS",
    "DiffusionProcess",
    "PREDICTIONS",
    "VARIANCES",
    "diffusion_process",
    "DDIMSampler",
    "DDPMSampler",
    "DPS",
    "DSG",
    "PIR",
    "ProximalStep",
    "WarmStart",
    "finish_proximal",
    "make_guidance",
    "make_sampler",
    "proximal_step",
    "proximal_x0",
    "GUIDANCE",
    "Guidance",
    "Program",
    "StackedSampler",
    "GuidedSampler",
    "ImageState",
    "Prediction",
    "RetryPolicy",
    "SAMPLERS",
    "Sampler",
    "Schedule",
    "StepGradient",
    "distance",
    "finish_step",
    "guided_step",
    "linear_betas",
    "plain_step",
    "space_timesteps",
    "step_gradient",
]
