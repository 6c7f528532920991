"""The speed issue's CPU targets, measured side by side with the official PyTorch code.

  python -m benchmarks.cpu_targets [--rounds 2] [--digits] [--out cpu_targets.json]

The targets are ratios to the official PyTorch DiT on the same machine (a machine of another
class moves both sides), so this runs both, alternating, on whatever machine it is started:
  - train step, DiT-S/2, batch 8, float32, 256 px (32x32x4 latents, hybrid loss, AdamW, EMA):
    the official step (`benchmarks.torch_reference`) and dit-jax's (`benchmarks.train_throughput`)
    with unrolled and with scanned blocks; target 1.3x the official img/s, both layouts;
  - guided DDPM sampling, 4 images (the model sees 8), 50 steps, scale 4: the official sample.py
    loop and dit-jax's compiled loop (`benchmarks.sampling_speed`); target 2x (half the time);
  - with --digits, the digits default end to end (`train.py --config configs/digits.py`, training
    and grading, in a temporary workdir); target: no slower than 6.5 min.
Every measurement runs in a fresh process (host memory settings, compiled programs and torch's
threads start afresh), one at a time, in `--rounds` rounds. The table gives every round's
figure, the best of each (the least disturbed by whatever else the machine ran), the ratio of
dit-jax's best to the official best and whether the target is met. Timing only: nothing is
compared numerically here (tests/test_torch_reference.py checks the port against the official
fixture). With --out the figures are written as JSON, never over an existing file.
"""
import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIGITS_LIMIT_S = 6.5 * 60  # the digits default end to end before the speed work
TRAIN_TARGET, SAMPLING_TARGET = 1.3, 2.0


def torch_train(variant: str, batch: int, steps: int, warmup: int) -> float:
  """The official train step's img/s (the PyTorch port)."""
  from benchmarks import torch_reference as tr
  args = tr.parse_args(["--model", variant, "--batch", str(batch), "--steps", str(steps),
                        "--warmup", str(warmup)])
  return tr.time_training(tr.speed_model(args), args)


def torch_sampling(variant: str, images: int, steps: int) -> float:
  """Seconds of the official guided sampling loop (the PyTorch port)."""
  from benchmarks import torch_reference as tr
  args = tr.parse_args(["--model", variant, "--sample_images", str(images), "--sample_steps",
                        str(steps)])
  return tr.time_sampling(tr.speed_model(args), args)


def jax_train(variant: str, batch: int, steps: int, blocks: str) -> float:
  """dit-jax's train step img/s, the block layout given (`benchmarks.train_throughput`)."""
  from benchmarks import train_throughput
  train_throughput.retain_host_memory([variant], [batch], "float32")  # before JAX starts
  return train_throughput.measure(variant, batch, "float32", steps, None, None,
                                  scan_blocks=blocks == "scanned")["images_per_sec"]


def jax_sampling(variant: str, images: int, steps: int) -> float:
  """Seconds of dit-jax's compiled guided DDPM loop, compiled and run once before timing."""
  from dit_jax import host_memory
  host_memory.retain_freed_memory()  # as the programs do: before JAX starts
  import jax
  import jax.numpy as jnp
  from benchmarks import sampling_speed
  model, params = sampling_speed.build(variant)
  z = jax.random.normal(jax.random.key(2), (images, model.input_size, model.input_size,
                                             model.in_channels))
  labels = jnp.arange(images) % model.num_classes
  run = sampling_speed.scan_loop(model, params, "ddpm", steps, z, labels)
  return sampling_speed.timed(run, repeats=1)[1]


def digits_end_to_end() -> float:
  """Seconds of `train.py --config configs/digits.py` (training and grading) in a fresh workdir."""
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                          str(ROOT / "configs" / "digits.py"), "--workdir", workdir], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
  if run.returncode:
    raise RuntimeError(f"train.py --config configs/digits.py failed (exit {run.returncode}):\n"
                       + "\n".join(run.stderr.splitlines()[-20:]))
  return seconds


