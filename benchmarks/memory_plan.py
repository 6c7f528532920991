"""Pod-scale memory plan by simulation: per-device memory of the train step on N fake devices.

  python -m benchmarks.memory_plan                      # XL/2, 256 and 512 px, 8/64/256 devices
  python -m benchmarks.memory_plan --devices 8 64 --image-sizes 256 --remats none

Compiles the trainer's own jitted step ahead of time (`train_step` with the layout of
`state.make_layout`, the default mesh axes and rules of `dit_jax/train/sharding.py`, bf16
compute, float32 params, scanned blocks, AdamW + EMA, latents sampled from stored moments) on
fake CPU devices (`--xla_force_host_platform_device_count`, one subprocess per device count):
nothing is materialized. For each mesh, per device: the state and batch (the compiled program's
arguments), temporary memory (`compiled.memory_analysis()`), and the collectives one step runs,
read from the compiled HLO (each collective's result size on one device, times the iterations of
the loops around it). Memory grows with the per-device batch: two compiles (`--batches a b`) give
a line (fixed bytes + bytes per image), a third at the largest batch that line lets any chip
hold checks it, and the chord from the first to the third gives the largest per-device batch
that fits the HBM of each chip in `CHIPS` (see `plan`). A mesh that the trainer refuses (a
dimension it does not divide) is reported with the trainer's one-line error, and the mesh it
suggests is measured instead.

The CPU backend fuses differently from TPU and GPU (and computes bf16 elementwise ops in
float32), so temporary memory is an estimate; state is exact. Needs only jax, flax, optax, numpy.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

GIB = 2**30
# Nominal HBM per chip, GiB (nothing is held back for the runtime: an upper bound).
CHIPS = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "H100": 80}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Mesh kinds: (data, fsdp, tensor) sizes for n devices.
MESHES = {"dp": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1),
          "mixed": lambda n: (2, n // 2, 1), "tensor": lambda n: (1, n // 2, 2)}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# The largest per-device batch compiled to check a fit (per-device batches beyond it: "N+").
MAX_CHECKED = 1024
_SUGGESTED = re.compile(r"--config\.mesh\.axis_sizes=([\d,]+)")


# --- the HLO: collectives per step ---------------------------------------------------------------

def _shape_bytes(text: str) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text))


def collectives_per_step(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes", "largest"}} of one run of a compiled (SPMD-partitioned) HLO module.

  Counts each collective once per run of its computation: a while loop's body runs its known
  trip count times (the scanned blocks), so per-iteration weight gathers count `depth` times.
  Bytes are each collective's result on one device (a gathered weight, a reduced gradient).
  Asynchronous pairs are counted at their `-done` half.
  """
  ops: dict[str, list[tuple[str, int]]] = {}  # computation -> [(collective, bytes)]
  calls: dict[str, list[tuple[str, int]]] = {}  # computation -> [(callee, times)]
  entry, current = None, None
  for line in hlo.splitlines():
    if line and not line.startswith((" ", "}")):  # a computation's header
      match = re.match(r"(ENTRY )?%?([\w.\-]+)", line)
      current = match.group(2)
      entry = current if match.group(1) else entry
      ops[current], calls[current] = [], []
      continue
    if current is None or " = " not in line:
      continue
    result, _, rest = line.partition(" = ")
    op = re.search(r"([a-z][a-z0-9\-]*)\(", rest)
    if op is None:
      continue
    name, type_text = op.group(1), rest[:op.start()]
    base = name[:-5] if name.endswith("-done") else name
    if base in COLLECTIVES and not name.endswith("-start"):
      ops[current].append((base, _shape_bytes(type_text)))
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    for key, callee in re.findall(r"\b(body|condition|calls|to_apply|true_computation|"
                                  r"false_computation)=%([\w.\-]+)", rest):
      calls[current].append((callee, int(trips.group(1)) if key == "body" and trips else 1))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", rest):
      calls[current].extend((c.strip().lstrip("%"), 1) for c in group.split(","))
  totals = {op: {"count": 0, "bytes": 0, "largest": 0} for op in COLLECTIVES}

  def walk(computation: str, times: int) -> None:
    for op, size in ops.get(computation, ()):
      totals[op]["count"] += times
      totals[op]["bytes"] += times * size
      totals[op]["largest"] = max(totals[op]["largest"], size)
    for callee, k in calls.get(computation, ()):
      walk(callee, times * k)

  walk(entry, 1)
  return totals


