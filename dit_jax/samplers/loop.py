"""What every sampler is: one signature, returning its chain as a `Loop` that `run` compiles.

A sampler is a function

  sampler(process, model_fn, noise, rng, *, num_steps, clip_denoised, eta, model_kwargs,
          options=SamplerOptions()) -> Loop

of the process the model was trained with (a `DiffusionProcess`, unspaced: the sampler chooses
its own steps, e.g. `process.diffusion(f"ddim{num_steps}")`; or a `FlowProcess`, whose sampling
interval the flow samplers cover). The `Loop` it returns is its chain as data: a first carry, a
step and the per-step inputs. `run` drives it as ONE `jax.lax.scan`, so the model is traced a
bounded number of times and every sampler compiles into a single XLA loop; the sampling
benchmark drives the same step from Python to measure what the scan saves. An adaptive solver,
which decides its steps at run time, is a `Loop` of one step: its whole solve (`ode-dopri5`).
`run_with_nfe` also returns the number of model evaluations the chain made.
"""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import Process
from dit_jax.diffusion.flow import DIFFUSION_FORMS
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion, ModelFn

# Applied to each x0 prediction before clipping (the official samplers' `denoised_fn`).
DenoisedFn = Optional[Callable[[jax.Array], jax.Array]]


def _identity(carry: Any) -> Any:
  return carry


@dataclasses.dataclass(frozen=True)
class Loop:
  """A sampler's chain: `carry = step(carry, xs[i])` for every i in order, then `finish(carry)`.

  Attributes:
    init: the first carry: the noise `[N, H, W, C]`, or a tuple holding it and more state.
    step: `(carry, xs_i) -> carry`, the carry's structure and dtypes unchanged.
    xs: the per-step inputs (a pytree of arrays, the steps on their leading axis): the step
      indices, coefficients.
    finish: the last carry -> the samples `[N, H, W, C]`.
    nfe: the model evaluations of the whole chain. None: one a step (the length of xs); an int
      when steps differ in cost (Heun's 2 a step, its last an Euler step of 1); a function of
      the last carry when the chain decides at run time (an adaptive solve counts them in its
      carry). A guided evaluation of the doubled batch counts once.
  """
  init: Any
  step: Callable[[Any, Any], Any]
  xs: Any
  finish: Callable[[Any], jax.Array] = _identity
  nfe: Optional[Union[int, Callable[[Any], jax.Array]]] = None

  @property
  def length(self) -> int:
    """How many times `step` runs (the leading axis of xs)."""
    return jax.tree.leaves(self.xs)[0].shape[0]


def run_with_nfe(loop: Loop) -> tuple[jax.Array, jax.Array]:
  """The chain as ONE `jax.lax.scan`: (samples `[N, H, W, C]`, int32 scalar model evaluations)."""
  final, _ = jax.lax.scan(lambda carry, x: (loop.step(carry, x), None), loop.init, loop.xs)
  if callable(loop.nfe):
    nfe = loop.nfe(final)
  else:
    nfe = loop.length if loop.nfe is None else loop.nfe
  return loop.finish(final), jnp.asarray(nfe, jnp.int32)


def run(loop: Loop) -> jax.Array:
  """The chain as ONE `jax.lax.scan` (the model traced a bounded number of times): the samples
  `[N, H, W, C]`."""
  return run_with_nfe(loop)[0]


