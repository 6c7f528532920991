"""Accelerator numbers per model: the largest batch that fits, train img/s, MFU, memory, sampling.

  python -m benchmarks.accelerator --models S/2:256 XL/2:128,64,32 --out results.jsonl

For each model it tries the listed global batches (largest first; each then with the remat
policies of `--remats`), every attempt in a fresh process so that an out-of-memory attempt
cannot poison the next or the peak-memory reading, and keeps the first that runs. For it:
steps/s, img/s, MFU (analytic FLOPs: 3 x 2 x forward MACs per image, over the device's dense
bf16 peak), peak device memory, the train step's compile time, then guided DDIM sampling
(50 steps, cfg 4, doubled batch, the whole loop compiled once) in img/s. Prints a Markdown
table; `benchmarks/accelerator.sh` runs the standard set. Needs only jax, flax, optax, numpy.
The parent process never initializes a JAX backend (a GPU backend would take the memory).
"""
import argparse
import json
import os
import subprocess
import sys
import time

OOM_EXIT = 3  # a child's exit code for "did not fit"
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def parse_models(specs: list[str]) -> list[tuple[str, list[int]]]:
  """["XL/2:128,64"] -> [("XL/2", [128, 64])]."""
  out = []
  for spec in specs:
    variant, _, batches = spec.partition(":")
    if not batches:
      raise SystemExit(f"--models: {spec!r} needs batches, e.g. {variant}:256,128")
    out.append((variant, [int(b) for b in batches.split(",")]))
  return out


def child(args: argparse.Namespace) -> None:
  """One attempt: train throughput at one (batch, remat), then sampling; one JSON line out."""
  import jax
  import jax.numpy as jnp

  from benchmarks.train_throughput import measure
  from dit_jax.models import create_model, init_params
  from dit_jax.samplers.guidance import make_sample_fn

  remat = None if args.remat == "none" else args.remat
  if args.patch:
    from benchmarks.step_variants import apply_patch
    apply_patch(args.patch)
  try:
    result = measure(args.variant, args.batch, args.dtype, args.steps, remat, args.attention,
                     scan_blocks=args.blocks == "scanned")
  except Exception as e:  # noqa: BLE001 - out of memory is an answer, anything else a bug
    if any(marker in str(e) for marker in OOM_MARKERS):
      print(f"out of memory: {str(e).splitlines()[0][:200]}", file=sys.stderr)
      sys.exit(OOM_EXIT)
    raise
  jax.clear_caches()
  if args.sample_batch:
    model = create_model(args.variant, input_size=32, num_classes=1000,
                         dtype=jnp.dtype(args.dtype), scan_blocks=args.blocks == "scanned",
                         attention_impl=args.attention)
    params = init_params(model, jax.random.key(0))
    sample = make_sample_fn(model, sampler="ddim", num_steps=50, cfg_scale=4.0)
    labels = jnp.arange(args.sample_batch, dtype=jnp.int32) % 1000
    start = time.perf_counter()
    compiled = sample.lower(params, labels, jax.random.key(1)).compile()
    result["sample_compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(params, labels, jax.random.key(1)))
    start = time.perf_counter()
    for i in range(2):
      jax.block_until_ready(compiled(params, labels, jax.random.key(2 + i)))
    result["sample_img_s"] = 2 * args.sample_batch / (time.perf_counter() - start)
    result["sample_batch"] = args.sample_batch
  result.update(variant=args.variant, batch=args.batch, remat=args.remat, dtype=args.dtype,
                attention=args.attention, blocks=args.blocks, device=jax.devices()[0].device_kind,
                device_count=jax.device_count(), jax=jax.__version__)
  print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, batch: int, *, remat: str = "none", dtype: str = "bfloat16",
              steps: int = 10, sample_batch: int = 64, blocks: str = "unrolled",
              attention: str | None = None, patch: str = "", xla_flags: str = "",
              timeout: float | None = None) -> tuple[int | None, dict | None, str]:
  """One attempt (`child`) in a fresh process: (exit code, its result or None, stderr).

  `xla_flags` are added to XLA_FLAGS; `patch` names `step_variants.PATCHES`. The exit code is
  None when the attempt ran past `timeout` seconds."""
  cmd = [sys.executable, "-m", "benchmarks.accelerator", "--child", "--variant", variant,
         "--batch", str(batch), "--remat", remat, "--dtype", dtype, "--steps", str(steps),
         "--sample_batch", str(sample_batch), "--blocks", blocks, "--patch", patch]
  if attention:
    cmd += ["--attention", attention]
  # JAX takes 75% of GPU memory by default; let the attempt use (nearly) all of it.
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ}
  if xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, None, f"over {timeout:.0f} s"
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return proc.returncode, json.loads(line[len("RESULT "):]), proc.stderr
  return proc.returncode, None, proc.stderr


