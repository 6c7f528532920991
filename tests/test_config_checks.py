"""Training values used only late (checkpoints, grids, the final grade) and workdir outputs that
cannot be written are refused before the run writes anything, in one line naming the field or
file (`dit_jax/train/config_checks.py`, called by `loop.setup`)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from absl import flags
from ml_collections import config_flags

from dit_jax import cli
from dit_jax.diffusion import process_from_config
from dit_jax.models import build_model
from dit_jax.train import config_checks, loop
from train_utils import ROOT, env_with_devices, train_command


def digits_config(*overrides: str, spec: str = "configs/digits.py"):
  """The config train.py would run: the file, then `--config.KEY=VALUE` overrides as absl parses
  them (so '(0,99)' and 'abc' arrive as they would from the command line)."""
  values = flags.FlagValues()
  argv = ["train.py", f"--config={ROOT / spec}", *(f"--config.{o}" for o in overrides)]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def check(*overrides: str, spec: str = "configs/digits.py") -> None:
  config = digits_config(*overrides, spec=spec)
  config_checks.check_config(config, build_model(config.model), process_from_config(config))


def test_the_shipped_configs_pass():
  for spec in ("configs/digits.py", "configs/digits.py:flow", "configs/tiny.py",
               "configs/imagenet.py", "configs/folder.py", "configs/digits_scaling.py"):
    check(spec=spec)


@pytest.mark.parametrize("override, message", [
    # A: keep=0 would delete every checkpoint the run writes.
    ("checkpoint.keep=0", "config.checkpoint.keep: must be an integer >= 1"),
    ("checkpoint.keep=-3", "config.checkpoint.keep: must be an integer >= 1"),
    ("checkpoint.keep_period=-1", "config.checkpoint.keep_period: must be an integer >= 0"),
    # D: used only by the grids and the final grade.
    ("eval.num_samples=0", "config.eval.num_samples: must be a positive integer"),
    ("eval.batch_size=-1", "config.eval.batch_size: must be a positive integer"),
    ("sample.cfg_scale=nan", "config.sample.cfg_scale: must be a finite number"),
    ("sample.cfg_scale=inf", "config.sample.cfg_scale: must be a finite number"),
    ("sample.num_steps=0", "config.sample.num_steps: must be a positive integer"),
    ("sample.num_steps=-2", "config.sample.num_steps: must be a positive integer"),
    ("sample.num_steps=1001", "config.sample.num_steps: 1001 is more than the process's 1000"),
    ("sample.num_steps=999", "config.sample.num_steps: ddim cannot create exactly 999 steps"),
    ("sample.classes=(0,99)", "config.sample.classes: must be class ids in [0, 10)"),
    ("sample.classes=abc", "config.sample.classes: must be class ids in [0, 10)"),
    ("sample.classes=()", "config.sample.classes: must be class ids in [0, 10)"),
    ("sample.per_class=0", "config.sample.per_class: must be a positive integer"),
    ("sample.guidance_channels=3", "config.sample.guidance_channels: must be in [1, 1]"),
    ("sample.guidance_channels=0", "config.sample.guidance_channels: must be in [1, 1]"),
    # E: found only after files were written.
    ("diffusion.noise_schedule=bogus", "config.diffusion.noise_schedule: 'bogus' is not one of "
     "linear, squaredcos_cap_v2"),
    ("diffusion.diffusion_steps=0", "config.diffusion.diffusion_steps: must be a positive"),
    ("seed=-1", "config.seed: must be an integer in [0, "),
    # F: accepted, then NaNs or nonsense.
    ("optimizer.b1=2", "config.optimizer.b1: must be in [0, 1), got 2.0"),
    ("optimizer.b2=1", "config.optimizer.b2: must be in [0, 1)"),
    ("optimizer.eps=-1e-8", "config.optimizer.eps: must be a finite number > 0"),
    ("optimizer.warmup_steps=-5", "config.optimizer.warmup_steps: must be an integer >= 0"),
    ("optimizer.grad_clip_norm=-1", "config.optimizer.grad_clip_norm: must be a finite number"),
    ("optimizer.learning_rate=-1e-3", "config.optimizer.learning_rate: must be a finite"),
    ("optimizer.learning_rate=nan", "config.optimizer.learning_rate: must be a finite"),
    ("optimizer.weight_decay=-0.1", "config.optimizer.weight_decay: must be a finite"),
    ("ema_decay=2.0", "config.ema_decay: must be in [0, 1], got 2.0"),
    ("sample.every_steps=-1", "config.sample.every_steps: must be an integer >= 0"),
    ("resume_changes=optimiser", "config.resume_changes: no key 'optimiser'; did you mean "
     "'optimizer'?"),
    ("resume_changes=batch_size,optimizer.lr", "config.resume_changes: no key 'optimizer.lr'"),
])
def test_refused_naming_the_field(override, message):
  with pytest.raises(ValueError) as e:
    check(override)
  assert str(e.value).startswith(message), str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("sample.sampler=ddim", "config.sample.sampler: 'ddim' samples diffusion processes"),
    ("sample.options.rtol=-1", "config.sample.options.rtol: must be a positive number"),
    ("sample.sampler=sde-euler", None),
])
def test_flow_sampling_settings(override, message):
  if message is None:
    check(override, "sample.num_steps=2", spec="configs/digits.py:flow")
    with pytest.raises(ValueError, match="config.sample.num_steps: sde-euler"):
      check(override, "sample.num_steps=1", spec="configs/digits.py:flow")
    return
  with pytest.raises(ValueError, match=f"^{message}"):
    check(override, spec="configs/digits.py:flow")


def test_accepted_edge_values():
  """The documented off switches and bounds stay accepted."""
  check("checkpoint.keep=1", "checkpoint.keep_period=0", "sample.every_steps=0",
        "optimizer.grad_clip_norm=0", "optimizer.warmup_steps=0", "ema_decay=0", "ema_decay=1",
        "optimizer.b1=0", "resume_changes=batch_size, optimizer ,sample.cfg_scale")
  # Without grids, classes and guided channels are never used: a latent model's defaults.
  check("sample.every_steps=0", "eval.digits=False", "sample.classes=(88,974)",
        "sample.guidance_channels=3")
  check("sample.cfg_scale=1", "sample.guidance_channels=5")  # unguided: channels unused


def test_empty_workdir_is_refused():
  with pytest.raises(cli.UserError, match="^workdir: empty"):
    loop.train_and_evaluate(digits_config(), "")


@pytest.mark.parametrize("make, message", [
    (lambda w: (w / "checkpoints").write_text("x"), "checkpoints is a file"),
    (lambda w: (w / "samples").write_text("x"), "samples is a file"),
    (lambda w: (w / "metrics.jsonl").mkdir(), "metrics.jsonl is a directory"),
    (lambda w: (w / "config_history.jsonl").write_text('{"config": {}}\ngarbage\n'),
     "config_history.jsonl line 2 is not a config history row"),
    (lambda w: (w / "config_history.jsonl").write_bytes(b"\xff\xfe"),
     "config_history.jsonl is not text"),
])
def test_unwritable_outputs_are_refused(tmp_path, make, message):
  make(tmp_path)
  with pytest.raises(ValueError, match=message):
    config_checks.check_outputs(str(tmp_path))


def test_read_only_checkpoints_folder_is_refused(tmp_path, monkeypatch):
  (tmp_path / "checkpoints").mkdir(mode=0o555)
  if os.geteuid() == 0:  # root writes in read-only folders: os.access says yes
    real_access = os.access
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: real_access(
        path, mode) and not str(path).endswith("checkpoints"))
  try:
    with pytest.raises(ValueError, match="cannot write in .*checkpoints"):
      config_checks.check_outputs(str(tmp_path))
  finally:
    (tmp_path / "checkpoints").chmod(0o755)


def test_good_outputs_pass(tmp_path):
  config_checks.check_outputs(str(tmp_path / "new"))
  for name in ("checkpoints", "samples"):
    (tmp_path / name).mkdir()
  (tmp_path / "metrics.jsonl").write_text("not json is skipped by its reader\n")
  (tmp_path / "config_history.jsonl").write_text(json.dumps({"config": {}}) + "\n\n")
  config_checks.check_outputs(str(tmp_path))


def test_failed_async_save_leaves_no_thread_waiting(tmp_path):
  """A save whose folder cannot be created fails, and leaves no orbax thread behind: one that
  waited for the folder kept the process alive at exit for 20 minutes (orbax's timeout)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dit_jax.train.checkpointing import Checkpointer, CheckpointWriteError
  directory = tmp_path / "checkpoints"
  checkpointer = Checkpointer(str(directory), keep=2, keep_period=None, async_save=True)
  directory.rmdir()
  directory.write_text("not a folder")  # after the checks: as a lost mount would be
  with pytest.raises(CheckpointWriteError, match="could not write step 1"):
    checkpointer.save(1, {"a": jnp.ones(3)}, {"run": {}})
    checkpointer.wait()
  checkpointer.close()
  deadline = time.time() + 10
  while time.time() < deadline and _other_threads():
    time.sleep(0.1)
  assert not _other_threads()


def _other_threads() -> list[threading.Thread]:
  return [t for t in threading.enumerate()
          if t is not threading.current_thread() and not t.daemon and t.is_alive()]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
  return lines[-1]


def test_train_refuses_in_one_line_writing_nothing(tmp_path):
  """train.py: keep=0 (a run that would end with no checkpoint) and a `checkpoints` file (whose
  first async save hung at exit): one line, exit 1, nothing written."""
  workdir = tmp_path / "run"
  result = subprocess.run(train_command(workdir, checkpoint__keep=0), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env_with_devices(1))
  assert _one_error_line(result).startswith("error: config.checkpoint.keep: must be")
  assert not workdir.exists()
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  result = subprocess.run(train_command(workdir, checkpoint__async_save=True), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env_with_devices(1))
  assert _one_error_line(result).startswith(f"error: workdir: {workdir / 'checkpoints'} is a "
                                            "file")
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