# --- one compile (in a process with enough fake devices) ----------------------------------------

def compile_job(job: dict[str, Any]) -> dict[str, Any]:
  """AOT-compiles the train step of `job` on the first prod(mesh) devices; its memory and HLO.

  job: variant, overrides (model fields), image_size (pixels; latents are 1/8 of it, 4 channels),
  mesh [data, fsdp, tensor], batch (per batch shard: the global batch is batch x data x fsdp),
  remat (None or a jax.checkpoint_policies name).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dit_jax.diffusion import OFFICIAL_PROCESS
  from dit_jax.latents.posterior import latents_from_moments
  from dit_jax.models import count_params, create_model
  from dit_jax.train import sharding as shd
  from dit_jax.train import state as state_lib
  from benchmarks.train_throughput import OPTIMIZER
  from dit_jax.train.step import jit_train_step

  side = job["image_size"] // 8
  overrides = {"num_classes": 1000, **job.get("overrides", {})}
  # The accelerators' program: one scanned block (on CPU the blocks would be unrolled).
  model = create_model(job["variant"], input_size=side, dtype=jnp.bfloat16, scan_blocks=True,
                       scan_unroll=1, remat_policy=job["remat"], **overrides)
  tx, schedule = state_lib.make_optimizer(OPTIMIZER)
  sizes = tuple(job["mesh"])
  mesh = shd.make_mesh(shd.MESH_AXES, sizes, devices=jax.devices()[:math.prod(sizes)])
  rules = shd.rules_from_config(shd.AXIS_RULES, mesh.axis_names)
  batch = job["batch"] * sizes[0] * sizes[1]
  spec = {"moments": jax.ShapeDtypeStruct((batch, side, side, 8), np.float32),
          "labels": jax.ShapeDtypeStruct((batch,), np.int32)}
  layout = state_lib.make_layout(model, tx, spec, mesh, rules)  # ValueError: a misfit mesh

  def x0(b, rng, frozen):  # the LatentPipeline's x0 for the SD VAE
    del frozen
    return latents_from_moments(b["moments"], rng, 0.18215)

  jitted = jit_train_step(layout, model=model, process=OFFICIAL_PROCESS, x0=x0, tx=tx,
                          lr_schedule=schedule, ema_decay=0.9999)
  replicated = shd.replicated(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=layout.batch[k])
                    for k, v in spec.items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  start = time.perf_counter()
  compiled = jitted.lower(layout.abstract_state, abstract_batch, rng, None).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {**job, "params": count_params(model), "devices": math.prod(sizes),
          "args": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
          "out": memory.output_size_in_bytes, "alias": memory.alias_size_in_bytes,
          "compile_s": compile_s,
          "collectives": collectives_per_step(compiled.as_text())}


def worker() -> None:
  """Reads jobs (a JSON list) on stdin; prints one JSON line per job. A mesh that the trainer
  refuses gives a line with its error, then the line of the mesh its error suggests."""
  for job in json.loads(sys.stdin.read()):
    try:
      print(json.dumps(compile_job(job)), flush=True)
    except ValueError as e:
      print(json.dumps({**job, "refused": str(e)}), flush=True)
      suggested = _SUGGESTED.search(str(e))
      if suggested:
        mesh = [int(s) for s in suggested.group(1).split(",")]
        print(json.dumps({**compile_job({**job, "mesh": mesh}), "instead_of": job["mesh"]}),
              flush=True)


def run_jobs(jobs: Sequence[dict[str, Any]], num_devices: int, timeout: int = 3600
             ) -> list[dict[str, Any]]:
  """Compiles `jobs` in a fresh process with `num_devices` fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} "
             "--xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--worker"],
                          input=json.dumps(list(jobs)), capture_output=True, text=True,
                          env=env, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if result.returncode:
    raise RuntimeError(f"memory_plan worker ({num_devices} devices) failed:\n"
                       f"{result.stderr[-3000:]}")
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# --- the plan: linear fits and the largest batch per chip ---------------------------------------

