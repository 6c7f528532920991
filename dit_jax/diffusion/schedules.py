"""Noise schedules, timestep respacing, and the per-step lookup into schedule tables.

Schedules and respacing run once at construction time on the host, in float64, exactly as the
official DiT / improved-diffusion code does, so the tables match the PyTorch reference bit for bit.
`extract_into_tensor` is the device-side (jnp) read of such a table at a batch of steps.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")  # the names get_named_beta_schedule knows


def betas_for_alpha_bar(num_diffusion_timesteps: int,
                        alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Discretizes a continuous cumulative-alpha function into betas.

  Args:
    num_diffusion_timesteps: number of betas to produce.
    alpha_bar: maps t in [0, 1] to the cumulative product of (1 - beta) up to t.
    max_beta: upper bound on each beta; values below 1 avoid a singularity at the end.

  Returns:
    float64 betas, shape `[num_diffusion_timesteps]`, with
    `beta_i = min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)`.
  """
  n = num_diffusion_timesteps
  betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
  return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """Returns a named beta schedule, float64 `[num_diffusion_timesteps]`.

  "linear": the schedule of Ho et al., rescaled so that any step count covers the same range as
  1000 steps. "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal.
  """
  if schedule_name == "linear":
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
  if schedule_name == "squaredcos_cap_v2":
    return betas_for_alpha_bar(
        num_diffusion_timesteps,
        lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise ValueError(f"unknown beta schedule: {schedule_name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
  """Chooses which steps of an `num_timesteps`-step process to keep.

  The process is cut into `len(section_counts)` nearly equal sections and section i is strided
  down to `section_counts[i]` steps. E.g. 300 steps with [10, 15, 20]: the first 100 steps give
  10, the next 100 give 15, the last 100 give 20.

  Args:
    num_timesteps: number of steps of the original process.
    section_counts: a list of ints, a comma-separated string ("25,15,10"), or "ddimN": a single
      integer stride (the DDIM paper's spacing) that yields exactly N steps.

  Returns:
    The set of kept step indices of the original process.

  Raises:
    ValueError: when "ddimN" has no integer stride giving N steps, or a section has fewer steps
      than requested.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
          return set(range(0, num_timesteps, stride))
      raise ValueError(
          f"cannot create exactly {desired_count} steps out of {num_timesteps} with an integer "
          "stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  section_counts = [int(c) for c in section_counts]

  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"cannot divide section of {size} steps into {section_count}")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      # Python's round() (round-half-to-even) on a float accumulated by repeated addition: both
      # matter for picking the same steps as the reference.
      all_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    start_idx += size
  return set(all_steps)


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int] | set[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Betas of the process that keeps only `use_timesteps` of the process with `betas`.

  The kept steps retain their cumulative alphas: `alphas_cumprod_new[k] = alphas_cumprod[map[k]]`,
  so consecutive kept steps are joined by `beta = 1 - ac[i] / ac[previous kept i]`.

  Args:
    betas: float64 betas of the original process, `[num_original_steps]`.
    use_timesteps: the original step indices to keep.

  Returns:
    `(new_betas, timestep_map)`: float64 `[num_kept]` and int64 `[num_kept]`, where
    `timestep_map[k]` is the original step number of kept step k (increasing).
  """
  use = set(int(i) for i in use_timesteps)
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)
  last_alpha_cumprod = 1.0
  new_betas, timestep_map = [], []
  for i, alpha_cumprod in enumerate(alphas_cumprod):
    if i in use:
      new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
      last_alpha_cumprod = alpha_cumprod
      timestep_map.append(i)
  return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


def extract_into_tensor(arr: np.ndarray, timesteps: jax.Array,
                        broadcast_shape: Sequence[int]) -> jax.Array:
  """Gathers `arr[timesteps]` as float32 and broadcasts it to `broadcast_shape`.

  Args:
    arr: a 1-D (float64) numpy table.
    timesteps: int `[batch]` indices into arr.
    broadcast_shape: `[batch, ...]`, e.g. `[batch, height, width, channels]`.

  Returns:
    float32 array of `broadcast_shape`. Casting each float64 entry to float32 is what the
    reference does after indexing, so gathering from a float32 copy gives the same numbers.
  """
  res = jnp.asarray(np.asarray(arr, dtype=np.float32))[timesteps]
  res = res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))
  return jnp.broadcast_to(res, tuple(broadcast_shape))
