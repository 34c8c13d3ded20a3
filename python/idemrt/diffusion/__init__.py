"""Diffusion sampling: schedules, DDPM/DDIM steps and idempotence guidance (DPS, DSG).

Small stateless pieces in the style of diffusers' schedulers; the decoder owns
the loop and the random numbers.
"""
from .guidance import DPS, DSG, RetryPolicy, distance
from .samplers import DDIMSampler, DDPMSampler, Prediction
from .schedule import Schedule, linear_betas, space_timesteps
from .step import guided_step, plain_step

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPS",
    "DSG",
    "Prediction",
    "RetryPolicy",
    "Schedule",
    "distance",
    "guided_step",
    "linear_betas",
    "plain_step",
    "space_timesteps",
]
