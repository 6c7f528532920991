"""Training on a gs:// workdir, against the local Cloud Storage emulator (tests/gcs_emulator.py):
the workdir's files, its lock, checkpoints, resume, and sampling from it."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dit_jax import fs
from dit_jax.train.metrics_log import MetricsLog
from test_train_units import check_lease_lock
from train_utils import ROOT, env_with_devices, train_command


def test_files_on_cloud_storage(gcs_bucket):
  base = f"{gcs_bucket}/files"
  fs.write_text(f"{base}/a/b.txt", "one")
  with pytest.raises(FileExistsError, match="b.txt"):
    fs.write_text(f"{base}/a/b.txt", "two", overwrite=False)
  fs.append_text(f"{base}/a/b.txt", "+more")
  assert fs.read_text(f"{base}/a/b.txt") == "one+more"
  fs.rename(f"{base}/a", f"{base}/moved")
  assert fs.listdir(base) == ["moved"] and fs.read_text(f"{base}/moved/b.txt") == "one+more"
  assert fs.is_dir(f"{base}/moved") and not fs.exists(f"{base}/a/b.txt")
  fs.remove_tree(f"{base}/moved")
  assert not fs.exists(f"{base}/moved/b.txt")


def test_metrics_log_on_cloud_storage(gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  log = MetricsLog(workdir, resume_step=0)
  for step in (1, 2, 3):
    log.append(step, {"train/loss": float(step)})
  log.append(3, {"train/loss": 30.0})  # the same step again replaces its row
  resumed = MetricsLog(workdir, resume_step=2)  # a run resumed from step 2 drops step 3
  resumed.append(3, {"train/loss": 3.5})
  rows = [json.loads(line) for line in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
                  {"step": 3, "train/loss": 3.5}]


def test_lease_lock_on_cloud_storage(gcs_bucket, monkeypatch, caplog):
  check_lease_lock(f"{gcs_bucket}/run", monkeypatch, caplog)


def gs_train(workdir: str, **overrides) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, **overrides), cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env_with_devices(1))


@pytest.mark.slow
def test_train_resume_and_sample_on_a_gs_workdir(gcs_bucket, tmp_path):
  workdir = f"{gcs_bucket}/runs/digits"
  first = gs_train(workdir, num_steps=3, checkpoint__async_save=True)
  assert first.returncode == 0, first.stderr[-3000:]
  assert fs.listdir(f"{workdir}/checkpoints") == ["3"]
  # Resumes from step 3 to 6 and logs each step once.
  second = gs_train(workdir, num_steps=6)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"Resuming from {workdir}/checkpoints step 3" in second.stderr
  assert fs.listdir(f"{workdir}/checkpoints") == ["3", "6"]
  rows = [json.loads(line) for line in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [row["step"] for row in rows] == list(range(1, 7))
  history = [json.loads(line) for line in
             fs.read_text(f"{workdir}/config_history.jsonl").splitlines()]
  assert [(row["from_step"], row["changes"]) for row in history] == [
      (0, {}), (3, {"num_steps": [3, 6], "checkpoint.async_save": [True, False]})]
  assert fs.read_text(f"{workdir}/run.lock") == ""  # released at the end
  # Each run's TensorBoard events (tests/test_tensorboard.py reads them), uploaded at its end.
  assert len([n for n in fs.listdir(workdir) if n.startswith("events.out.tfevents.")]) == 2

  # sample.py reads the gs:// checkpoint; the same grid as from a local copy of it.
  grids = []
  for checkpoint, name in ((workdir, "gs.png"), (None, "local.png")):
    if checkpoint is None:
      checkpoint = str(tmp_path / "copy")
      for step in ("6",):
        _copy_tree(f"{workdir}/checkpoints/{step}", f"{checkpoint}/checkpoints/{step}")
    out = tmp_path / name
    sampled = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={checkpoint}", f"--out={out}",
         "--sampler=ddim", "--num_steps=2", "--classes=0,1", "--per_class=2"], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env=env_with_devices(1))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    grids.append(out.read_bytes())
  assert grids[0] == grids[1]

  # A live run's lease refuses a second run, naming the holder; nothing is written.
  holder = {"host": "tpu-host-7", "pid": 4242, "started": "2026-11-27T05:00:00+00:00",
            "token": "x", "renewed": __import__("time").time()}
  fs.write_text(f"{workdir}/run.lock", json.dumps(holder))
  refused = gs_train(workdir, num_steps=9)
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir: {workdir} is in use by another run (host tpu-host-7, pid 4242, "
      "started 2026-11-27T05:00:00+00:00, renewed ")
  assert fs.listdir(f"{workdir}/checkpoints") == ["3", "6"]
  assert json.loads(fs.read_text(f"{workdir}/run.lock")) == holder


def _copy_tree(source: str, target: str) -> None:
  for child in fs.path(source).iterdir():
    if child.is_dir():
      _copy_tree(str(child), f"{target}/{child.name}")
    else:
      fs.copy_file(str(child), f"{target}/{child.name}")


def test_a_workdir_in_a_missing_bucket_is_one_line(gcs_bucket):
  from dit_jax.train.loop import check_workdir
  with pytest.raises(ValueError, match=r"^workdir: no bucket gs://no-such-bucket \(or no access "
                     r"to it\)$"):
    check_workdir("gs://no-such-bucket/runs/x")
  check_workdir(f"{gcs_bucket}/runs/x")  # a folder need not exist: only a prefix
