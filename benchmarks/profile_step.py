"""Where a train step's time goes, by XLA op: a `jax.profiler` trace, read back and grouped.

  python -m benchmarks.profile_step --variant S/2 --batch 8 --dtype float32 \\
      --blocks scanned unrolled --out profiles

For each block layout it compiles the trainer's step (`train_throughput.build_step`: hybrid
loss, AdamW, EMA), runs it `--warmup` times, traces `--steps` more with `jax.profiler`
(TensorBoard's profile plugin reads `OUT/<blocks>/plugins/profile/*/*.xplane.pb`; the
perfetto trace next to it needs no plugin), writes the compiled HLO to `OUT/<blocks>.hlo.txt`
and prints, per step:
  - the time of the device's ops by kind (matmul, attention, copy/transpose, broadcast, reduce,
    elementwise fusion, ...) and pass (forward, backward, optimizer: from each op's jax
    `op_name`: `transpose(jvp(...))` is the backward, `jvp(...)` the forward);
  - the most expensive single ops with their shapes.
Op times are summed over the threads that run them, so on a CPU with 2 threads their total can
exceed the wall time. Needs only jax/flax/optax/numpy (reading the trace: gzip + json).
"""
import argparse
import collections
import gzip
import json
import pathlib
import re
import time

import jax

from benchmarks.train_throughput import build_step, retain_host_memory

# An HLO instruction line: `%name = f32[8,256]{1,0} opcode(...)`, with its metadata.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """{instruction name: {shape, opcode, op_name, computation, fused}} of a compiled module.

  For a fusion, `fused` holds the opcodes inside it (e.g. "dot" for a matmul fusion)."""
  computations: dict[str, list[str]] = collections.defaultdict(list)
  out: dict[str, dict[str, str]] = {}
  current = ""
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    computations[current].append(opcode)
    op_name = _OP_NAME.search(rest)
    calls = _CALLS.search(rest)
    out[name] = {"shape": shape.split("{")[0], "opcode": opcode, "computation": current,
                 "op_name": op_name.group(1) if op_name else "",
                 "calls": calls.group(1) if calls else ""}
  for info in out.values():
    info["fused"] = " ".join(sorted(set(computations.get(info["calls"], []))))
  return out


def kind_of(info: dict[str, str]) -> str:
  """A coarse category of an HLO instruction: what kind of work its time is."""
  op_name, opcode, fused = info["op_name"], info["opcode"], info["fused"]
  # Attention's own ops: inside the `attn` module but not its qkv/proj Dense layers.
  attention = "dot_product_attention" in op_name or (
      "/attn/" in op_name and "/attn/qkv/" not in op_name and "/attn/proj/" not in op_name)
  if opcode == "dot" or " dot" in f" {fused}" or "custom-call" in opcode and "matmul" in fused:
    return "attention matmuls" if attention else "matmul"
  if attention:
    return "attention (softmax, scores)"
  if opcode in ("copy", "transpose") or fused and set(fused.split()) <= {
      "copy", "transpose", "bitcast", "parameter", "reshape"}:
    return "copy / transpose"
  if opcode == "broadcast" or "broadcast" in fused.split() and set(fused.split()) <= {
      "broadcast", "parameter", "constant", "bitcast"}:
    return "broadcast (fill)"
  if opcode in ("reduce", "reduce-window") or "reduce" in fused.split():
    return "reduction"
  if opcode in ("dynamic-update-slice", "dynamic-slice") or "dynamic" in fused:
    return "scan slicing (dynamic slice / update)"
  if opcode in ("while", "conditional", "call"):
    return "control flow"
  if "all-" in opcode or "reduce-scatter" in opcode or "collective" in opcode:
    return "collectives"
  return "elementwise"


def pass_of(info: dict[str, str]) -> str:
  op_name = info["op_name"]
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer / other"


def read_trace(trace_dir: pathlib.Path) -> list[dict]:
  """Complete ('X') events of the newest perfetto trace under `trace_dir`; each event's
  `device` says whether its process is a device's (a GPU's streams and XLA ops) or the host's."""
  files = sorted(trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
  if not files:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}")
  data = json.load(gzip.open(files[-1]))
  events = data["traceEvents"] if isinstance(data, dict) else data
  device_pids = {e.get("pid") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str(e.get("args", {}).get("name", ""))}
  return [{**e, "device": e.get("pid") in device_pids} for e in events if e.get("ph") == "X"]


def _hlo_names(event_name: str) -> tuple[str, ...]:
  """An event's possible HLO instruction names: the name itself (CPU), `%name = ...`, or a
  GPU kernel's name, where `fusion.3`'s kernel is `fusion_3`."""
  name = event_name.lstrip("%").split(" ")[0]
  head, _, tail = name.rpartition("_")
  return (name, f"{head}.{tail}") if tail.isdigit() else (name,)


