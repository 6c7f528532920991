"""Gaussian diffusion for DiT in JAX (port of the official DiT `diffusion/` package, NHWC)."""
from dit_jax.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    spaced_diffusion,
)
from dit_jax.diffusion.flow import FlowProcess
from dit_jax.diffusion.process import (OFFICIAL_PROCESS, PROCESSES, DiffusionProcess, Process,
                                       process_from_config, process_from_dict)
from dit_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from dit_jax.diffusion.schedules import (
    betas_for_alpha_bar,
    get_named_beta_schedule,
    respace_betas,
    space_timesteps,
)

__all__ = [
    "DiffusionProcess",
    "FlowProcess",
    "OFFICIAL_PROCESS",
    "PROCESSES",
    "GaussianDiffusion",
    "Process",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "continuous_gaussian_log_likelihood",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "process_from_config",
    "process_from_dict",
    "respace_betas",
    "space_timesteps",
    "spaced_diffusion",
]
