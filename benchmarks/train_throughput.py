"""Training throughput of DiT variants: img/s, MFU, peak memory, compile time.

  python -m benchmarks.train_throughput --variants S/2 XL/2 --batch 256 32 --dtype bfloat16
  python -m benchmarks.train_throughput --variants S/2 --batch 8 --dtype float32 \
      --blocks scanned unrolled --steps 10          # the CPU target of README

Runs the real jitted, state-donating `train_step` on random 32x32x4 latents (256 px) over all
local devices (data parallel), with scanned and/or unrolled blocks. Needs only
jax/flax/optax/numpy, so it runs on accelerator images without TensorFlow or ml_collections.
Prints a Markdown table.
"""
import argparse
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import host_memory
from dit_jax.diffusion import OFFICIAL_PROCESS
from dit_jax.models import create_model
from dit_jax.train import sharding as shd
from dit_jax.train import state as state_lib
from dit_jax.train.step import jit_train_step
from dit_jax.train.throughput import peak_flops, train_flops_per_image

# AdamW as the trainer builds it (`state.make_optimizer`), constant learning rate, no clipping.
OPTIMIZER = types.SimpleNamespace(learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999,
                                  eps=1e-8, warmup_steps=0, grad_clip_norm=0.0)


# Steps run before timing: on CPU, with freed memory kept (`dit_jax.host_memory`), the first
# steps still grow the heap. A run's first layout still measured a few percent slower than in a
# process of its own, so README's CPU rows run one layout per process.
WARMUP_STEPS = 3


def latents(batch, rng, frozen):
  """The step's x0: the batch's random latents as they are."""
  del rng, frozen
  return batch["images"]


def build_step(variant: str, batch: int, dtype: str, remat: str | None,
               attention: str | None, scan_blocks: bool = True, input_size: int = 32,
               scan_unroll: int | None = None):
  """The trainer's jitted, state-donating step for a variant, with a state and a random batch.

  Returns (model, jitted step, state, batch arrays): the trainer's layout with its default mesh
  and axis rules (data parallel over all devices), hybrid loss, AdamW, EMA.
  """
  model = create_model(variant, input_size=input_size, num_classes=1000,
                       dtype=jnp.dtype(dtype), scan_blocks=scan_blocks, remat_policy=remat,
                       attention_impl=attention, scan_unroll=scan_unroll)
  tx, schedule = state_lib.make_optimizer(OPTIMIZER)
  mesh = shd.make_mesh(shd.MESH_AXES, (-1, 1, 1))
  shape = (batch, input_size, input_size, 4)
  spec = {"images": jax.ShapeDtypeStruct(shape, np.float32),
          "labels": jax.ShapeDtypeStruct((batch,), np.int32)}
  layout = state_lib.make_layout(model, tx, spec, mesh, shd.AXIS_RULES)
  state = state_lib.init_sharded(model, tx, layout, jax.random.key(0))
  batch_arrays = {
      "images": jax.device_put(np.random.default_rng(0).standard_normal(shape, np.float32),
                               layout.batch["images"]),
      "labels": jax.device_put(np.arange(batch, dtype=np.int32) % 1000, layout.batch["labels"])}
  step = jit_train_step(layout, model=model, process=OFFICIAL_PROCESS, x0=latents, tx=tx,
                        lr_schedule=schedule, ema_decay=0.9999)
  return model, step, state, batch_arrays


def retain_host_memory(variants: list[str], batches: list[int], dtype: str) -> bool:
  """As train.py does, before JAX starts: freed host memory kept for the next step, with one
  malloc arena if any variant's step has large activations (`dit_jax.host_memory`)."""
  return host_memory.retain_freed_memory(one_arena=any(
      host_memory.large_activations(create_model(v, dtype=jnp.dtype(dtype)), b)
      for v, b in zip(variants, batches)))


def measure(variant: str, batch: int, dtype: str, steps: int, remat: str | None,
            attention: str | None, scan_blocks: bool = True,
            scan_unroll: int | None = None) -> dict[str, float]:
  model, step, state, batch_arrays = build_step(variant, batch, dtype, remat, attention,
                                                scan_blocks, scan_unroll=scan_unroll)
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays, rng, None).compile()
  compile_s = time.perf_counter() - start
  for _ in range(WARMUP_STEPS):  # the first steps also fault in the process's memory
    state, metrics = compiled(state, batch_arrays, rng, None)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch_arrays, rng, None)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  images_per_sec = steps * batch / elapsed
  peak = peak_flops()
  mfu = (images_per_sec * train_flops_per_image(model) / (peak * jax.device_count())
         if peak else float("nan"))
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"steps_per_sec": steps / elapsed, "images_per_sec": images_per_sec, "mfu": mfu,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
          "compile_s": compile_s, "loss": float(metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", nargs="+", default=["S/2", "XL/2"])
  parser.add_argument("--batch", type=int, nargs="+", default=[256, 32],
                      help="global batch per variant (one value: all)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--remat", default=None, help="jax.checkpoint_policies name")
  parser.add_argument("--attention", default=None, help="None | xla | cudnn")
  parser.add_argument("--blocks", nargs="+", default=["scanned"], choices=["scanned", "unrolled"],
                      help="run the blocks under nn.scan, unrolled, or both (one row each)")
  parser.add_argument("--scan_unroll", type=int, default=None,
                      help="blocks per iteration of the scan (default: the backend's, "
                           "dit_jax.models.dit.default_scan_unroll: all on CPU, 1 elsewhere)")
  args = parser.parse_args()
  batches = args.batch * len(args.variants) if len(args.batch) == 1 else args.batch
  retained = retain_host_memory(args.variants, batches, args.dtype)
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, {args.dtype}, "
        f"256 px (32x32x4 latents), remat {args.remat}, scan unroll "
        f"{args.scan_unroll or 'default'}, freed host memory kept {retained}")
  print("| model | blocks | batch | steps/s | img/s | MFU | peak GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for variant, batch in zip(args.variants, batches):
    for blocks in args.blocks:
      r = measure(variant, batch, args.dtype, args.steps, args.remat, args.attention,
                  scan_blocks=blocks == "scanned", scan_unroll=args.scan_unroll)
      print(f"| DiT-{variant} | {blocks} | {batch} | {r['steps_per_sec']:.2f} | "
            f"{r['images_per_sec']:.2f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | "
            f"{r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
