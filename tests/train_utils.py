"""Helpers for the training tests: run train.py in subprocesses and read their checkpoints."""
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional

import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A very small digits run: one block, 16-image batches, no sampling or grading.
TINY_OVERRIDES = {
    "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "batch_size": 16,
    "num_steps": 3, "checkpoint.every_steps": 3, "log_every_steps": 1,
    "sample.every_steps": 0, "eval.digits": False, "data.num_threads": 1,
    "checkpoint.async_save": False,
}


def train_command(workdir: os.PathLike, config: str = "configs/digits.py",
                  **overrides: Any) -> list[str]:
  values = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
  flags = [f"--config.{k}={v}" for k, v in values.items()]
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / config}",
          f"--workdir={workdir}", *flags]


def env_with_devices(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def run_train(workdir: os.PathLike, num_devices: int = 1, timeout: int = 300,
              **overrides: Any) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, **overrides), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env_with_devices(num_devices))


def checkpoint_steps(workdir: os.PathLike) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_state(workdir: os.PathLike, step: Optional[int] = None) -> dict[str, Any]:
  """The saved TrainState of a step as nested dicts of numpy arrays (any saving mesh)."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(metadata)))


def _numpy_restore_args(metadata: Any) -> Any:
  if isinstance(metadata, dict):
    return {k: _numpy_restore_args(v) for k, v in metadata.items()}
  if isinstance(metadata, (list, tuple)):
    return type(metadata)(_numpy_restore_args(v) for v in metadata)
  return ocp.RestoreArgs(restore_type=np.ndarray)


def read_metrics(workdir: os.PathLike) -> list[dict[str, Any]]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f"{prefix}/{k}"))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(flat(v, f"{prefix}/{i}"))
    return out
  return {prefix: np.asarray(tree)}
