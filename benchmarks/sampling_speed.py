"""Sampling speed: one compiled `lax.scan` loop vs a Python loop of jitted steps.

  python -m benchmarks.sampling_speed [--models tiny S/2] [--batch 8]

For each model and sampler it prints images/s of the whole guided sampling loop (cfg 4, doubled
batch), compiled once as dit-jax does it, and of the same sampler driven step by step from
Python (one dispatch per step). Needs only jax/flax/numpy (no TensorFlow, no ml_collections).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import create_diffusion
from dit_jax.diffusion.dpm_solver import solver_coefficients, solver_timesteps
from dit_jax.models import DiT, create_model, init_params
from dit_jax.sampling import run_loop

SAMPLERS = (("ddpm", 50), ("ddim", 50), ("dpm-solver++", 20))


def build(name: str):
  if name == "tiny":  # the official fixture's architecture: 8x8x4 latents, depth 1, width 64
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                num_classes=10)
  else:  # 256 px: 32x32x4 latents
    model = create_model(name, input_size=32, num_classes=1000)
  params = init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
  return model, params


def model_fn_for(model: DiT, params):
  def model_fn(x, t, y):
    return model.apply({"params": params}, x, t, y, 4.0, method=DiT.forward_with_cfg)
  return model_fn


def scan_loop(model, params, sampler, steps, noise, y):
  spacing = {"ddim": f"ddim{steps}", "ddpm": str(steps), "dpm-solver++": ""}[sampler]
  diffusion = create_diffusion(spacing)
  fn = jax.jit(lambda p, n: run_loop(diffusion, model_fn_for(model, p), n, jax.random.key(0),
                                     sampler=sampler, eta=0.0, num_steps=steps,
                                     clip_denoised=False, model_kwargs={"y": y}))
  return lambda: fn(params, noise)


def python_loop(model, params, sampler, steps, noise, y):
  """The same sampler, one jitted step per Python iteration."""
  model_fn = model_fn_for(model, params)
  if sampler == "dpm-solver++":
    diffusion = create_diffusion("")
    ts = solver_timesteps(1000, steps)
    coef = {k: np.asarray(v, np.float32) for k, v in
            solver_coefficients(diffusion.alphas_cumprod, ts).items()}

    @jax.jit
    def step(x, prev, t, a, b, c, p, alpha, sigma):
      eps = model_fn(x, jnp.full((x.shape[0],), t), y)[..., :x.shape[-1]]
      x0 = (x - sigma * eps) / alpha
      return a * x + b * (c * x0 + p * prev), x0

    def run():
      x, prev = noise, jnp.zeros_like(noise)
      for i, t in enumerate(ts):
        x, prev = step(x, prev, int(t), *(coef[k][i] for k in "abcp"), coef["alpha"][i],
                       coef["sigma"][i])
      return x
    return run
  spacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
  diffusion = create_diffusion(spacing)

  @jax.jit
  def step(x, i, key):
    t = jnp.full((x.shape[0],), i)
    if sampler == "ddim":
      return diffusion.ddim_sample(model_fn, x, t, clip_denoised=False,
                                   model_kwargs={"y": y})["sample"]
    return diffusion.p_sample(model_fn, x, t, key, clip_denoised=False,
                              model_kwargs={"y": y})["sample"]

  def run():
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
      x = step(x, i, jax.random.fold_in(jax.random.key(0), i))
    return x
  return run


def timed(run, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  jax.block_until_ready(run())  # compile + first run
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(run())
  return first, (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "S/2"])
  parser.add_argument("--batch", type=int, default=8, help="images (the model sees 2x)")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, batch {args.batch} (x2 for guidance)")
  print("| model | sampler | steps | compiled loop img/s | Python loop img/s | speed-up | "
        "compile s |")
  print("|---|---|---|---|---|---|---|")
  for name in args.models:
    model, params = build(name)
    z = jax.random.normal(jax.random.key(2), (args.batch, model.input_size, model.input_size,
                                               model.in_channels))
    noise = jnp.concatenate([z, z])
    y = jnp.concatenate([jnp.arange(args.batch) % model.num_classes,
                         jnp.full((args.batch,), model.num_classes)])
    for sampler, steps in SAMPLERS:
      first, scan_s = timed(scan_loop(model, params, sampler, steps, noise, y), args.repeats)
      _, py_s = timed(python_loop(model, params, sampler, steps, noise, y), args.repeats)
      print(f"| {name} | {sampler} | {steps} | {args.batch / scan_s:.3g} | "
            f"{args.batch / py_s:.3g} | {py_s / scan_s:.2f}x | {first - scan_s:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
