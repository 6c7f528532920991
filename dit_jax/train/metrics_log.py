"""metrics.jsonl: one JSON row per logged step and kind, each step once whatever was resumed.

A run killed after its last checkpoint (kill -9, preemption, a crash) has logged rows for steps
that its resumed run trains and logs again. On resume the rows after the checkpoint are dropped
(the file is rewritten whole, `fs.write_text`, so no row up to the checkpoint is ever lost, even
if this process dies while rewriting), and a row whose (step, kind) is already
there replaces it instead of repeating it (e.g. a finished run graded again).
"""
import json
import logging
from typing import Any

from dit_jax import fs

FILENAME = "metrics.jsonl"


def _kind(row: dict[str, Any]) -> str:
  """`train` or `eval`: the prefix of the row's metric names (`train/loss`, `eval/...`)."""
  return next((k.split("/", 1)[0] for k in row if "/" in k), "")


def _parse(text: str) -> tuple[list[dict[str, Any]], int]:
  """(rows, number of unreadable lines: a line cut short by a killed process)."""
  rows, partial = [], 0
  for line in text.splitlines(keepends=True):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      partial += 1
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
    else:
      partial += 1
  return rows, partial


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """The readable rows of `<workdir>/metrics.jsonl` in file order (none if it is missing), for
  readers of a run's results (`dit_jax.sweep`)."""
  path = fs.join(workdir, FILENAME)
  return _parse(fs.read_text(path))[0] if fs.exists(path) else []


class MetricsLog:
  """The rows of `<workdir>/metrics.jsonl`; only the chief process (`enabled`) writes them."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    """Drops the rows after `resume_step` (the step the run starts from) left by earlier runs."""
    self.path = fs.join(workdir, FILENAME)
    self.enabled = enabled
    self._keys: set[tuple[int, str]] = set()
    if not enabled or not fs.exists(self.path):
      return
    rows, partial = self._read()
    kept = [row for row in rows if row["step"] <= resume_step]
    if len(kept) < len(rows) or partial:
      self._rewrite(kept)
      start = (f"the checkpoint this run resumes from" if resume_step
               else "no checkpoint: this run starts from the beginning")
      logging.info("%s: dropped %d rows after step %d, %s (it logs them again)%s", self.path,
                   len(rows) - len(kept), resume_step, start,
                   f", and {partial} partly written" if partial else "")
    self._keys = {(row["step"], _kind(row)) for row in kept}

  def append(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes a row; one of the same step and kind already there is replaced."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    key = (row["step"], _kind(row))
    if key in self._keys:
      rows, _ = self._read()
      self._rewrite([r for r in rows if (r["step"], _kind(r)) != key] + [row])
      return
    fs.append_text(self.path, json.dumps(row) + "\n")
    self._keys.add(key)

  def _read(self) -> tuple[list[dict[str, Any]], int]:
    return _parse(fs.read_text(self.path))

  def _rewrite(self, rows: list[dict[str, Any]]) -> None:
    # Readers see the old file or the new one, never half of one.
    fs.write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
