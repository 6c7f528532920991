"""Samplers of `GaussianDiffusion`: ancestral (DDPM) and DDIM, forward and reverse.

Kept apart from the training code for size: these are plain functions of a `GaussianDiffusion`,
which exposes them as its methods (`diffusion.p_sample_loop(...)`). Every loop
is ONE `jax.lax.scan` over the steps, so the model is traced once and the whole chain compiles
into a single XLA loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.schedules import extract_into_tensor as _extract_into_tensor

if TYPE_CHECKING:
  from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion

# model_fn(x [N, H, W, C], timesteps [N] (original step numbers), **model_kwargs) -> output.
ModelFn = Callable[..., jax.Array]


def p_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
             rng: jax.Array, clip_denoised: bool = True,
             denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
             model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
  """Ancestral sample of x_{t-1} (no noise where t == 0): dict(sample, pred_xstart)."""
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, model_kwargs=model_kwargs)
  noise = jax.random.normal(rng, x.shape, x.dtype)
  nonzero_mask = _nonzero_mask(t, x)
  sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array,
                  rng: jax.Array, clip_denoised: bool = True,
                  denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
                  model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Ancestral sampling from `noise` `[N, H, W, C]` down to step 0; returns `[N, H, W, C]`.

  Step i (counting down in this process) uses the key `jax.random.fold_in(rng, i)`.
  """
  def step(x, i):
    t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
    out = diffusion.p_sample(model_fn, x, t, jax.random.fold_in(rng, i),
                             clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                             model_kwargs=model_kwargs)
    return out["sample"].astype(x.dtype), None  # the scan carry keeps its dtype
  return _scan(diffusion, step, noise, reverse=True)


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                clip_denoised: bool = True,
                denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
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
  eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
  alpha_bar = _extract_into_tensor(diffusion.alphas_cumprod, t, x.shape)
  alpha_bar_prev = _extract_into_tensor(diffusion.alphas_cumprod_prev, t, x.shape)
  sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
           * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
  sample = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
  if not deterministic:
    noise = jax.random.normal(rng, x.shape, x.dtype)
    sample = sample + _nonzero_mask(t, x) * sigma * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array,
                     eta: float = 0.0, rng: Optional[jax.Array] = None, clip_denoised: bool = True,
                     denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
                     model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """DDIM sampling from `noise` `[N, H, W, C]` down to step 0; returns `[N, H, W, C]`.

  With eta > 0, step i uses the key `jax.random.fold_in(rng, i)`.
  """
  deterministic = _check_eta_rng(eta, rng)

  def step(x, i):
    t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
    key = None if deterministic else jax.random.fold_in(rng, i)
    out = diffusion.ddim_sample(model_fn, x, t, clip_denoised=clip_denoised,
                                denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                eta=0.0 if deterministic else eta, rng=key)
    return out["sample"].astype(x.dtype), None
  return _scan(diffusion, step, noise, reverse=True)


def ddim_reverse_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array,
                        t: jax.Array, clip_denoised: bool = True,
                        denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
                        model_kwargs: Optional[Mapping[str, Any]] = None,
                        eta: float = 0.0) -> dict[str, jax.Array]:
  """Deterministic DDIM step x_t -> x_{t+1} (the reverse ODE): dict(sample, pred_xstart)."""
  if not _is_python_zero(eta):
    raise ValueError("the reverse ODE is deterministic: eta must be 0")
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, model_kwargs=model_kwargs)
  eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
  alpha_bar_next = _extract_into_tensor(diffusion.alphas_cumprod_next, t, x.shape)
  sample = (out["pred_xstart"] * jnp.sqrt(alpha_bar_next)
            + jnp.sqrt(1 - alpha_bar_next) * eps)
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array,
                             clip_denoised: bool = True,
                             denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
                             model_kwargs: Optional[Mapping[str, Any]] = None,
                             eta: float = 0.0) -> jax.Array:
  """Encodes `x` `[N, H, W, C]` (the state at step 0) into noise by running steps 0 .. T-1."""
  def step(x, i):
    t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
    out = diffusion.ddim_reverse_sample(model_fn, x, t, clip_denoised=clip_denoised,
                                        denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                        eta=eta)
    return out["sample"].astype(x.dtype), None
  return _scan(diffusion, step, x, reverse=False)


def _scan(diffusion: GaussianDiffusion, step: Callable, init: jax.Array,
          reverse: bool) -> jax.Array:
  # One lax.scan: the model is traced once and the whole chain is a single XLA loop.
  steps = jnp.arange(diffusion.num_timesteps, dtype=jnp.int32)
  final, _ = jax.lax.scan(step, init, steps[::-1] if reverse else steps)
  return final


def _is_python_zero(eta: Any) -> bool:
  return isinstance(eta, (int, float, np.number)) and float(eta) == 0.0


def _nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
  """1.0 where t != 0, else 0.0, shaped `[N, 1, 1, 1]` to broadcast against x."""
  return (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def _check_eta_rng(eta: Any, rng: Optional[jax.Array]) -> bool:
  """True when DDIM is deterministic (eta is a literal 0); raises if noise is needed but no key."""
  if _is_python_zero(eta):
    return True
  if rng is None:
    raise ValueError(f"ddim sampling with eta={eta!r} needs an rng key")
  return False
