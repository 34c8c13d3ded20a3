"""Diffusion sampling: schedules, DDPM/DDIM steps, idempotence guidance (DPS, DSG), the guided
step written once (:mod:`.step`) and the per-image sampling loop (:mod:`.guided_sampler`).

Small stateless pieces in the style of diffusers' schedulers; the loop owns the random numbers.
"""
from .guidance import DPS, DSG, GUIDANCE, RetryPolicy, distance
from .guided_sampler import GuidedSampler, ImageState, SampleResult
from .samplers import DDIMSampler, DDPMSampler, Prediction, Sampler, x0_from_eps
from .schedule import Schedule, linear_betas, space_timesteps
from .step import StepGradient, finish_step, guided_step, plain_step, step_gradient

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}  # by name, as Decoder(sampler=...) and the CLI take it

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPS",
    "DSG",
    "GUIDANCE",
    "GuidedSampler",
    "ImageState",
    "Prediction",
    "RetryPolicy",
    "SAMPLERS",
    "SampleResult",
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
    "x0_from_eps",
]
