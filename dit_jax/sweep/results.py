"""A sweep's results table, read from what the trainer wrote in each point's workdir.

Per point: the swept values; the model's depth, width and patch size, parameters and Gflops
(`dit_jax.models`: forward multiply-accumulates per image, the paper's convention); training
compute, Gflops x batch x steps x 3 (forward and backward: the paper's estimate); the final
loss, the mean `train/loss` of the metrics.jsonl rows logged in the last tenth of the steps (one
step's loss is noisy: it depends on the timesteps drawn); every metric of the run's final
evaluation row (`eval/digits_accuracy`, `eval/digits_frechet_distance`, `eval/fid` when the
trainer computes it, ...) under its name without `eval/`; and the seconds this sweep's runs of
the point took (empty for a point trained elsewhere, e.g. from `--print_commands`).

Written as WORKDIR/results.csv and WORKDIR/results.json, each whole or not at all (`dit_jax.fs`).
"""
import csv
import io
import json
from typing import Any, Optional, Sequence

from dit_jax import checkpoints, fs
from dit_jax.models import build_model, count_params, gflops
from dit_jax.sweep.plan import Plan, Point
from dit_jax.train import metrics_log

CSV_FILE = "results.csv"
JSON_FILE = "results.json"
TIMINGS_FILE = "timings.jsonl"  # one row per train.py run the sweep started
LOSS_TAIL = 0.1  # the final loss averages the rows logged in this last fraction of the steps
# Quality metrics the table and plots know, each with whether lower is better.
QUALITY = {"fid": True, "digits_frechet_distance": True, "digits_accuracy": False}
LABELS = {"fid": "FID", "digits_frechet_distance": "Fréchet distance (digits classifier)",
          "digits_accuracy": "accuracy (digits classifier)", "final_loss": "final training loss"}


def final_step(point: Point) -> Optional[int]:
  """The newest checkpoint step whose save finished, or None."""
  steps = checkpoints.finished_steps(fs.join(point.workdir, "checkpoints"))
  return steps[-1] if steps else None


def is_finished(point: Point, rows: Optional[list[dict[str, Any]]] = None) -> bool:
  """Whether the trainer reached `num_steps` (a finished checkpoint of that step or later) and,
  when the run grades digits, wrote its grade (the eval row of that step): a run killed between
  its last checkpoint and its grade is resumed, and the trainer grades it without training."""
  step = final_step(point)
  if step is None or step < point.config.num_steps:
    return False
  if not point.config.eval.digits:
    return True
  rows = metrics_log.read_rows(point.workdir) if rows is None else rows
  return any(r["step"] == step and "eval/digits_accuracy" in r for r in rows)


def read_timings(workdir: str) -> list[dict[str, Any]]:
  path = fs.join(workdir, TIMINGS_FILE)
  if not fs.exists(path):
    return []
  rows = []
  for line in fs.read_text(path).splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut short by a killed sweep
  return rows


