"""Class-conditional sample generation with classifier-free guidance, compiled once."""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dit_jax.diffusion import OFFICIAL_PROCESS, DiffusionProcess, GaussianDiffusion
from dit_jax.diffusion.dpm_solver import dpm_solver_pp_sample_loop
from dit_jax.models import DiT

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def make_sample_fn(model: DiT, *, sampler: str = "ddim", num_steps: int = 50,
                   cfg_scale: float = 4.0, guidance_channels: Optional[int] = 3,
                   eta: float = 0.0, clip_denoised: bool = False,
                   process: Optional[DiffusionProcess] = None, out_sharding: Any = None,
                   batch_sharding: Any = None
                   ) -> Callable[..., jax.Array]:
  """Returns jitted `sample(params, labels, rng) -> [N, H, W, C]` (the whole loop compiled once).

  labels: [N] class ids. With cfg_scale != 1 the batch is doubled with null labels as the
  official sample.py does, and the conditional half is returned. `process` is the diffusion the
  model was trained with (its checkpoint's; None: the official one, with the model's
  learn_sigma), respaced here to `num_steps`. `clip_denoised` clips the x0
  prediction to [-1, 1]: right for pixel-space models, wrong for latents. `batch_sharding`
  spreads the batch over devices (a NamedSharding of the batch axis); `out_sharding` is where
  the result goes (replicated: every process can read it).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
  if process is None:
    process = dataclasses.replace(OFFICIAL_PROCESS, learn_sigma=model.learn_sigma)
  if process.learn_sigma != model.learn_sigma:
    raise ValueError(f"process: learn_sigma={process.learn_sigma}, but the model has "
                     f"learn_sigma={model.learn_sigma}")
  spacing = {"ddim": f"ddim{num_steps}", "ddpm": str(num_steps), "dpm-solver++": ""}[sampler]
  diffusion = process.diffusion(spacing)
  guided = cfg_scale != 1.0

  def sample(params, labels, rng):
    noise_rng, loop_rng = jax.random.split(rng)
    n = labels.shape[0]
    shape = (n, model.input_size, model.input_size, model.in_channels)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    if guided:
      noise = jnp.concatenate([noise, noise])
      labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])

      def model_fn(x, t, y):
        return model.apply({"params": params}, x, t, y, cfg_scale,
                           guidance_channels=guidance_channels, method=DiT.forward_with_cfg)
    else:
      def model_fn(x, t, y):
        return model.apply({"params": params}, x, t, y)
    if batch_sharding is not None:
      noise = jax.lax.with_sharding_constraint(noise, batch_sharding)
    out = run_loop(diffusion, model_fn, noise, loop_rng, sampler=sampler, eta=eta,
                   num_steps=num_steps, clip_denoised=clip_denoised,
                   model_kwargs={"y": labels})
    return out[:n]

  return jax.jit(sample, out_shardings=out_sharding)


def run_loop(diffusion: GaussianDiffusion, model_fn: Callable, noise: jax.Array,
             rng: jax.Array, *, sampler: str, eta: float, num_steps: int, clip_denoised: bool,
             model_kwargs: dict[str, Any]) -> jax.Array:
  """One compiled sampling loop of the named sampler."""
  if sampler == "dpm-solver++":
    return dpm_solver_pp_sample_loop(diffusion, model_fn, noise, num_steps=num_steps,
                                     clip_denoised=clip_denoised, model_kwargs=model_kwargs)
  if sampler == "ddpm":
    return diffusion.p_sample_loop(model_fn, noise, rng, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
  return diffusion.ddim_sample_loop(model_fn, noise, eta=eta, rng=rng if eta else None,
                                    clip_denoised=clip_denoised, model_kwargs=model_kwargs)
