"""DDIM (Song et al. 2021): the implicit sampler, deterministic at eta = 0, and its reverse ODE.

`ddim_sample`, `ddim_sample_loop`, `ddim_reverse_sample` and `ddim_reverse_sample_loop` are the
official `GaussianDiffusion` methods of those names, as functions of a (respaced)
`GaussianDiffusion`; `sampler` is the registry's entry.
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from dit_jax.diffusion import DiffusionProcess, GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.schedules import extract_into_tensor
from dit_jax.noise import standard_normal
from dit_jax.samplers.loop import (DenoisedFn, Loop, SamplerOptions, is_python_zero, nonzero_mask,
                                   reverse_steps, run, step_indices)


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                model_kwargs: Optional[Mapping[str, Any]] = None, eta: float = 0.0,
                rng: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """DDIM step x_t -> x_{t-1} (eq. 12 of Song et al.): dict(sample, pred_xstart).

  `eta` scales the injected noise (0: deterministic). Unless eta is the Python number 0, an
  `rng` key is required.
  """
  deterministic = _check_eta_rng(eta, rng)
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, model_kwargs=model_kwargs)
  # Re-derive eps from the (possibly clipped) x_0 prediction, whatever the model predicts.
  eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
  alpha_bar = extract_into_tensor(diffusion.alphas_cumprod, t, x.shape)
  alpha_bar_prev = extract_into_tensor(diffusion.alphas_cumprod_prev, t, x.shape)
  sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
           * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
  sample = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
  if not deterministic:
    noise = standard_normal(rng, x.shape, x.dtype)
    sample = sample + nonzero_mask(t, x) * sigma * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array,
                     eta: float = 0.0, rng: Optional[jax.Array] = None, clip_denoised: bool = True,
                     denoised_fn: DenoisedFn = None,
                     model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """DDIM sampling from `noise` `[N, H, W, C]` down to step 0; returns `[N, H, W, C]`.

  With eta > 0, step i uses the key `jax.random.fold_in(rng, i)`.
  """
  return run(_loop(diffusion, model_fn, noise, eta, rng, clip_denoised, denoised_fn,
                   model_kwargs))


def sampler(process: DiffusionProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
            num_steps: int, clip_denoised: bool, eta: float,
            model_kwargs: Mapping[str, Any], options: SamplerOptions = SamplerOptions()) -> Loop:
  """DDIM on num_steps strided steps ("ddim50"), eta scales its noise (0: deterministic).

  `options` (the flow samplers') are not used.
  """
  del options
  return _loop(process.diffusion(f"ddim{num_steps}"), model_fn, noise, eta,
               rng if eta else None, clip_denoised, None, model_kwargs)


def ddim_reverse_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array,
                        t: jax.Array, clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                        model_kwargs: Optional[Mapping[str, Any]] = None,
                        eta: float = 0.0) -> dict[str, jax.Array]:
  """Deterministic DDIM step x_t -> x_{t+1} (the reverse ODE): dict(sample, pred_xstart)."""
  if not is_python_zero(eta):
    raise ValueError("the reverse ODE is deterministic: eta must be 0")
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, model_kwargs=model_kwargs)
  eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
  alpha_bar_next = extract_into_tensor(diffusion.alphas_cumprod_next, t, x.shape)
  sample = (out["pred_xstart"] * jnp.sqrt(alpha_bar_next)
            + jnp.sqrt(1 - alpha_bar_next) * eps)
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array,
                             clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                             model_kwargs: Optional[Mapping[str, Any]] = None,
                             eta: float = 0.0) -> jax.Array:
  """Encodes `x` `[N, H, W, C]` (the state at step 0) into noise by running steps 0 .. T-1."""
  def step(x, i):
    out = ddim_reverse_sample(diffusion, model_fn, x, step_indices(i, x),
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                              model_kwargs=model_kwargs, eta=eta)
    return out["sample"].astype(x.dtype)
  return run(Loop(init=x, step=step, xs=jnp.arange(diffusion.num_timesteps, dtype=jnp.int32)))


def _loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array, eta: float,
          rng: Optional[jax.Array], clip_denoised: bool, denoised_fn: DenoisedFn,
          model_kwargs: Optional[Mapping[str, Any]]) -> Loop:
  deterministic = _check_eta_rng(eta, rng)

  def step(x, i):
    key = None if deterministic else jax.random.fold_in(rng, i)
    out = ddim_sample(diffusion, model_fn, x, step_indices(i, x), clip_denoised=clip_denoised,
                      denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                      eta=0.0 if deterministic else eta, rng=key)
    return out["sample"].astype(x.dtype)  # the scan carry keeps its dtype
  return Loop(init=noise, step=step, xs=reverse_steps(diffusion))


def _check_eta_rng(eta: Any, rng: Optional[jax.Array]) -> bool:
  """True when DDIM is deterministic (eta is a literal 0); raises if noise is needed but no key."""
  if is_python_zero(eta):
    return True
  if rng is None:
    raise ValueError(f"ddim sampling with eta={eta!r} needs an rng key")
  return False
