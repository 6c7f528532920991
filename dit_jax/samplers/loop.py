"""What every sampler is: one signature, returning its chain as a `Loop` that `run` compiles.

A sampler is a function

  sampler(process, model_fn, noise, rng, *, num_steps, clip_denoised, eta, model_kwargs) -> Loop

of the process the model was trained with (`DiffusionProcess`, unspaced: the sampler chooses its
own steps, e.g. `process.diffusion(f"ddim{num_steps}")`). The `Loop` it returns is its chain as
data: a first carry, a step and the per-step inputs. `run` drives it as ONE `jax.lax.scan`, so
the model is traced once and every sampler compiles into a single XLA loop; the sampling
benchmark drives the same step from Python to measure what the scan saves.
"""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import DiffusionProcess
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
  """
  init: Any
  step: Callable[[Any, Any], Any]
  xs: Any
  finish: Callable[[Any], jax.Array] = _identity


def run(loop: Loop) -> jax.Array:
  """The chain as ONE `jax.lax.scan`: the model is traced once; returns `[N, H, W, C]`."""
  final, _ = jax.lax.scan(lambda carry, x: (loop.step(carry, x), None), loop.init, loop.xs)
  return loop.finish(final)


class Sampler(Protocol):
  """The one signature of every registered sampler (`dit_jax.samplers.SAMPLERS`)."""

  def __call__(self, process: DiffusionProcess, model_fn: ModelFn, noise: jax.Array,
               rng: jax.Array, *, num_steps: int, clip_denoised: bool, eta: float,
               model_kwargs: Mapping[str, Any]) -> Loop:
    """The chain from `noise` to samples.

    Args:
      process: the process the model was trained with, unspaced; the sampler spaces it.
      model_fn: `model_fn(x [N, H, W, C], t [N], **model_kwargs)`, t the process's original
        step numbers; outputs the eps (or x0) prediction, then any variance values.
      noise: `[N, H, W, C]` standard normal, the start of the chain.
      rng: the key of the sampler's own randomness (unused by deterministic samplers).
      num_steps: model evaluations.
      clip_denoised: clip x0 predictions to [-1, 1] (pixel-space models).
      eta: the noise of samplers that have a knob for it (DDIM); the others ignore it.
      model_kwargs: the model's other inputs (`{"y": labels}`).
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
