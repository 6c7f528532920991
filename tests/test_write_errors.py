"""A write the machine refuses (a full disk, a file-size limit) stops the run at the failing save
with one line naming the path, and loses nothing already written.

Two real kernel refusals, no patched writer: RLIMIT_FSIZE (every system: a file may not grow
past the limit, so the first checkpoint's data file fails with EFBIG) and a small tmpfs (a full
disk, ENOSPC, after some checkpoints fit; needs `unshare -Urm`, else skipped).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dit_jax import cli
from dit_jax.train.metrics_log import MetricsLog
from train_utils import (ROOT, checkpoint_steps, compilation_cache, env_with_devices,
                         read_metrics, restore_state, train_command)

FILE_SIZE_BLOCKS = 20  # bash's `ulimit -f` unit, 1024 bytes: metrics.jsonl and the config fit,
# a checkpoint does not


def run_with_file_size_limit(workdir: pathlib.Path, **overrides) -> subprocess.CompletedProcess:
  # The limit is set by a shell that then execs train.py (no preexec_fn: forking this
  # multithreaded JAX process to run Python in the child can deadlock). SIGXFSZ ignored: the
  # write fails with EFBIG instead of killing the process.
  limited = ["bash", "-c", f"ulimit -f {FILE_SIZE_BLOCKS} && trap '' XFSZ && exec \"$@\"", "_",
             *train_command(workdir, **overrides)]
  env = env_with_devices(1)
  # The session's compilation cache, read but never written (JAX writes only the entries that
  # took longer than this to compile): an entry past the limit would fail to be written, with a
  # warning on stderr.
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1e9"
  return subprocess.run(limited, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, (
      result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if not line.startswith(("I", "W"))]
  assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
  return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_refused_checkpoint_write_stops_the_run_at_that_save(tmp_path, async_save):
  workdir = tmp_path / "run"
  result = run_with_file_size_limit(workdir, num_steps=8, checkpoint__every_steps=2,
                                    checkpoint__async_save=async_save)
  line = assert_one_error_line(result)
  assert line.startswith(f"error: checkpoint: could not write step 2 to {workdir}/checkpoints/2 "
                         "(File too large (errno 27): "), line
  assert line.endswith("; stopping; no checkpoint was written before it"), line
  steps = [row["step"] for row in read_metrics(workdir)]
  if async_save:  # the save runs in the background: the run stops before the next one starts
    assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) <= 4, steps
  else:  # no step after the failing save
    assert steps == [1, 2]
  assert checkpoint_steps(workdir) == []


def unshare_works() -> bool:
  if shutil.which("unshare") is None or shutil.which("mount") is None:
    return False
  probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30)
  return probe.returncode == 0


# Runs inside `unshare -Urm` (a private mount namespace, as root of a user namespace): mounts a
# small tmpfs, trains until it is full, grows it, resumes; prints what the test checks as JSON.
FULL_DISK_SCENARIO = """
import json, subprocess, sys
sys.path.insert(0, {tests!r})
from train_utils import ROOT, checkpoint_steps, env_with_devices, read_metrics, train_command
from train_utils import restore_state
disk, workdir = {disk!r}, {disk!r} + "/run"
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", disk], check=True)
def train():
  return subprocess.run(train_command(workdir, num_steps=12, checkpoint__every_steps=2,
                                      checkpoint__keep=1, checkpoint__async_save=True),
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=env_with_devices(1))
full = train()
kept = checkpoint_steps(workdir)
kept_state_step = int(restore_state(workdir, max(kept))["step"]) if kept else None
subprocess.run(["mount", "-o", "remount,size=4m", disk], check=True)
resumed = train()
print(json.dumps({{
    "full": [full.returncode, full.stderr], "kept": kept, "kept_state_step": kept_state_step,
    "resumed": [resumed.returncode, resumed.stderr], "final": checkpoint_steps(workdir),
    "metrics": [row["step"] for row in read_metrics(workdir)]}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs `unshare -Urm` to mount a small tmpfs")
def test_a_full_disk_stops_the_run_keeps_the_last_checkpoint_and_resumes(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  script = FULL_DISK_SCENARIO.format(tests=str(ROOT / "tests"), disk=str(disk))
  # The runs share the session's compilation cache (named in the environment they inherit):
  # outside the small disk, so the resumed run loads the step the first one compiled.
  compilation_cache()
  done = subprocess.run(["unshare", "-Urm", sys.executable, "-c", script], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  full = subprocess.CompletedProcess([], report["full"][0], "", report["full"][1])
  line = assert_one_error_line(full)
  assert "No space left on device (errno 28)" in line, line
  assert line.startswith(f"error: checkpoint: could not write step ") or "metrics" in line, line
  # The previous checkpoint survives the failed save (keep=1 would have rotated it out).
  assert report["kept"] and report["kept_state_step"] == report["kept"][-1]
  if line.startswith("error: checkpoint:"):
    assert line.endswith(f"; stopping; the last checkpoint is step {report['kept'][-1]}"), line
  # With room again, the run resumes from it and ends; each step is logged once.
  assert report["resumed"][0] == 0, report["resumed"][1][-3000:]
  assert report["final"] == [12]
  assert report["metrics"] == list(range(1, 13))


def test_metrics_log_names_its_file_when_a_write_is_refused(tmp_path):
  log = MetricsLog(str(tmp_path), resume_step=0)
  os.symlink("/dev/full", tmp_path / "metrics.jsonl")  # every write: ENOSPC
  with pytest.raises(cli.WriteError) as error, cli.write_errors():
    log.append(1, {"train/loss": 0.5})
  assert str(error.value) == (f"could not write {tmp_path / 'metrics.jsonl'}: No space left on "
                              "device (errno 28); stopping")


def test_write_errors_leaves_other_errors_alone(tmp_path):
  with pytest.raises(FileNotFoundError), cli.write_errors():
    open(tmp_path / "missing" / "file")
