"""Diffusion against flow matching on the embedded digits: each sampler's quality, cost and time.

  python train.py --config configs/digits.py --workdir runs/digits
  python train.py --config configs/digits.py:flow --workdir runs/digits_flow
  python -m benchmarks.process_comparison --diffusion runs/digits --flow runs/digits_flow

For every row (a checkpoint's process, a sampler, its model evaluations) it draws
`--num_samples` guided EMA samples, labels 0..9 in turn as training's grade does, grades them
with the digits classifier (accuracy against the conditioning label, Fréchet distance of its
features to the real digits' features) and times the sampling: the compile is measured apart,
on the first chunk, and the time is that of all samples with the program compiled. Prints a
Markdown table and writes it with the raw numbers as JSON (`--out`, never overwritten).
"""
import argparse
import json
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from dit_jax import checkpoints, fs, generate, samplers
from dit_jax.eval.digits import DigitsGrader

# (process, sampler, model evaluations): the diffusion samplers of the registry, in its order,
# at the paper's 250 (ddpm), 50 (ddim) and 20 (dpm-solver++); the flow's ODE Heun at 10, 20 and
# 50, adaptive Dopri5 (its own count: 0 is not used) and the SDE at 250, as SiT samples.
DIFFUSION_STEPS = (250, 50, 20)
ROWS = (*[("diffusion", name, steps)
          for name, steps in zip(samplers.names("diffusion"), DIFFUSION_STEPS)],
        ("flow", "ode-heun", 10), ("flow", "ode-heun", 20), ("flow", "ode-heun", 50),
        ("flow", "ode-dopri5", 0), ("flow", "sde-euler", 250))


def measure(checkpoint: tuple[Any, Any, Any], sampler: str, num_steps: int, *, num_samples: int,
            batch_size: int, cfg_scale: float, grader: DigitsGrader) -> dict[str, Any]:
  """One row: grade and time `num_samples` samples of a loaded (model, process, params)."""
  model, process, params = checkpoint
  spec = generate.SamplingSpec(process=process, sampler=sampler, num_steps=max(num_steps, 1),
                               cfg_scale=cfg_scale, guidance_channels=None,
                               clip_denoised=process.kind == "diffusion")
  labels = np.arange(num_samples, dtype=np.int32) % model.num_classes
  rng = generate.sample_key(0)
  start = time.perf_counter()  # the first chunk's program: compiled and run once
  generate.sample(model, params, spec, labels[:batch_size], rng)
  first = time.perf_counter() - start
  start = time.perf_counter()
  samples, nfe = generate.sample(model, params, spec, labels, rng, batch_size=batch_size,
                                 return_nfe=True)
  seconds = time.perf_counter() - start
  grade = grader.grade(samples, labels)
  return {"process": process.kind, "describe": process.describe(), "sampler": sampler,
          "nfe": nfe, "accuracy": float(grade["accuracy"]),
          "frechet_distance": float(grade["frechet_distance"]), "seconds": seconds,
          "compile_seconds": max(first - seconds * min(batch_size, num_samples) / num_samples, 0),
          "num_samples": num_samples}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| process | sampler | model evaluations | accuracy | Fréchet distance | "
           "sampling s | compile s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['process']} | {r['sampler']} | {r['nfe']:.0f} | {r['accuracy']:.1%} | "
                 f"{r['frechet_distance']:.2f} | {r['seconds']:.1f} | "
                 f"{r['compile_seconds']:.1f} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--diffusion", required=True, help="workdir of configs/digits.py")
  parser.add_argument("--flow", required=True, help="workdir of configs/digits.py:flow")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--cfg_scale", type=float, default=3.0, help="the digits configs' scale")
  parser.add_argument("--rows", nargs="+", default=None,
                      help="PROCESS:SAMPLER:STEPS entries (default: the README table's)")
  parser.add_argument("--out", default=None, help="JSON file to write (must not exist)")
  args = parser.parse_args(argv)
  if args.out and fs.exists(args.out):
    parser.error(f"--out: {args.out} already exists; refusing to overwrite it")
  rows = ROWS if args.rows is None else [_parse_row(parser, r) for r in args.rows]
  loaded = {}
  for kind, flag in (("diffusion", "--diffusion"), ("flow", "--flow")):
    try:  # EMA weights and the process the checkpoint records, before any sampling
      loaded[kind] = checkpoints.load_for_sampling(getattr(args, kind))
    except (FileNotFoundError, ValueError) as error:
      parser.error(f"{flag}: {error}")
    if loaded[kind][1].kind != kind:
      parser.error(f"{flag}: {getattr(args, kind)} holds a {loaded[kind][1].describe()} model")
  for kind, sampler, _ in rows:
    try:
      samplers.get(sampler, "--rows", loaded[kind][1])
    except ValueError as error:
      parser.error(str(error))
  grader = DigitsGrader(seed=0)
  results = []
  for kind, sampler, steps in rows:
    results.append(measure(loaded[kind], sampler, steps, num_samples=args.num_samples,
                           batch_size=args.batch_size, cfg_scale=args.cfg_scale, grader=grader))
    print(format_table(results[-1:]).splitlines()[-1], flush=True)
  table = format_table(results)
  print(f"\n{jax.devices()[0].device_kind}, {jax.device_count()} device(s), jax "
        f"{jax.__version__}\n{table}")
  if args.out:
    fs.write_text(args.out, json.dumps({"rows": results, "table": table}, indent=1),
                  overwrite=False)
  return results


def _parse_row(parser: argparse.ArgumentParser, text: str) -> tuple[str, str, int]:
  kind, _, rest = text.partition(":")
  sampler, _, steps = rest.partition(":")
  if kind not in ("diffusion", "flow") or not sampler or not steps.isdigit():
    parser.error(f"--rows: {text!r} is not PROCESS:SAMPLER:STEPS (e.g. flow:ode-heun:20)")
  return kind, sampler, int(steps)


if __name__ == "__main__":
  main()