def _model_columns(config: Any, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
  model = build_model(config.model)
  key = json.dumps(model.arch_config(), sort_keys=True)
  if key not in cache:
    tokens = (model.input_size // model.patch_size) ** 2
    cache[key] = {"depth": model.depth, "hidden_size": model.hidden_size,
                  "patch_size": model.patch_size, "tokens": tokens,
                  "params": count_params(model), "gflops": gflops(model)}
  return dict(cache[key])


def point_row(point: Point, timings: Sequence[dict[str, Any]],
              cache: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
  """The point's row of the table (see the module docstring)."""
  config = point.config
  rows = metrics_log.read_rows(point.workdir)
  runs = [t for t in timings if t.get("name") == point.name]
  step = final_step(point)
  if is_finished(point, rows):
    status = "finished"
  elif runs and runs[-1].get("returncode") not in (0, None):
    status = "failed"
  else:
    status = "not started" if step is None else "incomplete"
  row = {"name": point.name, **point.overrides, "status": status}
  try:
    row.update(_model_columns(config, {} if cache is None else cache))
  except (ValueError, TypeError) as e:  # a point the trainer refused: the table still has it
    row.update(dict.fromkeys(("depth", "hidden_size", "patch_size", "tokens", "params",
                              "gflops")))
    row["status"] = "failed" if status != "finished" else status
    row["error"] = f"config.model: {e}"
  row.update(batch_size=config.batch_size, num_steps=config.num_steps, step=step)
  row["train_gflops"] = (row["gflops"] * config.batch_size * config.num_steps * 3
                         if row["gflops"] is not None else None)
  losses = [r["train/loss"] for r in rows if "train/loss" in r
            and r["step"] > config.num_steps * (1 - LOSS_TAIL) and r["step"] <= (step or 0)]
  row["final_loss"] = sum(losses) / len(losses) if losses else None
  evals = [r for r in rows if r["step"] == step and any(k.startswith("eval/") for k in r)]
  for key, value in (evals[-1].items() if evals else ()):
    if key.startswith("eval/"):
      name = key[len("eval/"):]
      if name == "num_samples":
        row["eval_samples"] = int(value)  # metrics.jsonl holds floats
      else:
        row[name] = value
  row["train_seconds"] = round(sum(t["seconds"] for t in runs), 1) if runs else None
  row["workdir"] = point.workdir
  return row


def collect(plan: Plan) -> list[dict[str, Any]]:
  """Every point's row; a point whose files cannot be read gets a row saying why, so that one
  failed point never costs the others' table."""
  timings, cache, rows = read_timings(plan.workdir), {}, []
  for point in plan.points:
    try:
      rows.append(point_row(point, timings, cache))
    except (ValueError, TypeError, KeyError, OSError) as e:
      rows.append({"name": point.name, **point.overrides, "status": "unreadable",
                   "error": f"{type(e).__name__}: {e}", "workdir": point.workdir})
  return rows


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Every column of `rows`, in the order of first appearance (evaluation metrics come with
  the first finished point)."""
  return list(dict.fromkeys(k for row in rows for k in row))


def write(plan: Plan, rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
  """WORKDIR/results.csv and results.json; returns their paths."""
  names = columns(rows)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(row.get(k)) for k in names})
  csv_path, json_path = fs.join(plan.workdir, CSV_FILE), fs.join(plan.workdir, JSON_FILE)
  fs.write_text(csv_path, buffer.getvalue())
  swept = list(dict.fromkeys(k for p in plan.points for k in p.overrides))
  fs.write_text(json_path, json.dumps({"config": plan.config_spec, "swept": swept,
                                       "points": list(rows)}, indent=1) + "\n")
  return csv_path, json_path


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  return repr(tuple(value)) if isinstance(value, (list, tuple)) else value


def markdown_table(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> str:
  """The table as README shows it: swept values, size, cost, loss, quality, time."""
  quality = [m for m in QUALITY if any(m in r for r in rows)]
  head = ([*swept, "params", "Gflops", "train compute (Gflops)", "final loss"]
          + [LABELS[m].split(" (")[0] for m in quality] + ["time"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [str(row.get(k)) for k in swept]
    compute = row.get("train_gflops")
    cells += [_fmt(row.get("params"), "{:,}"), _fmt(row.get("gflops"), "{:.3g}"),
              _fmt(compute, "{:,.0f}" if compute is not None and compute >= 100 else "{:.3g}"),
              _fmt(row.get("final_loss"), "{:.4f}")]
    cells += [_fmt(row.get(m), "{:.1%}" if m == "digits_accuracy" else "{:.2f}") for m in quality]
    cells.append(_duration(row.get("train_seconds")))
    if cells and row.get("error"):
      cells[0] += f" ({row['status']})"  # why its other cells are empty
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fmt(value: Optional[float], form: str) -> str:
  return "-" if value is None else form.format(value)


def _duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "-"
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"