# (name, function, keyword arguments from the settings, unit, official row it is compared to)
def measurements(args: argparse.Namespace) -> list[tuple[str, Callable[..., float], dict, str,
                                                          Optional[str]]]:
  train = dict(variant=args.variant, batch=args.batch, steps=args.train_steps)
  sampling = dict(variant=args.variant, images=args.sample_images, steps=args.sample_steps)
  rows = [
      ("official train step", torch_train, {**train, "warmup": args.warmup}, "img/s", None),
      ("dit-jax train step, unrolled blocks", jax_train, {**train, "blocks": "unrolled"},
       "img/s", "official train step"),
      ("dit-jax train step, scanned blocks", jax_train, {**train, "blocks": "scanned"},
       "img/s", "official train step"),
      ("official guided sampling", torch_sampling, sampling, "s", None),
      ("dit-jax guided sampling", jax_sampling, sampling, "s", "official guided sampling"),
  ]
  if args.digits:
    rows.append(("dit-jax digits default end to end", digits_end_to_end, {}, "s", None))
  return rows


def run_fresh(fn: Callable[..., float], kwargs: dict) -> float:
  """fn(**kwargs) in a new process of its own (spawned: nothing inherited from this one)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    return pool.submit(fn, **kwargs).result()


def summarize(rows: list[tuple[str, str, Optional[str]]], figures: dict[str, list[float]]
              ) -> list[dict[str, Any]]:
  """Per row: its figures, the best (max img/s, min seconds), and against its official row the
  ratio (how many times faster) and whether the target is met."""
  best = {name: (max if unit == "img/s" else min)(figures[name]) for name, unit, _ in rows}
  out = []
  for name, unit, official in rows:
    row: dict[str, Any] = {"name": name, "unit": unit, "figures": figures[name],
                           "best": best[name]}
    if official is not None:
      ratio = (best[name] / best[official] if unit == "img/s" else best[official] / best[name])
      target = TRAIN_TARGET if unit == "img/s" else SAMPLING_TARGET
      row.update(ratio=ratio, target=target, met=ratio >= target)
    elif name.endswith("digits default end to end"):
      row.update(target_s=DIGITS_LIMIT_S, met=best[name] <= DIGITS_LIMIT_S)
    out.append(row)
  return out


def format_table(summary: list[dict[str, Any]]) -> str:
  lines = ["| measurement | each round | best | vs official | target | met |",
           "|---|---|---|---|---|---|"]
  for row in summary:
    each = ", ".join(f"{v:.3g}" for v in row["figures"])
    best = f"{row['best']:.3g} {row['unit']}"
    if "ratio" in row:
      cells = f"{row['ratio']:.2f}x | {row['target']:.1f}x | {'yes' if row['met'] else 'no'}"
    elif "target_s" in row:
      cells = f"- | <= {row['target_s'] / 60:.1f} min | {'yes' if row['met'] else 'no'}"
    else:
      cells = "- | - | -"
    lines.append(f"| {row['name']} | {each} | {best} | {cells} |")
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
  parser.add_argument("--variant", default="S/2")
  parser.add_argument("--batch", type=int, default=8, help="train batch")
  parser.add_argument("--train_steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--warmup", type=int, default=3,
                      help="the official step's untimed steps (dit-jax's: train_throughput's)")
  parser.add_argument("--sample_images", type=int, default=4)
  parser.add_argument("--sample_steps", type=int, default=50)
  parser.add_argument("--digits", action="store_true", help="also time the digits default")
  parser.add_argument("--out", default=None, help="JSON of the figures (never overwritten)")
  args = parser.parse_args(argv)
  for field in ("rounds", "batch", "train_steps", "sample_images", "sample_steps"):
    if getattr(args, field) < 1:
      parser.error(f"--{field} must be at least 1, got {getattr(args, field)}")
  if args.out and os.path.exists(args.out):
    parser.error(f"--out {args.out} exists; it is never overwritten")
  if importlib.util.find_spec("torch") is None:  # the official side runs on PyTorch
    parser.error("the official side needs torch: pip install -r requirements-dev.txt")
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  rows = measurements(args)
  figures: dict[str, list[float]] = {name: [] for name, *_ in rows}
  from benchmarks.torch_reference import cpu_name
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; DiT-{args.variant}, float32, "
        f"{args.rounds} rounds", flush=True)
  for round_index in range(args.rounds):
    for name, fn, kwargs, unit, _ in rows:
      figures[name].append(run_fresh(fn, kwargs))
      print(f"round {round_index + 1}: {name}: {figures[name][-1]:.3g} {unit}", flush=True)
  summary = summarize([(name, unit, official) for name, _, _, unit, official in rows], figures)
  print(format_table(summary))
  if args.out:
    with open(args.out, "x", encoding="utf-8") as f:  # "x": never over an existing file
      json.dump({"settings": vars(args), "rows": summary}, f, indent=1)


if __name__ == "__main__":
  main()
