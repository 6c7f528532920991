"""Resuming with a changed config: what may change, what must be accepted, and the record of it.

A resumed run compares its config with the one saved in the checkpoint it resumes from:
  - another architecture or diffusion process is refused (the weights mean something else);
  - switching gradient clipping on or off is refused (the optimizer state changes shape);
  - a change that alters how training goes on (batch size, optimizer, seed, data, EMA, loss,
    dtypes, ...) is refused unless `config.resume_changes` names it (a key, or a section such
    as `optimizer`); accepted ones are logged;
  - how long and how the run reports, checkpoints, samples, evaluates, and how it is laid out on
    devices (the FREE keys) may change freely.
`WORKDIR/config_history.jsonl` keeps every config a run of the workdir started with, and from
which step, so the record of how each step range was trained survives checkpoint rotation.
"""
import datetime
import json
import logging
from typing import Any, Optional

import jax

from dit_jax import checkpoints, fs
from dit_jax.diffusion import Process, process_from_config

# Keys (or sections) that do not change what is trained: changed without asking.
FREE = ("num_steps", "log_every_steps", "tensorboard", "checkpoint", "sample", "eval",
        "data.num_threads", "data.prefetch", "mesh", "axis_rules", "model.scan_blocks",
        "model.scan_unroll", "model.remat_policy", "model.attention_impl", "init_from",
        "resume_changes", "latents_cache_dir", "profile_steps")
HISTORY = "config_history.jsonl"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"optimizer": {"b1": 0.9}} -> {"optimizer.b1": 0.9}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _covered(key: str, patterns: Any) -> bool:
  return any(key == p or key.startswith(p + ".") for p in patterns)


def run_config(config: Any) -> dict[str, Any]:
  """The config as the checkpoints save it (`run`): JSON types."""
  return json.loads(config.to_json_best_effort())


def check_process(saved: dict[str, Any], step: int, process: Process, where: str) -> None:
  """Refuses checkpoints (the `config` item `saved` of step `step` of `where`) trained for
  another process than `process`: said before any architecture difference, which the process
  may explain (a flow model learns no sigma)."""
  trained = checkpoints.process_of(saved)
  if trained != process:
    raise ValueError(f"config.process: {where} step {step} was trained for "
                     f"{trained.describe()}; the config asks for {process.describe()} "
                     "(config.process and its settings); use another --workdir. Nothing was "
                     "written.")


def check_resume(saved: dict[str, Any], step: int, config: Any, where: str
                 ) -> dict[str, tuple[Any, Any]]:
  """Refuses a resume whose config changes what must not change; returns every change.

  saved: the `config` item of the checkpoint resumed from (step `step` of `where`).
  """
  check_process(saved, step, process_from_config(config), where)
  old, new = flatten(saved.get("run", {})), flatten(run_config(config))
  # Keys only one side has (a config from an older version) are not compared.
  changes = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
  if "optimizer.grad_clip_norm" in changes and len({
      bool(v and v > 0) for v in changes["optimizer.grad_clip_norm"]}) == 2:
    raise ValueError(f"config.optimizer.grad_clip_norm: {where} step {step} was trained "
                     f"{'with' if old['optimizer.grad_clip_norm'] else 'without'} clipping; "
                     "switching it on or off changes the optimizer state, which the checkpoints "
                     "cannot be restored into: use another --workdir. Nothing was written.")
  accepted = [p.strip() for p in str(config.resume_changes).split(",") if p.strip()]
  refused = [k for k in changes if not _covered(k, FREE) and not _covered(k, accepted)]
  if refused:
    listed = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
    raise ValueError(f"config: {where} step {step} was trained with other settings ({listed}); "
                     "changing them changes how training goes on. Pass "
                     f"--config.resume_changes={','.join(refused)} to accept (each accepted "
                     f"change is kept in {HISTORY}), or use another --workdir. Nothing was "
                     "written.")
  for key, (before, after) in changes.items():
    if not _covered(key, FREE):
      logging.warning("config: resuming from step %d with %s changed from %r to %r "
                      "(config.resume_changes)", step, key, before, after)
  return changes


def record(workdir: str, step: int, config: Any, saved: Optional[dict[str, Any]] = None) -> None:
  """Appends the run's config to the history, if it differs from the last one recorded.

  saved: the config item of the checkpoint resumed from; for a workdir from before the history,
  its `run` is recorded first, so that the config the earlier steps were trained with is kept.
  """
  if jax.process_index() != 0:
    return
  path = fs.join(workdir, HISTORY)
  rows = []
  if fs.exists(path):
    rows = [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]
  new = run_config(config)
  lines = []
  if not rows and saved is not None and "run" in saved:
    rows = [{"from_step": None, "config": saved["run"],
             "note": f"saved with the checkpoint of step {step}; the workdir predates the history"}]
    lines.append(rows[0])
  last = rows[-1]["config"] if rows else None
  if new != last:
    before = flatten(last or {})
    changes = {k: [before[k], v] for k, v in flatten(new).items() if k in before and before[k] != v}
    lines.append({"from_step": step,
                  "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "changes": changes, "config": new})
  if lines:
    fs.append_text(path, "".join(json.dumps(row) + "\n" for row in lines))