def total(compiled: dict[str, Any]) -> int:
  """What a device holds at the step's peak: arguments (state and batch), temporaries and the
  outputs that do not reuse a donated argument."""
  return compiled["args"] + compiled["temp"] + compiled["out"] - compiled["alias"]


def fit(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
  """Per-device bytes as fixed + per_image x batch, through compiles at two per-device batches."""
  per_image = (total(large) - total(small)) / (large["batch"] - small["batch"])
  temp_per_image = (large["temp"] - small["temp"]) / (large["batch"] - small["batch"])
  return {"per_image": per_image, "fixed": total(small) - per_image * small["batch"],
          "temp_per_image": temp_per_image,
          "temp_fixed": small["temp"] - temp_per_image * small["batch"]}


def max_batch(line: dict[str, float], hbm_gib: float) -> int:
  """The largest per-device batch whose predicted total fits `hbm_gib` (0: not even one)."""
  return max(0, math.floor((hbm_gib * GIB - line["fixed"]) / line["per_image"]))


def state_arithmetic(params: int, devices: int) -> float:
  """Bytes per device of params, EMA, Adam's mu and nu in float32, evenly sharded."""
  return params * 4 * 4 / devices


def plan(variant: str, overrides: dict[str, int], image_sizes: Sequence[int],
         devices: Sequence[int], meshes: Sequence[str], remats: Sequence[str | None],
         batches: tuple[int, int], max_checked: int = MAX_CHECKED) -> list[dict[str, Any]]:
  """One row per (image size, devices, mesh, remat): measured memory, the fit, the largest
  batch per chip. Each device count runs in its own processes.

  Peak memory is the largest, over the program's points, of sums of live buffers, each affine in
  the batch: a convex function of the batch. At small batches a phase that does not grow with it
  (the optimizer's update of whole gradients, under data parallelism) can hold the peak, so the
  line through `batches` may be too flat. So each mesh is compiled once more, at the largest
  batch that line lets the largest chip hold (at most `max_checked`); the plan uses the chord
  from the smallest batch to that one, which by convexity never underestimates the memory of a
  batch in between (the line's error there is reported as `linearity`).
  """
  rows = []
  for n in devices:
    jobs = [dict(variant=variant, overrides=overrides, image_size=size, mesh=MESHES[kind](n),
                 batch=b, remat=remat, kind=kind)
            for size in image_sizes for kind in meshes for remat in remats for b in batches]
    results = run_jobs(jobs, n)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
      groups.setdefault((r["image_size"], r["kind"], r["remat"]), []).append(r)
    checks = []
    for key, group in groups.items():
      small, large = (next(r for r in group if r.get("batch") == b and "refused" not in r)
                      for b in batches)
      biggest = min(max_checked, max(max_batch(fit(small, large), hbm) for hbm in CHIPS.values()))
      if biggest > large["batch"]:
        size, kind, remat = key
        checks.append(dict(variant=variant, overrides=overrides, image_size=size,
                           mesh=MESHES[kind](n), batch=biggest, remat=remat, kind=kind))
    for r in run_jobs(checks, n) if checks else []:
      groups[(r["image_size"], r["kind"], r["remat"])].append(r)
    for (size, kind, remat), group in groups.items():
      refused = [r["refused"] for r in group if "refused" in r]
      measured = sorted((r for r in group if "refused" not in r), key=lambda r: r["batch"])
      small = measured[0]
      at = {r["batch"]: r for r in measured}
      line = fit(small, measured[-1]) if len(measured) > 2 else fit(small, at[batches[1]])
      row = {"variant": variant, "image_size": size, "devices": n, "kind": kind,
             "mesh": small["mesh"], "remat": remat or "none", "params": small["params"],
             "state": small["args"] - small["batch"] * _batch_bytes(size),
             "temp": at[batches[1]]["temp"], "batch": batches[1], **line,
             "collectives": at[batches[1]]["collectives"],
             "max_batch": {chip: max_batch(line, hbm) for chip, hbm in CHIPS.items()},
             "max_checked": measured[-1]["batch"] if len(measured) > 2 else None,
             "measured": {r["batch"]: total(r) for r in measured}}
      if refused:
        row["refused"] = refused[0]
      if len(measured) > 2:
        first = fit(small, at[batches[1]])
        predicted = first["fixed"] + first["per_image"] * measured[-1]["batch"]
        row["linearity"] = {"batch": measured[-1]["batch"],
                            "error": predicted / total(measured[-1]) - 1}
      rows.append(row)
  return rows


def _batch_bytes(image_size: int) -> int:
  """Argument bytes per image on one device: moments [side, side, 8] f32 and a label."""
  side = image_size // 8
  return side * side * 8 * 4 + 4


# --- the tables ----------------------------------------------------------------------------------

def format_tables(rows: list[dict[str, Any]]) -> str:
  """Markdown: memory per device by mesh, then the largest per-device batch per chip."""
  def mesh(r):
    return "(" + ", ".join(map(str, r["mesh"])) + ")" + (" *" if "refused" in r else "")

  def fits(r, chip):
    checked, value = r["max_checked"], r["max_batch"][chip]
    return f">{checked}" if checked and value > checked else str(value)

  out = ["| image | mesh (data, fsdp, tensor) | devices | remat | state GiB | temp GiB "
         f"(batch {rows[0]['batch']}) | GiB per image | all-gather GiB/step | "
         "all-reduce GiB/step | reduce-scatter GiB/step |", "|---" * 10 + "|"]
  for r in rows:
    c = r["collectives"]
    out.append(f"| {r['image_size']} px | {mesh(r)} | {r['devices']} | {r['remat']} | "
               f"{r['state'] / GIB:.2f} | {r['temp'] / GIB:.2f} | {r['per_image'] / GIB:.3f} | "
               + " | ".join(f"{c[op]['bytes'] / GIB:.2f} ({c[op]['count']})"
                            for op in ("all-gather", "all-reduce", "reduce-scatter")) + " |")
  out += ["", "Largest per-device batch that fits (nominal HBM):", "",
          "| image | mesh (data, fsdp, tensor) | devices | remat | " +
          " | ".join(f"{chip} ({hbm} GiB)" for chip, hbm in CHIPS.items()) +
          " | checked at batch (2-point line's error) |", "|---" * (5 + len(CHIPS)) + "|"]
  for r in rows:
    check = (f"{r['linearity']['batch']} ({r['linearity']['error']:+.1%})"
             if "linearity" in r else "-")
    out.append(f"| {r['image_size']} px | {mesh(r)} | {r['devices']} | {r['remat']} | " +
               " | ".join(fits(r, chip) for chip in CHIPS) + f" | {check} |")
  notes = sorted({r["refused"] for r in rows if "refused" in r})
  if notes:
    out += [""] + [f"\\* refused, measured the suggested mesh instead: {n}" for n in notes]
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--variant", default="XL/2")
  parser.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
  parser.add_argument("--meshes", nargs="+", default=["dp", "fsdp"], choices=list(MESHES))
  parser.add_argument("--remats", nargs="+", default=["none", "nothing_saveable"],
                      help="none or jax.checkpoint_policies names")
  parser.add_argument("--batches", type=int, nargs=2, default=[1, 4],
                      help="two per-device batches for the linear fit "
                           "(the second: the temp column)")
  parser.add_argument("--max-checked", type=int, default=MAX_CHECKED,
                      help="the largest per-device batch compiled to check a fit")
  parser.add_argument("--json", default="", help="also write the rows here (JSON)")
  args = parser.parse_args()
  if args.worker:
    worker()
    return
  remats = [None if r == "none" else r for r in args.remats]
  rows = plan(args.variant, {}, args.image_sizes, args.devices, args.meshes, remats,
              tuple(args.batches), args.max_checked)
  print(f"DiT-{args.variant}, bf16 compute, float32 params, scanned blocks, AdamW + EMA; "
        "per device, AOT-compiled on fake CPU devices")
  print(format_tables(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
