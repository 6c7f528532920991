"""Runs a sweep: each unfinished point as a `train.py` process, then the table and the figure.

Every point is trained by its own `train.py` process (the command `--print_commands` prints),
`parallel` at a time: one JAX process cannot run two trainings side by side, and a process per
point leaves the trainer's guarantees as they are. A finished point (`results.is_finished`) is
skipped; any other is started again, and the trainer resumes it from its newest checkpoint.
A point's console output goes to WORKDIR/logs/<name>.log (appended, one header line per
start); each start's duration and exit status to WORKDIR/timings.jsonl.

SIGTERM (a preemption) is passed on to the running trainers, which checkpoint and exit; no
further point starts, the table is written, and rerunning the same command resumes. The sweep
holds WORKDIR/run.lock for its whole run (`dit_jax.train.workdir_lock`): a second sweep on the
same workdir is refused.
"""
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from dit_jax import cli, fs
from dit_jax.sweep import plots, results
from dit_jax.sweep.plan import PLAN_FILE, TRAIN_SCRIPT, Plan, Point
from dit_jax.train.workdir_lock import WorkdirLock

LOG_DIR = "logs"
ARCHIVE_DIR = "previous"  # where the files of an earlier, different plan are moved
_PLAN_OUTPUTS = (PLAN_FILE, results.CSV_FILE, results.JSON_FILE, plots.PLOT_FILE)


@dataclasses.dataclass(frozen=True)
class Outcome:
  name: str
  state: str  # "skipped" (finished earlier), "finished", "stopped" (SIGTERM), "failed"
  detail: str = ""  # for "failed": the trainer's last line and its log


class _Children:
  """The running trainers; `stop` (the SIGTERM handler) passes SIGTERM on and starts no more."""

  def __init__(self):
    self._lock = threading.Lock()
    self._running: set[subprocess.Popen] = set()
    self.stopped = False

  def start(self, command: list[str], log: Any) -> Optional[subprocess.Popen]:
    with self._lock:
      if self.stopped:
        return None
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
      self._running.add(proc)
      return proc

  def wait(self, proc: subprocess.Popen) -> int:
    code = proc.wait()
    with self._lock:
      self._running.discard(proc)
    return code

  def stop(self, signum: int, frame: Any) -> None:
    del frame
    logging.warning("Sweep: signal %d: stopping the running points (they checkpoint); no "
                    "further point starts", signum)
    with self._lock:
      self.stopped = True
      for proc in self._running:
        proc.send_signal(signal.SIGTERM)


def write_plan(plan: Plan) -> str:
  """WORKDIR/sweep.json. The files of a different earlier plan (its sweep.json, table and
  figure) move to WORKDIR/previous/<time>/ first: a sweep never drops another's results."""
  path = fs.join(plan.workdir, PLAN_FILE)
  new = plan.to_json()
  if fs.exists(path) and json.loads(fs.read_text(path)) != new:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    archive = fs.join(plan.workdir, ARCHIVE_DIR, stamp)
    fs.makedirs(archive)
    for name in _PLAN_OUTPUTS:
      if fs.exists(fs.join(plan.workdir, name)):
        fs.rename(fs.join(plan.workdir, name), fs.join(archive, name))
    logging.info("Sweep: %s held another plan; it and its results moved to %s", path, archive)
  fs.write_text(path, json.dumps(new, indent=1) + "\n")
  return path


def _last_line(path: str) -> str:
  with open(path, errors="replace") as f:
    lines = [line.strip() for line in f.read()[-20_000:].splitlines() if line.strip()]
  return lines[-1] if lines else "(no output)"


