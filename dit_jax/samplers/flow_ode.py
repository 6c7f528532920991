"""ODE samplers of a flow (SiT, Ma et al. 2024): the probability-flow ODE dx = v(x, t) dt,
integrated forward in time from noise at t0 to data at t1, [t0, t1] the process's sampling
interval (`FlowProcess.interval(sample_eps)`: all of [0, 1] for velocity prediction).

v is the process's velocity of the model's prediction (`FlowProcess.velocity` of the first C
output channels, C those of the noise; more, e.g. variance channels, are ignored). Three
integrators, each `num_steps` model evaluations unless adaptive:

  - `euler`: num_steps uniform Euler steps, first order;
  - `heun`: ceil(num_steps / 2) uniform steps of Heun's method (explicit trapezoidal, second
    order, 2 evaluations a step), the last an Euler step when num_steps is odd;
  - `dopri5`: Dormand-Prince 5(4) with adaptive steps (diffrax), as SiT's default ODE sampler
    (torchdiffeq's dopri5); its tolerances choose the steps, num_steps is ignored.

The fields and loops are public so that a test (or an encoder) can integrate the same ODE
backwards, from data to noise: `fixed_step_loop` and `dopri5_loop` take any time grid or span.
"""
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import FlowProcess
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.samplers.loop import Loop, SamplerOptions

# A vector field: (x [N, ...], t a scalar time) -> [N, ...].
Field = Callable[[jax.Array, jax.Array], jax.Array]
# Dopri5's evaluations: one for its first stage at t0 (which we hand the solver), then 6 a
# step, accepted or rejected (7 stages, the first the last of the step before: first same as
# last; a rejected step keeps its start and so its first stage).
DOPRI5_START_EVALUATIONS = 1
DOPRI5_STAGE_EVALUATIONS = 6
# Dopri5's first step, a fraction of the span (diffrax 0.7's own for dt0=None); its controller
# adapts the next ones at once. Given, it costs no evaluation (no initial step estimate).
DOPRI5_FIRST_STEP = 0.01


def prediction_fn(model_fn: ModelFn, channels: int, model_kwargs: Mapping[str, Any]
                  ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """`(x, t scalar) -> (prediction, t [N])`: the model's first `channels` outputs at time t."""
  def predict(x, t):
    t = jnp.full((x.shape[0],), t, jnp.float32)
    return model_fn(x, t, **model_kwargs)[..., :channels].astype(x.dtype), t
  return predict


def velocity_field(process: FlowProcess, model_fn: ModelFn, channels: int,
                   model_kwargs: Mapping[str, Any]) -> Field:
  """The probability-flow ODE's drift v(x, t) of a model (one evaluation a call)."""
  predict = prediction_fn(model_fn, channels, model_kwargs)

  def field(x, t):
    out, t = predict(x, t)
    return process.velocity(out, x, t).astype(x.dtype)
  return field


def fixed_step_loop(field: Field, x: jax.Array, times: np.ndarray, orders: np.ndarray) -> Loop:
  """Euler (order 1) and Heun (order 2) steps from `times[i]` to `times[i + 1]`.

  Args:
    field: the drift.
    x: `[N, ...]` the state at times[0].
    times: `[steps + 1]` the grid, increasing (sampling) or decreasing (back to noise).
    orders: `[steps]` 1 or 2 each: Euler steps take one evaluation, Heun steps two.
  """
  orders = np.asarray(orders)
  if orders.shape != (len(times) - 1,) or not np.isin(orders, (1, 2)).all():
    raise ValueError(f"orders: must be 1 or 2 for each of the {len(times) - 1} steps")
  times = np.asarray(times, np.float64)
  xs = {"t": times[:-1], "t_next": times[1:], "dt": np.diff(times), "heun": orders == 2}
  xs = {k: jnp.asarray(v, jnp.bool_ if k == "heun" else jnp.float32) for k, v in xs.items()}
  mixed = len(set(orders.tolist())) > 1

  def step(x, s):
    k1 = field(x, s["t"])

    def euler():
      return x + s["dt"] * k1

    def heun():  # the trapezoid of the slopes at both ends of an Euler predictor
      k2 = field(x + s["dt"] * k1, s["t_next"])
      return x + 0.5 * s["dt"] * (k1 + k2)

    if mixed:  # only Heun's odd last step: the branch taken alone runs
      x_next = jax.lax.cond(s["heun"], heun, euler)
    else:
      x_next = heun() if orders[0] == 2 else euler()
    return x_next.astype(x.dtype)
  return Loop(init=x, step=step, xs=xs, nfe=int(orders.sum()))


def dopri5_loop(field: Field, x: jax.Array, t0: float, t1: float, options: SamplerOptions
                ) -> Loop:
  """Dopri5 from t0 to t1 (either direction) with adaptive steps: a `Loop` of one step.

  The step is the whole solve (diffrax's own loop of at most `options.max_steps` steps, past
  which it raises); the carry counts the model evaluations (`Loop.nfe`). The step size is
  controlled on the error of the whole batch (an RMS norm), as SiT's torchdiffeq does.
  """
  # Imported here: diffrax (and the libraries it loads) costs every process that imports the
  # samplers about 0.8 s of start-up, and only this sampler uses it.
  import diffrax  # pylint: disable=import-outside-toplevel

  def solve(carry, span):
    x, _ = carry
    start, end = span[0], span[1]
    # The first stage, evaluated here and handed to the solver as its first-same-as-last
    # value, so that every step, the first too, evaluates 6 stages: the count is exact.
    first = field(x, start)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: field(y, t)), diffrax.Dopri5(), t0=start, t1=end,
        dt0=DOPRI5_FIRST_STEP * (end - start), y0=x, saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=options.rtol, atol=options.atol),
        max_steps=options.max_steps, solver_state=(jnp.array(False), first), made_jump=False)
    nfe = DOPRI5_START_EVALUATIONS + DOPRI5_STAGE_EVALUATIONS * solution.stats["num_steps"]
    return solution.ys[0].astype(x.dtype), jnp.asarray(nfe, jnp.int32)

  return Loop(init=(x, jnp.zeros((), jnp.int32)), step=solve,
              xs=jnp.asarray([[t0, t1]], jnp.float32), finish=lambda carry: carry[0],
              nfe=lambda carry: carry[1])


