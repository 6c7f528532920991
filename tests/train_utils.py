"""Helpers for the training tests: run train.py in subprocesses and read their checkpoints."""
import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
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


def save_tiny_checkpoint(directory: os.PathLike) -> None:
  """A step-0 checkpoint of a tiny digits model (depth 1, width 32) in `directory`, as
  `python -m dit_jax.convert` writes one: for the tests of sample.py's inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  from dit_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from dit_jax.models import create_model, init_params  # pylint: disable=import-outside-toplevel
  model = create_model("S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  checkpoints.save_params(str(directory), init_params(model, jax.random.key(0)), model)


def train_command(workdir: os.PathLike, config: str = "configs/digits.py",
                  **overrides: Any) -> list[str]:
  values = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
  flags = [f"--config.{k}={v}" for k, v in values.items()]
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / config}",
          f"--workdir={workdir}", *flags]


# The persistent XLA compilation cache that the subprocesses of one pytest session share (its
# folder: this variable, inherited by subprocesses that run these helpers themselves, and by
# pytest-xdist's workers: conftest.py creates it in the controlling process).
_CACHE_ENV = "DIT_TEST_COMPILATION_CACHE"


def compilation_cache() -> str:
  """The session's compilation cache folder, created (and removed at exit, by the process that
  created it) on first use."""
  if _CACHE_ENV not in os.environ:
    path = tempfile.mkdtemp(prefix="dit_jax_xla_cache_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[_CACHE_ENV] = path
  return os.environ[_CACHE_ENV]


def xla_flags_with_devices(num_devices: int) -> str:
  """XLA_FLAGS for a subprocess on `num_devices` CPU devices: the suite's own flags
  (conftest.TEST_XLA_FLAGS), any device count in them replaced."""
  kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
          if not flag.startswith("--xla_force_host_platform_device_count=")]
  return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *kept])


def env_with_devices(num_devices: int, compile_cache: bool = True) -> dict[str, str]:
  """The environment of a subprocess on `num_devices` CPU devices.

  compile_cache: share the session's persistent compilation cache: a program compiled before
  (the same computation, shapes, shardings, devices and XLA flags: JAX's cache key) is loaded
  instead of compiled again, and runs the same (a tiny digits run: 31 s without, 11 s with). The
  suite's many end-to-end runs depend on it for its time. A size limit makes JAX
  lock the folder for each read and write, so that processes running at once (two pytest
  workers, a multi-process run) never read an entry another one is still writing. False for a
  process whose writes are limited on purpose (ulimit -f, a full disk), where writing an entry
  could fail with a warning on stderr; the cache never decides a check.
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(num_devices))
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if compile_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny programs too
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 * 2**30)  # a limit: JAX locks the folder
  return env


def run_train(workdir: os.PathLike, num_devices: int = 1, timeout: int = 300,
              compile_cache: bool = True, **overrides: Any) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, **overrides), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout,
                        env=env_with_devices(num_devices, compile_cache=compile_cache))


# Several runs, one after the other, in one process (Python and JAX start once), each as train.py
# makes it: its flags parsed into the config (ml_collections), then the loop.
_RUNS_SCRIPT = """
import json, sys
from absl import flags, logging as absl_logging
from ml_collections import config_flags
# train.py's log lines, as absl's app.run sets them up: its handler, its flags parsed, INFO.
absl_logging.use_absl_handler()
flags.FLAGS(["train.py"])
flags.FLAGS.verbosity = 0
from dit_jax import logs
logs.setup()
from dit_jax.train.loop import train_and_evaluate
for argv in json.loads(sys.argv[1]):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=["train.py", *argv])
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(["train.py", *argv])
  train_and_evaluate(values.config, values.workdir)
"""


def run_trains_in_one_process(runs: list[tuple[os.PathLike, dict[str, Any]]],
                              num_devices: int = 1, timeout: int = 300,
                              compile_cache: bool = True) -> subprocess.CompletedProcess:
  """The training runs `(workdir, overrides of run_train)`, in order, in one subprocess: for the
  tests where what is compared is the runs' results, not train.py's start-up or exit."""
  argvs = [train_command(workdir, **overrides)[2:] for workdir, overrides in runs]
  return subprocess.run([sys.executable, "-c", _RUNS_SCRIPT, json.dumps(argvs)], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=env_with_devices(num_devices, compile_cache=compile_cache))


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