LAST_STEPS = ("mean", "tweedie", "euler", "none")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """The flow samplers' settings, SiT's defaults; the diffusion samplers take none of them.

  Frozen (hashable): a static argument of jitted functions, part of a cache key.
  """
  atol: float = 1e-6  # ode-dopri5: absolute error tolerance of a step
  rtol: float = 1e-3  # ode-dopri5: relative error tolerance of a step
  max_steps: int = 4096  # ode-dopri5: at most this many steps (accepted and rejected), or error
  # sde-euler: w(t) of dx = [v + w s] dt + sqrt(2 w) dW (`FlowProcess.diffusion_coefficient`).
  diffusion_form: str = "sigma"
  diffusion_norm: float = 1.0  # sde-euler: the scale of w(t)
  # sde-euler: the last step, to t = 1 from 1 - last_step_size: "mean" (the SDE's drift, no
  # noise), "tweedie" (the data's posterior mean), "euler" (the ODE's drift), "none" (no last
  # step: every step an SDE step, ending at 1 - sample_eps).
  last_step: str = "mean"
  last_step_size: float = 0.04  # sde-euler: SiT's, the stride of 250 steps over [0, 1]

  @classmethod
  def from_settings(cls, settings: Mapping[str, Any],
                    prefix: str = "options.") -> "SamplerOptions":
    """From `config.sample.options` or flags (None: the default); a bad value is a one-line
    ValueError naming the field as `prefix + field` (`config.sample.options.atol`, `--atol`)."""
    try:
      return cls(**{k: v for k, v in settings.items() if v is not None})
    except ValueError as error:  # "options.atol: ..."
      raise ValueError(prefix + str(error).removeprefix("options.")) from None

  def __post_init__(self):
    for field, valid, what in (
        ("atol", _is_number(self.atol) and self.atol > 0, "a positive number"),
        ("rtol", _is_number(self.rtol) and self.rtol > 0, "a positive number"),
        ("max_steps", isinstance(self.max_steps, (int, np.integer))
         and not isinstance(self.max_steps, bool) and self.max_steps >= 1, "a positive integer"),
        ("diffusion_norm", _is_number(self.diffusion_norm) and self.diffusion_norm >= 0,
         "a number >= 0"),
        ("last_step_size", _is_number(self.last_step_size) and 0 < self.last_step_size < 1,
         "in (0, 1)")):
      if not valid:
        raise ValueError(f"options.{field}: must be {what}, got {getattr(self, field)!r}")
    for field, choices in (("diffusion_form", DIFFUSION_FORMS), ("last_step", LAST_STEPS)):
      if getattr(self, field) not in choices:
        raise ValueError(f"options.{field}: {getattr(self, field)!r} is not one of "
                         f"{', '.join(choices)}")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class Sampler(Protocol):
  """The one signature of every registered sampler (`dit_jax.samplers.SAMPLERS`)."""

  def __call__(self, process: Process, model_fn: ModelFn, noise: jax.Array,
               rng: jax.Array, *, num_steps: int, clip_denoised: bool, eta: float,
               model_kwargs: Mapping[str, Any],
               options: SamplerOptions = SamplerOptions()) -> Loop:
    """The chain from `noise` to samples.

    Args:
      process: the process the model was trained with, unspaced; the sampler spaces it. Its
        `kind` ("diffusion", "flow") is the one the sampler is registered for.
      model_fn: `model_fn(x [N, H, W, C], t [N], **model_kwargs)`: for a diffusion t are the
        process's original step numbers and the output the eps (or x0) prediction, then any
        variance values; for a flow t are times in [0, 1] and the output the flow's
        prediction (velocity, noise or score), then any channels the sampler ignores.
      noise: `[N, H, W, C]` standard normal, the start of the chain.
      rng: the key of the sampler's own randomness (unused by deterministic samplers).
      num_steps: model evaluations (adaptive solvers, which choose their own, ignore it).
      clip_denoised: clip x0 predictions to [-1, 1] (pixel-space models; the diffusion
        samplers).
      eta: the noise of samplers that have a knob for it (DDIM); the others ignore it.
      model_kwargs: the model's other inputs (`{"y": labels}`).
      options: the flow samplers' settings (tolerances, the SDE's diffusion and last step).
    """


def reverse_steps(diffusion: GaussianDiffusion) -> jax.Array:
  """int32 `[num_timesteps]`: this process's step indices, from the noisiest down to 0."""
  return jnp.arange(diffusion.num_timesteps, dtype=jnp.int32)[::-1]


def step_indices(i: jax.Array, x: jax.Array) -> jax.Array:
  """int32 `[N]`: step index i for every example of x."""
  return jnp.full((x.shape[0],), i, dtype=jnp.int32)


def nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
  """1.0 where t != 0, else 0.0, shaped `[N, 1, 1, 1]` to broadcast against x."""
  return (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def is_python_zero(value: Any) -> bool:
  """A literal 0 (not a traced value): the deterministic case, decided at trace time."""
  return isinstance(value, (int, float, np.number)) and float(value) == 0.0