def euler(process: FlowProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
          num_steps: int, clip_denoised: bool, eta: float, model_kwargs: Mapping[str, Any],
          options: SamplerOptions = SamplerOptions()) -> Loop:
  """Euler's method on the flow's ODE, num_steps uniform steps from noise to data.

  Deterministic: `rng`, `eta`, `clip_denoised` and `options` are not used.
  """
  del rng, eta, clip_denoised, options
  times = _grid(process, num_steps, num_steps)
  return fixed_step_loop(_field(process, model_fn, noise, model_kwargs), noise, times,
                         np.ones(num_steps, np.int64))


def heun(process: FlowProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
         num_steps: int, clip_denoised: bool, eta: float, model_kwargs: Mapping[str, Any],
         options: SamplerOptions = SamplerOptions()) -> Loop:
  """Heun's method on the flow's ODE: num_steps evaluations, 2 a step, an odd last one Euler.

  Second order: ceil(num_steps / 2) uniform steps. Deterministic: `rng`, `eta`,
  `clip_denoised` and `options` are not used.
  """
  del rng, eta, clip_denoised, options
  steps = math.ceil(_check_steps(num_steps) / 2)
  orders = np.full(steps, 2, np.int64)
  orders[-1] -= num_steps % 2
  return fixed_step_loop(_field(process, model_fn, noise, model_kwargs), noise,
                         _grid(process, num_steps, steps), orders)


def dopri5(process: FlowProcess, model_fn: ModelFn, noise: jax.Array, rng: jax.Array, *,
           num_steps: int, clip_denoised: bool, eta: float, model_kwargs: Mapping[str, Any],
           options: SamplerOptions = SamplerOptions()) -> Loop:
  """Adaptive Dopri5 on the flow's ODE (options.rtol, atol, max_steps), num_steps ignored.

  The tolerances choose the steps (SiT: rtol 1e-3, atol 1e-6); `run_with_nfe` reports the
  model evaluations they took. Deterministic: `rng`, `eta` and `clip_denoised` are not used.
  """
  del rng, eta, clip_denoised, num_steps
  t0, t1 = process.interval(process.sample_eps)
  return dopri5_loop(_field(process, model_fn, noise, model_kwargs), noise, t0, t1, options)


def _check_steps(num_steps: int) -> int:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
  return int(num_steps)


def _grid(process: FlowProcess, num_steps: int, steps: int) -> np.ndarray:
  """`[steps + 1]` uniform times over the process's sampling interval."""
  _check_steps(num_steps)
  return np.linspace(*process.interval(process.sample_eps), steps + 1)


def _field(process: FlowProcess, model_fn: ModelFn, noise: jax.Array,
           model_kwargs: Mapping[str, Any]) -> Field:
  return velocity_field(process, model_fn, noise.shape[-1], model_kwargs or {})