def attempt(variant: str, batch: int, remat: str, args: argparse.Namespace,
            attention: str | None) -> tuple[int | None, dict | None, str]:
  return run_child(variant, batch, remat=remat, dtype=args.dtype, steps=args.steps,
                   sample_batch=args.sample_batch, blocks=args.blocks, attention=attention)


def run_model(variant: str, batches: list[int], args: argparse.Namespace) -> dict:
  attention = args.attention
  for remat in args.remats:  # remat only when no batch fits without it
    for batch in batches:
      start = time.perf_counter()
      code, result, err = attempt(variant, batch, remat, args, attention)
      if code != 0 and code != OOM_EXIT and attention == "cudnn":
        # cuDNN attention unsupported here (shape, version): say so, measure XLA's instead.
        print(f"  DiT-{variant}: cudnn attention failed ({last_line(err)}); using xla",
              flush=True)
        attention = "xla"
        code, result, err = attempt(variant, batch, remat, args, attention)
      took = time.perf_counter() - start
      if code == 0 and result is not None:
        print(f"  DiT-{variant} batch {batch} remat {remat}: ok ({took:.0f} s)", flush=True)
        return result
      if code == OOM_EXIT:
        print(f"  DiT-{variant} batch {batch} remat {remat}: out of memory ({took:.0f} s)",
              flush=True)
        continue
      print(err[-3000:], file=sys.stderr)
      return {"variant": variant, "error": last_line(err)}
  return {"variant": variant, "error": f"no batch of {batches} fits"}


def last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  errors = [line for line in lines if "Error" in line.split(":")[0]]
  lines = errors or lines
  return lines[-1][:300] if lines else "no output"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["S/2:256", "XL/2:128,64,32"],
                      help="VARIANT:BATCH[,BATCH...] global batches, largest first")
  parser.add_argument("--remats", nargs="+", default=["none"],
                      help="remat policies tried at each batch, in order ('none': no remat)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--attention", default="cudnn", help="cudnn (falls back to xla) | xla")
  parser.add_argument("--sample_batch", type=int, default=64, help="0: no sampling")
  parser.add_argument("--out", default=None, help="append each result as a JSON line here")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--remat", default="none", help=argparse.SUPPRESS)
  parser.add_argument("--blocks", default="unrolled", choices=["scanned", "unrolled"],
                      help="the blocks unrolled (fastest on an H100) or under nn.scan")
  parser.add_argument("--patch", default="", help=argparse.SUPPRESS)  # step_variants.PATCHES
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  rows = []
  for variant, batches in parse_models(args.models):
    result = run_model(variant, batches, args)
    rows.append(result)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
  print(format_table(rows))


def format_table(rows: list[dict]) -> str:
  ok = [r for r in rows if "error" not in r]
  head = (f"device: {ok[0]['device_count']} x {ok[0]['device']}, {ok[0]['dtype']}, jax "
          f"{ok[0]['jax']}, 256 px (32x32x4 latents), {ok[0].get('blocks', 'scanned')} "
          "blocks\n" if ok else "")
  lines = [head + "| model | batch | remat | attention | img/s | MFU | peak GiB | compile s | "
           "sampling img/s (DDIM-50, cfg 4) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| DiT-{r['variant']} | {r['error']} |||||||")
      continue
    sampling = f"{r['sample_img_s']:.1f}" if "sample_img_s" in r else "-"
    lines.append(f"| DiT-{r['variant']} | {r['batch']} | {r['remat']} | {r['attention']} | "
                 f"{r['images_per_sec']:.1f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | "
                 f"{r['compile_s']:.1f} | {sampling} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