def _elapsed(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


class _Trainer:
  """Trains points one `train.py` process each, recording their timings."""

  def __init__(self, plan: Plan, children: _Children):
    self.plan, self.children = plan, children
    self._timings_lock = threading.Lock()

  def __call__(self, index: int, point: Point) -> Outcome:
    where = f"[{index + 1}/{len(self.plan.points)}] {point.name}"
    log_path = fs.join(self.plan.workdir, LOG_DIR, f"{point.name}.log")
    command = [sys.executable, str(TRAIN_SCRIPT), *point.args]
    start = time.time()
    with open(log_path, "a") as log:
      log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: "
                f"{shlex.join(command)}\n")
      log.flush()
      proc = self.children.start(command, log)
      if proc is None:
        return Outcome(point.name, "stopped")
      logging.info("%s: training (log: %s)", where, log_path)
      code = self.children.wait(proc)
    seconds = time.time() - start
    with self._timings_lock:
      fs.append_text(fs.join(self.plan.workdir, results.TIMINGS_FILE), json.dumps(
          {"name": point.name, "seconds": round(seconds, 2), "returncode": code}) + "\n")
    if code != 0:
      detail = f"exit {code}: {_last_line(log_path)} (log: {log_path})"
      logging.error("%s: failed after %s, %s", where, _elapsed(seconds), detail)
      return Outcome(point.name, "failed", detail)
    if not results.is_finished(point):
      logging.info("%s: stopped at step %s after %s; rerun to resume", where,
                   results.final_step(point), _elapsed(seconds))
      return Outcome(point.name, "stopped")
    logging.info("%s: finished in %s", where, _elapsed(seconds))
    return Outcome(point.name, "finished")


def run_points(plan: Plan, parallel: int) -> list[Outcome]:
  """Trains every unfinished point, `parallel` at a time, in the plan's order."""
  fs.makedirs(fs.join(plan.workdir, LOG_DIR))
  outcomes, todo = {}, []
  for index, point in enumerate(plan.points):
    if results.is_finished(point):
      logging.info("[%d/%d] %s: finished earlier; skipped", index + 1, len(plan.points),
                   point.name)
      outcomes[point.name] = Outcome(point.name, "skipped")
    else:
      todo.append((index, point))
  children = _Children()
  trainer = _Trainer(plan, children)
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, children.stop) if main_thread else None
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
      futures = [pool.submit(trainer, index, point) for index, point in todo]
      for future in futures:
        outcome = future.result()
        outcomes[outcome.name] = outcome
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)
  return [outcomes[p.name] for p in plan.points]


def run_sweep(plan: Plan, parallel: int) -> list[dict[str, Any]]:
  """Trains the plan's unfinished points and writes the table and the figure; returns the rows.

  Raises:
    cli.UserError: after writing the table, naming each point whose trainer failed.
  """
  if not fs.is_local(plan.workdir):
    raise cli.UserError(f"--workdir: {plan.workdir}: the runner trains on this machine and "
                        "writes its logs locally; for a Cloud Storage workdir use "
                        "--print_commands")
  if parallel < 1:
    raise cli.UserError(f"--parallel: must be at least 1, got {parallel}")
  with cli.user_errors(ValueError, OSError):
    lock = WorkdirLock(plan.workdir)  # refuses a second sweep here, naming the first
  try:
    logging.info("Sweep: %d points, plan in %s", len(plan.points), write_plan(plan))
    outcomes = run_points(plan, parallel)
    rows = results.collect(plan)
    csv_path, json_path = results.write(plan, rows)
    swept = list(dict.fromkeys(k for p in plan.points for k in p.overrides))
    png = plots.write(plan.workdir, rows, swept, title=plan.config_spec)
    logging.info("Sweep: results in %s, %s%s", csv_path, json_path, f", {png}" if png else "")
    print(results.markdown_table(rows, swept), flush=True)
  finally:
    lock.release()
  failed = [o for o in outcomes if o.state == "failed"]
  if failed:
    raise cli.UserError(f"{len(failed)} of {len(outcomes)} points failed: " + "; ".join(
        f"{o.name}: {o.detail}" for o in failed) + "; rerun the same command to retry them")
  if any(o.state == "stopped" for o in outcomes):
    logging.warning("Sweep: stopped; rerun the same command to resume")
  return rows