# GPU kernels that are no HLO instruction of their own (library calls inside a command buffer):
# their kind from the kernel's name.
_LIBRARY_KERNELS = (("sdpa", "attention (cuDNN kernel)"), ("flash", "attention (cuDNN kernel)"),
                    ("nvjet", "matmul"), ("gemm", "matmul"), ("xmma", "matmul"),
                    ("cutlass", "matmul"), ("memcpy", "copy / transpose"),
                    ("memset", "broadcast (fill)"))


def summarize(events: list[dict], instructions: dict[str, dict[str, str]], steps: int,
              wall_s: float, top: int) -> str:
  """Markdown tables: time per step by (kind, pass), and the top ops."""
  by_kind: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  kernels: collections.Counter = collections.Counter()  # device events that are no HLO op
  for event in events:
    name = next((n for n in _hlo_names(event["name"]) if n in instructions), None)
    info = instructions.get(name) if name else None
    if info is None:
      if event.get("device"):
        kind = next((k for key, k in _LIBRARY_KERNELS if key in event["name"].lower()), None)
        if kind:
          by_kind[(kind, "library kernel")] += event["dur"] / 1e3 / steps
        kernels[event["name"][:90]] += event["dur"] / 1e3 / steps
      continue  # not an XLA op of the step
    if info["opcode"] in ("while", "call", "conditional"):
      continue  # a loop whose body's ops are counted
    by_kind[(kind_of(info), pass_of(info))] += event["dur"] / 1e3 / steps
    by_op[name] += event["dur"] / 1e3 / steps
    calls[name] += 1
  total = sum(by_kind.values()) or float("nan")
  lines = [f"wall time per step: {wall_s * 1e3:.0f} ms; op time per step (all threads): "
           f"{total:.0f} ms", "", "| kind | pass | ms / step | share |", "|---|---|---|---|"]
  for (kind, pas), ms in by_kind.most_common():
    lines.append(f"| {kind} | {pas} | {ms:.1f} | {ms / total:.1%} |")
  lines += ["", f"| top {top} ops | kind | pass | shape | calls / step | ms / step |",
            "|---|---|---|---|---|---|"]
  for name, ms in by_op.most_common(top):
    info = instructions[name]
    lines.append(f"| {name} | {kind_of(info)} | {pass_of(info)} | {info['shape']} | "
                 f"{calls[name] / steps:g} | {ms:.1f} |")
  if kernels:  # on a GPU: library kernels, by name
    lines += ["", f"| top {top} device kernels that are not HLO ops | ms / step |",
              "|---|---|"]
    lines += [f"| `{name}` | {ms:.1f} |" for name, ms in kernels.most_common(top)]
  return "\n".join(lines)


def profile(variant: str, batch: int, dtype: str, scan_blocks: bool, warmup: int, steps: int,
            out: pathlib.Path, top: int, remat: str | None = None, input_size: int = 32,
            attention: str | None = None) -> str:
  blocks = "scanned" if scan_blocks else "unrolled"
  _, step, state, batch_arrays = build_step(variant, batch, dtype, remat, attention,
                                            scan_blocks, input_size)
  rng = jax.random.key(1)
  compiled = step.lower(state, batch_arrays, rng, None).compile()
  out.mkdir(parents=True, exist_ok=True)
  hlo = compiled.as_text()
  (out / f"{blocks}.hlo.txt").write_text(hlo)
  for _ in range(warmup):
    state, metrics = compiled(state, batch_arrays, rng, None)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  with jax.profiler.trace(str(out / blocks), create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, batch_arrays, rng, None)
    jax.block_until_ready(metrics)
  wall = (time.perf_counter() - start) / steps
  table = summarize(read_trace(out / blocks), hlo_instructions(hlo), steps, wall, top)
  return f"## DiT-{variant}, {blocks} blocks, batch {batch}, {dtype}\n\n{table}\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="S/2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--blocks", nargs="+", default=["scanned", "unrolled"],
                      choices=["scanned", "unrolled"])
  parser.add_argument("--remat", default=None, help="jax.checkpoint_policies name")
  parser.add_argument("--attention", default=None, help="None | xla | cudnn (GPUs)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--out", default="profiles", help="traces and HLO go here")
  args = parser.parse_args()
  retained = retain_host_memory([args.variant], [args.batch], args.dtype)
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"freed host memory kept {retained}")
  for blocks in args.blocks:
    print(profile(args.variant, args.batch, args.dtype, blocks == "scanned", args.warmup,
                  args.steps, pathlib.Path(args.out), args.top, args.remat,
                  attention=args.attention), flush=True)


if __name__ == "__main__":
  main()
