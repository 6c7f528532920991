"""Sampling speed: one compiled `lax.scan` loop vs a Python loop of jitted steps.

  python -m benchmarks.sampling_speed [--models tiny S/2] [--samplers ddim] [--num_steps 50]

For each model and sampler (default: every one of `dit_jax.samplers.SAMPLERS`) it prints images/s
of the whole guided sampling loop (cfg 4, doubled batch), compiled once as dit-jax does it, its
model evaluations, and images/s of the same sampler's step driven from Python (one dispatch per
step). A diffusion sampler runs the official process on a model with learned sigma, a flow
sampler a flow (SiT's linear path, velocity prediction) on the same architecture without it.
An adaptive solver (ode-dopri5) has no steps to drive from Python: its whole solve is one step
of its chain, so that column is left empty. Needs only jax/flax/numpy (no TensorFlow, no
ml_collections).
"""
import argparse
import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from dit_jax import host_memory
from dit_jax import samplers
from dit_jax.diffusion import OFFICIAL_PROCESS, FlowProcess
from dit_jax.models import DiT, create_model, init_params
from dit_jax.samplers.guidance import guide


# The process each kind of sampler runs; the model is built to match (learn_sigma).
PROCESSES = {"diffusion": OFFICIAL_PROCESS, "flow": FlowProcess()}


def build(name: str, learn_sigma: bool = True):
  if name == "tiny":  # the official fixture's architecture: 8x8x4 latents, depth 1, width 64
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                num_classes=10, learn_sigma=learn_sigma)
  else:  # 256 px: 32x32x4 latents
    model = create_model(name, input_size=32, num_classes=1000, learn_sigma=learn_sigma)
  params = init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
  return model, params


def process_for(model: DiT, sampler: str):
  """The process `sampler` samples, for a model built with `build` (its learn_sigma)."""
  process = PROCESSES[samplers.SAMPLERS[sampler].kind]
  return dataclasses.replace(process, learn_sigma=model.learn_sigma)


def make_loop(model, params, sampler, steps, z, labels) -> samplers.Loop:
  """The registered sampler's chain for guided (scale 4) samples of `labels` from noise z."""
  model_fn, noise, kwargs = guide(model, params, z, labels, cfg_scale=4.0)
  process = process_for(model, sampler)
  return samplers.get(sampler, process=process)(
      process, model_fn, noise, jax.random.key(0), num_steps=steps, clip_denoised=False,
      eta=0.0, model_kwargs=kwargs)


def scan_loop(model, params, sampler, steps, z, labels):
  """The whole chain compiled once (`samplers.run_with_nfe`: one lax.scan), as dit-jax samples;
  returns `(samples, model evaluations)`."""
  fn = jax.jit(lambda p, z: samplers.run_with_nfe(make_loop(model, p, sampler, steps, z, labels)))
  return lambda: fn(params, z)


def python_loop(model, params, sampler, steps, z, labels):
  """The same sampler's step, jitted, one dispatch per step from Python; None for a chain
  that decides its steps at run time (one step, the whole adaptive solve)."""
  loop = make_loop(model, params, sampler, steps, z, labels)
  if callable(loop.nfe):
    return None
  step = jax.jit(loop.step)
  xs = jax.device_get(loop.xs)
  num = len(jax.tree.leaves(xs)[0])

  def run():
    carry = loop.init
    for i in range(num):
      carry = step(carry, jax.tree.map(lambda a: a[i], xs))
    return loop.finish(carry)
  return run


def timed(run, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  jax.block_until_ready(run())  # compile + first run
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(run())
  return first, (time.perf_counter() - start) / repeats


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "S/2"])
  parser.add_argument("--samplers", nargs="+", default=list(samplers.SAMPLERS),
                      choices=list(samplers.SAMPLERS), help="default: every registered one")
  parser.add_argument("--num_steps", type=int, default=50, help="model evaluations")
  parser.add_argument("--batch", type=int, default=8, help="images (the model sees 2x)")
  parser.add_argument("--repeats", type=int, default=2)
  return parser.parse_args(argv)


def main() -> None:
  args = parse_args()
  retained = host_memory.retain_freed_memory()  # as the programs do: before JAX starts
  print(f"device: {jax.devices()[0].device_kind}, batch {args.batch} (x2 for guidance), "
        f"freed host memory kept {retained}")
  print("| model | sampler | steps | evaluations | compiled loop img/s | Python loop img/s | "
        "speed-up | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models:
    kinds = {samplers.SAMPLERS[sampler].kind for sampler in args.samplers}
    # A model per kind of process: with learned sigma for the diffusion, without for the flow.
    models = {kind: build(name, learn_sigma=kind == "diffusion") for kind in sorted(kinds)}
    for sampler in args.samplers:
      model, params = models[samplers.SAMPLERS[sampler].kind]
      z = jax.random.normal(jax.random.key(2), (args.batch, model.input_size, model.input_size,
                                                 model.in_channels))
      labels = jnp.arange(args.batch) % model.num_classes
      scan = scan_loop(model, params, sampler, args.num_steps, z, labels)
      first, scan_s = timed(scan, args.repeats)
      nfe = int(scan()[1])
      stepwise = python_loop(model, params, sampler, args.num_steps, z, labels)
      if stepwise is None:
        python_cells = "| - | - |"
      else:
        _, py_s = timed(stepwise, args.repeats)
        python_cells = f"| {args.batch / py_s:.3g} | {py_s / scan_s:.2f}x |"
      print(f"| {name} | {sampler} | {args.num_steps} | {nfe} | {args.batch / scan_s:.3g} "
            f"{python_cells} {first - scan_s:.1f} |", flush=True)


if __name__ == "__main__":
  main()
