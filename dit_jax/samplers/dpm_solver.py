"""DPM-Solver++ (2M, multistep) (Lu et al. 2022, arXiv 2211.01095).

An ODE solver in the half log-SNR lambda = log(alpha / sigma) of the discrete 1000-step
process; it uses only the x0 prediction (the model's, or derived from its noise prediction; the
learned variance is ignored: the probability flow ODE has none). Guidance works through
`model_fn` like for the other samplers.

With x0 predictions D_i at steps s_i > s_{i+1} and h_i = lambda_{i+1} - lambda_i, the update is

  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D'_i,
  D'_i = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1},  r_i = h_{i-1} / h_i,

first order (D'_i = D_i) at the first step and at the last, which lands on sigma = 0 so that the
result is the final x0 prediction. All coefficients are precomputed in float64 and the loop is
one `lax.scan`, so every step is the same compiled update.
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import DiffusionProcess, GaussianDiffusion, ModelMeanType
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.samplers.loop import Loop, SamplerOptions, run


def solver_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """The `num_steps` model timesteps, from num_train_steps - 1 down (linspace, rounded)."""
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps: must be in [1, {num_train_steps}], got {num_steps}")
  return np.round(np.linspace(num_train_steps - 1, 0, num_steps + 1)[:-1]).astype(np.int64)


def solver_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict[str, np.ndarray]:
  """Per-step coefficients of x_{i+1} = a_i x_i + b_i (c_i D_i + p_i D_{i-1}) (float64)."""
  alpha = np.sqrt(alphas_cumprod[timesteps])
  sigma = np.sqrt(1.0 - alphas_cumprod[timesteps])
  lam = np.log(alpha) - np.log(sigma)
  n = len(timesteps)
  a, b, c, p = (np.zeros(n) for _ in range(4))
  h = np.zeros(n)
  for i in range(n):
    if i + 1 < n:
      h[i] = lam[i + 1] - lam[i]
      a[i] = sigma[i + 1] / sigma[i]
      b[i] = -alpha[i + 1] * np.expm1(-h[i])
    else:  # the last step goes to sigma = 0 (lambda = inf): x = D
      a[i], b[i] = 0.0, 1.0
    if i == 0 or i + 1 == n:
      c[i], p[i] = 1.0, 0.0
    else:
      r = h[i - 1] / h[i]
      c[i], p[i] = 1.0 + 1.0 / (2.0 * r), -1.0 / (2.0 * r)
  return {"a": a, "b": b, "c": c, "p": p, "alpha": alpha, "sigma": sigma}


def dpm_solver_pp_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn,
                              noise: jax.Array, num_steps: int = 20,
                              clip_denoised: bool = False,
                              model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Samples with DPM-Solver++(2M) in `num_steps` model evaluations.

  Args:
    diffusion: the unspaced training process (`create_diffusion("")`); its alphas_cumprod
      define the ODE.
    model_fn: `model_fn(x, t, **model_kwargs)` with the original timestep numbers; the first
      `C` output channels are the noise prediction, or x0 for a `predict_xstart` process (more
      channels, e.g. learned variance, are ignored).
    noise: [N, H, W, C] starting point at the noisiest step.
    clip_denoised: clip each x0 prediction to [-1, 1] (pixel-space models).
  Returns:
    [N, H, W, C] samples.
  """
  return run(_loop(diffusion, model_fn, noise, num_steps, clip_denoised, model_kwargs))


def sampler(process: DiffusionProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
            num_steps: int, clip_denoised: bool, eta: float,
            model_kwargs: Mapping[str, Any], options: SamplerOptions = SamplerOptions()) -> Loop:
  """DPM-Solver++(2M), an ODE solver for 10-25 steps using the x0 predictions only.

  Deterministic: `rng` and `eta` are not used, nor are `options` (the flow samplers'); the
  learned variance is ignored.
  """
  del rng, eta, options
  return _loop(process.diffusion(""), model_fn, noise, num_steps, clip_denoised, model_kwargs)


def _loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: jax.Array, num_steps: int,
          clip_denoised: bool, model_kwargs: Optional[Mapping[str, Any]]) -> Loop:
  if not np.array_equal(diffusion.timestep_map, np.arange(diffusion.num_timesteps)):
    raise ValueError("diffusion: DPM-Solver++ needs the unspaced process (create_diffusion(''))")
  timesteps = solver_timesteps(diffusion.num_timesteps, num_steps)
  coef = solver_coefficients(diffusion.alphas_cumprod, timesteps)
  channels = noise.shape[-1]
  predicts_x0 = diffusion.model_mean_type == ModelMeanType.START_X
  kwargs = model_kwargs or {}
  xs = {k: jnp.asarray(v, jnp.float32) for k, v in coef.items()}
  xs["t"] = jnp.asarray(timesteps, jnp.int32)

  def step(carry, s):
    x, prev_x0 = carry
    t = jnp.full((x.shape[0],), s["t"], jnp.int32)
    out = model_fn(x, t, **kwargs)[..., :channels]
    x0 = out if predicts_x0 else (x - s["sigma"] * out) / s["alpha"]
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    x_next = s["a"] * x + s["b"] * (s["c"] * x0 + s["p"] * prev_x0)
    return x_next.astype(x.dtype), x0.astype(x.dtype)

  # The carry: the state and the previous x0 prediction; the last step lands on x0 itself.
  return Loop(init=(noise, jnp.zeros_like(noise)), step=step, xs=xs, finish=lambda c: c[0])
