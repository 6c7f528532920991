"""DDPM: ancestral sampling (Ho et al. 2020), the paper's sampler at 250 evenly spaced steps.

`p_sample` and `p_sample_loop` are the official `GaussianDiffusion` methods of those names, as
functions of a (respaced) `GaussianDiffusion`; `sampler` is the registry's entry.
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from dit_jax.diffusion import DiffusionProcess, GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.noise import standard_normal
from dit_jax.samplers.loop import (DenoisedFn, Loop, SamplerOptions, nonzero_mask,
                                   reverse_steps, run, step_indices)


def p_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
             rng: jax.Array, clip_denoised: bool = True,
             denoised_fn: DenoisedFn = None,
             model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
  """Ancestral sample of x_{t-1} (no noise where t == 0): dict(sample, pred_xstart)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, model_kwargs=model_kwargs)
  noise = standard_normal(rng, x.shape, x.dtype)
  sample = out["mean"] + nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array,
                  rng: jax.Array, clip_denoised: bool = True,
                  denoised_fn: DenoisedFn = None,
                  model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Ancestral sampling from `noise` `[N, H, W, C]` down to step 0; returns `[N, H, W, C]`.

  Step i (counting down in this process) uses the key `jax.random.fold_in(rng, i)`.
  """
  return run(_loop(diffusion, model_fn, noise, rng, clip_denoised, denoised_fn, model_kwargs))


def sampler(process: DiffusionProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
            num_steps: int, clip_denoised: bool, eta: float,
            model_kwargs: Mapping[str, Any], options: SamplerOptions = SamplerOptions()) -> Loop:
  """Ancestral sampling on num_steps evenly spaced steps (the paper: 250).

  The noise is the posterior's: `eta` is not used; nor are `options` (the flow samplers').
  """
  del eta, options
  return _loop(process.diffusion(str(num_steps)), model_fn, noise, rng, clip_denoised, None,
               model_kwargs)


def _loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array, rng: jax.Array,
          clip_denoised: bool, denoised_fn: DenoisedFn,
          model_kwargs: Optional[Mapping[str, Any]]) -> Loop:
  def step(x, i):
    out = p_sample(diffusion, model_fn, x, step_indices(i, x), jax.random.fold_in(rng, i),
                   clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                   model_kwargs=model_kwargs)
    return out["sample"].astype(x.dtype)  # the scan carry keeps its dtype
  return Loop(init=noise, step=step, xs=reverse_steps(diffusion))
