"""The SDE sampler of a flow (SiT, Ma et al. 2024): Euler-Maruyama on

  dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW,

v the velocity and s the score of the model's prediction (`FlowProcess.velocity`, `.score` of
its first C output channels, C those of the noise), w >= 0 any diffusion coefficient
(`FlowProcess.diffusion_coefficient`, `SamplerOptions.diffusion_form` and `diffusion_norm`):
whatever w, its marginals are those of the probability-flow ODE, the noise injected by
sqrt(2 w) dW being removed again by w s.

As SiT does: t0 is the process's sample_eps for noise and score predictions and for the SBDM
coefficient (singular at t = 0), else 0; num_steps - 1 uniform steps cover [t0, 1 -
last_step_size], and a last step of last_step_size, without noise, ends at t = 1:

  - "mean": the SDE's drift step (the mean of an Euler-Maruyama step);
  - "tweedie": the data's posterior mean (x + sigma^2 s) / alpha at 1 - last_step_size;
  - "euler": the ODE's drift step, x + h v;
  - "none": no last step, all num_steps are SDE steps over [t0, 1 - sample_eps] (SiT then
    takes one evaluation fewer; here num_steps is the number of evaluations for every choice).
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import FlowProcess
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.noise import standard_normal
from dit_jax.samplers.flow_ode import prediction_fn
from dit_jax.samplers.loop import Loop, SamplerOptions


def sde_interval(process: FlowProcess, options: SamplerOptions) -> tuple[float, float]:
  """(t0, t1): the span of the Euler-Maruyama steps (t1 < 1 is where the last step starts)."""
  singular_start = options.diffusion_form == "SBDM" or process.prediction != "velocity"
  t0 = process.sample_eps if singular_start else 0.0
  if options.diffusion_form == "SBDM" and t0 == 0.0:
    raise ValueError("options.diffusion_form: SBDM is infinite at t = 0; it needs the "
                     "process's sample_eps > 0")
  t1 = 1.0 - (process.sample_eps if options.last_step == "none" else options.last_step_size)
  if not t0 < t1:
    raise ValueError(f"options.last_step_size: {options.last_step_size} leaves no time for "
                     f"the SDE after t0 = {t0}")
  return t0, t1


def step_coefficients(process: FlowProcess, num_steps: int, options: SamplerOptions
                      ) -> dict[str, np.ndarray]:
  """Each step as x' = a x + b v + c s + d xi (xi standard normal), v and s at time t.

  Returns `[num_steps]` float32 arrays t, a, b, c, d.
  """
  last = options.last_step != "none"
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1 + last:
    raise ValueError(f"num_steps: sde-euler with last_step {options.last_step!r} takes at "
                     f"least {1 + last} evaluations, got {num_steps!r}")
  t0, t1 = sde_interval(process, options)
  # SiT's grid: num_steps points over [t0, t1] with a last step after them, or num_steps
  # steps ending at t1.
  grid = np.linspace(t0, t1, num_steps if last else num_steps + 1)
  t = grid[:-1]
  dt = np.diff(grid)
  with jax.ensure_compile_time_eval():  # numbers, also while a sampling function is traced
    w, w_last = (np.asarray(process.diffusion_coefficient(
        times, options.diffusion_form, options.diffusion_norm), np.float64) for times in (t, t1))
    alpha, sigma = (float(c) for c in process.coefficients(t1)[:2])
  steps = {"t": t, "a": np.ones_like(t), "b": dt, "c": dt * w, "d": np.sqrt(2 * w * dt)}
  if last:
    h = options.last_step_size
    a, b, c = {"mean": (1.0, h, h * float(w_last)), "euler": (1.0, h, 0.0),
               "tweedie": (1.0 / alpha, 0.0, sigma ** 2 / alpha)}[options.last_step]
    steps = {k: np.append(v, {"t": t1, "a": a, "b": b, "c": c, "d": 0.0}[k])
             for k, v in steps.items()}
  return {k: v.astype(np.float32) for k, v in steps.items()}


def sampler(process: FlowProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
            num_steps: int, clip_denoised: bool, eta: float, model_kwargs: Mapping[str, Any],
            options: SamplerOptions = SamplerOptions()) -> Loop:
  """Euler-Maruyama on the flow's SDE (options: w(t), last step), num_steps evaluations.

  Step i draws its noise with `jax.random.fold_in(rng, i)`. `eta` and `clip_denoised` are not
  used.
  """
  del eta, clip_denoised
  xs = {k: jnp.asarray(v) for k, v in step_coefficients(process, num_steps, options).items()}
  xs["i"] = jnp.arange(num_steps, dtype=jnp.int32)
  predict = prediction_fn(model_fn, noise.shape[-1], model_kwargs or {})

  def step(x, s):
    out, t = predict(x, s["t"])
    velocity = process.velocity(out, x, t)
    score = process.score(out, x, t)
    xi = standard_normal(jax.random.fold_in(rng, s["i"]), x.shape, x.dtype)
    return (s["a"] * x + s["b"] * velocity + s["c"] * score + s["d"] * xi).astype(x.dtype)
  return Loop(init=noise, step=step, xs=xs)
