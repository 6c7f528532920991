"""Classifier-free guidance (Ho & Salimans 2022) as the official sample.py does it, and the one
compiled class-conditional sampling function of a DiT.

The batch is doubled: the same noise twice, the labels and then the null class. The model's
`forward_with_cfg` mixes the two halves' predictions (`uncond + scale * (cond - uncond)`) and
returns the guided one for both, so the halves stay equal along the chain and the first half is
the result. Every sampler is guided alike: guidance is in `model_fn`, not in the sampler.
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dit_jax import samplers
from dit_jax.diffusion import OFFICIAL_PROCESS, Process
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.models import DiT, unstack_block_params
from dit_jax.noise import standard_normal
from dit_jax.samplers.loop import SamplerOptions


def straight_layout(model: DiT, params: Any) -> tuple[DiT, Any]:
  """(model, params) for sampling: a scanned model whose scan runs fully unrolled (CPU's
  default, `DiT.blocks_per_scan_iteration`) in the unrolled layout, its weights taken out of
  their stacks once; in the scanned one, a sampling loop sliced them out at every step (3% of
  guided DiT-S/2 sampling on CPU). The same computation; any other model as it is."""
  if model.blocks_per_scan_iteration >= model.depth:
    return model.clone(scan_blocks=False, scan_unroll=None), unstack_block_params(params)
  return model, params


def guide(model: DiT, params: Any, noise: jax.Array, labels: jax.Array, *, cfg_scale: float,
          guidance_channels: Optional[int] = 3) -> tuple[ModelFn, jax.Array, dict[str, Any]]:
  """(model_fn, noise, model_kwargs) of a sampler drawing `labels` [N] from `noise` [N, ...].

  With cfg_scale != 1 the noise and labels come back doubled (`[2N, ...]`, the null class
  `model.num_classes` in the second half) and model_fn guides; keep the first N samples. With
  cfg_scale == 1, the plain model on the inputs as they are. `guidance_channels`: 3 guides the
  first 3 channels (the official quirk), None all of them.
  """
  model, params = straight_layout(model, params)
  if cfg_scale == 1.0:
    def model_fn(x, t, y):
      return model.apply({"params": params}, x, t, y)
    return model_fn, noise, {"y": labels}

  def guided_fn(x, t, y):
    return model.apply({"params": params}, x, t, y, cfg_scale,
                       guidance_channels=guidance_channels, method=DiT.forward_with_cfg)
  labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
  return guided_fn, jnp.concatenate([noise, noise]), {"y": labels}


def make_sample_fn(model: DiT, *, sampler: str = "ddim", num_steps: int = 50,
                   cfg_scale: float = 4.0, guidance_channels: Optional[int] = 3,
                   eta: float = 0.0, clip_denoised: bool = False,
                   process: Optional[Process] = None,
                   options: SamplerOptions = SamplerOptions(), out_sharding: Any = None,
                   batch_sharding: Any = None, return_nfe: bool = False
                   ) -> Callable[..., Any]:
  """Returns jitted `sample(params, labels, rng) -> [N, H, W, C]` (the whole loop compiled once).

  labels: [N] class ids; `sampler` a name of `dit_jax.samplers.SAMPLERS` that samples
  `process`, run for `num_steps` model evaluations (an adaptive solver chooses its own).
  `process` is the one the model was trained with (its checkpoint's; None: the official
  diffusion, with the model's learn_sigma); `options` the flow samplers' settings.
  `clip_denoised` clips the x0 prediction to [-1, 1]: right for pixel-space models, wrong for
  latents. `batch_sharding` spreads the batch over devices (a NamedSharding of the batch axis);
  `out_sharding` is where the result goes (replicated: every process can read it). With
  `return_nfe`, `sample` returns `(samples, nfe)`: the model evaluations the chain took (an
  int32 scalar; one guided evaluation covers both halves of the doubled batch).
  """
  if process is None:
    process = dataclasses.replace(OFFICIAL_PROCESS, learn_sigma=model.learn_sigma)
  if process.learn_sigma != model.learn_sigma:
    raise ValueError(f"process: learn_sigma={process.learn_sigma}, but the model has "
                     f"learn_sigma={model.learn_sigma}")
  sample_loop = samplers.get(sampler, "sampler", process)

  def sample(params, labels, rng):
    noise_rng, loop_rng = jax.random.split(rng)
    n = labels.shape[0]
    shape = (n, model.input_size, model.input_size, model.in_channels)
    noise = standard_normal(noise_rng, shape, jnp.float32)
    model_fn, noise, model_kwargs = guide(model, params, noise, labels, cfg_scale=cfg_scale,
                                          guidance_channels=guidance_channels)
    if batch_sharding is not None:
      noise = jax.lax.with_sharding_constraint(noise, batch_sharding)
    loop = sample_loop(process, model_fn, noise, loop_rng, num_steps=num_steps,
                       clip_denoised=clip_denoised, eta=eta, model_kwargs=model_kwargs,
                       options=options)
    samples, nfe = samplers.run_with_nfe(loop)
    return (samples[:n], nfe) if return_nfe else samples[:n]

  return jax.jit(sample, out_shardings=(out_sharding, None) if return_nfe else out_sharding)
