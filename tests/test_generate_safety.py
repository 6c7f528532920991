"""sample.py's safety: bad flags are one line before anything is loaded, an `--npz` parts folder
is held by one run at a time, and its parts are never mixed with those of other settings."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dit_jax import generate, npz_samples
from dit_jax.models import create_model, init_params
from dit_jax.train.workdir_lock import LOCK_NAME, WorkdirLock
from train_utils import ROOT, env_with_devices, save_tiny_checkpoint

SPEC = generate.SamplingSpec(sampler="ddim", num_steps=2, cfg_scale=2.0, guidance_channels=None,
                             clip_denoised=True, seed=3)
# sample.py, killed (os._exit, as kill -9 would) right after writing its DIE_AFTER_PARTS-th part.
DYING_SAMPLE_PY = """
import os, runpy, sys
from dit_jax import npz_samples
write, written = npz_samples._write_npz, []
def dying(path, *args, **kwargs):
  write(path, *args, **kwargs)
  written.append(path)
  if len(written) == int(os.environ["DIE_AFTER_PARTS"]):
    os._exit(9)
npz_samples._write_npz = dying
sys.argv[0] = "sample.py"
runpy.run_path("sample.py", run_name="__main__")
"""
FAST = ["--sampler=ddim", "--num_steps=2", "--cfg_scale=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A step-0 checkpoint of a tiny digits model, as `python -m dit_jax.convert` writes it."""
  directory = tmp_path_factory.mktemp("ckpt") / "tiny"
  save_tiny_checkpoint(directory)
  return directory


@pytest.fixture(scope="module")
def pixel_model():
  model = create_model("S/2", input_size=8, in_channels=3, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  return model, init_params(model, jax.random.key(0))


def sample_py(checkpoint, *flags, die_after_parts=None) -> subprocess.CompletedProcess:
  program = ["-c", DYING_SAMPLE_PY] if die_after_parts else [str(ROOT / "sample.py")]
  env = {**env_with_devices(1), "DIE_AFTER_PARTS": str(die_after_parts or 0)}
  return subprocess.run([sys.executable, *program, f"--checkpoint={checkpoint}", *map(str, flags)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line of stderr, `error: ...`, of a run that exited with status 1."""
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def snapshot(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, message", [
    (["--npz=s.npz", "--num_samples=0"],
     "--num_samples: must be positive (the samples --npz gets), got 0"),
    (["--npz=s.npz", "--num_samples=-5"],
     "--num_samples: must be positive (the samples --npz gets), got -5"),
    (["--npz=s.npz", "--num_samples=4", "--batch_size=0"], "--batch_size: must be positive, got 0"),
    (["--npz=s.npz", "--num_samples=4", "--batch_size=-3"],
     "--batch_size: must be positive, got -3"),
    (["--out=g.png", "--cfg_scale=nan"], "--cfg_scale: must be a finite number, got nan"),
    (["--out=g.png", "--cfg_scale=inf"], "--cfg_scale: must be a finite number, got inf"),
    (["--out=g.png", "--eta=nan"], "--eta: must be a finite number >= 0, got nan"),
    (["--out=g.png", "--eta=-0.5"], "--eta: must be a finite number >= 0, got -0.5"),
    (["--out=g.png", "--per_class=0"], "--per_class: must be positive, got 0"),
    (["--out=g.jpg"], "--out: {tmp}/g.jpg: the grid is written as PNG; give a name ending in .png"),
])
def test_bad_flags_are_one_line_before_the_checkpoint_is_read(tmp_path, flags, message):
  """Checked before the checkpoint is even opened: given none that exists, the flag is named."""
  flags = [f.replace("=", f"={tmp_path}/", 1) if f.startswith(("--npz", "--out")) else f
           for f in flags]
  result = sample_py(tmp_path / "no_checkpoint", *flags)
  assert error_line(result) == "error: " + message.format(tmp=tmp_path)
  assert not any(tmp_path.iterdir())


def test_classes_that_are_not_integers_say_so(tmp_path, checkpoint):
  result = sample_py(checkpoint, "--classes=a,b", f"--out={tmp_path / 'g.png'}")
  assert error_line(result) == ("error: --classes: a,b: class ids must be integers, separated by "
                                "commas")
  assert not any(tmp_path.iterdir())


def test_a_guidance_scale_below_one_is_legal():
  """CFG's math allows any finite scale (1: unguided, < 1: away from the class); only DDIM's
  eta must be >= 0. Nothing else is refused."""
  generate.check_flags(out="g.PNG", per_class=1, npz="s.npz", num_samples=1, batch_size=1,
                       cfg_scale=-2.0, eta=0.0)
  generate.check_flags(out=None, per_class=0, npz=None, num_samples=0, batch_size=0,
                       cfg_scale=0.5, eta=1.0)


def test_an_npz_held_by_a_live_run_is_refused_naming_it(tmp_path, checkpoint):
  """A second run on the same --npz stops in one line naming the holder, and writes nothing."""
  npz = tmp_path / "cc.npz"
  holder = WorkdirLock(str(tmp_path / "cc.npz.parts"))  # this process: a live run
  try:
    before = snapshot(tmp_path)
    result = sample_py(checkpoint, *FAST, f"--npz={npz}", "--num_samples=4", "--batch_size=2")
    line = error_line(result)
    assert line.startswith(f"error: --npz: {npz} is being written by another run (host "
                           f"{socket.gethostname()}, pid {os.getpid()}, started "), line
    assert line.endswith(f"which holds {npz}.parts; wait for it to end, or give another --npz. "
                         "Nothing was written."), line
    assert snapshot(tmp_path) == before and not npz.exists()
  finally:
    holder.release()


def test_npz_refusals_come_before_the_weights_load(tmp_path):
  """A checkpoint whose config reads but whose weights do not: a held --npz and a bad flag are
  refused as such (the weights were never read), and a run that gets as far as the weights
  leaves no parts folder behind."""
  save_tiny_checkpoint(tmp_path / "ckpt")
  shutil.rmtree(tmp_path / "ckpt" / "0" / "params")
  npz = tmp_path / "w.npz"
  holder = WorkdirLock(str(tmp_path / "w.npz.parts"))  # this process: a live run
  try:
    held = sample_py(tmp_path / "ckpt", *FAST, f"--npz={npz}", "--num_samples=4",
                     "--batch_size=2")
    assert "is being written by another run" in error_line(held)
  finally:
    holder.release()
  (tmp_path / "w.npz.parts" / LOCK_NAME).unlink()
  (tmp_path / "w.npz.parts").rmdir()
  bad_flag = sample_py(tmp_path / "ckpt", "--sampler=ode-heun", f"--npz={npz}",
                       "--num_samples=4", "--batch_size=2")
  assert "--sampler" in error_line(bad_flag) and "ode-heun" in error_line(bad_flag)
  unreadable = sample_py(tmp_path / "ckpt", *FAST, f"--npz={npz}", "--num_samples=4",
                         "--batch_size=2")
  assert unreadable.returncode == 1  # a warning naming the step, then the error
  assert unreadable.stderr.strip().splitlines()[-1].startswith("error: checkpoint: no step of ")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_two_generate_npz_on_one_path_in_one_process(tmp_path, pixel_model):
  model, params = pixel_model
  out = str(tmp_path / "x.npz")
  first = npz_samples.NpzParts(out, npz_samples.npz_settings(SPEC, 4, 2))
  try:
    with pytest.raises(ValueError, match=r"^--npz: .* is being written by another run \(host"):
      npz_samples.generate_npz(model, params, SPEC, 4, out, batch_size=2, progress=False)
  finally:
    first.release()
  assert sorted(os.listdir(tmp_path / "x.npz.parts")) == [LOCK_NAME, npz_samples.SETTINGS_NAME]
  npz_samples.generate_npz(model, params, SPEC, 4, out, batch_size=2, progress=False)
  assert os.listdir(tmp_path) == ["x.npz"]  # the parts, settings and lock all gone


def test_parts_of_other_settings_are_refused_in_process(tmp_path, pixel_model):
  model, params = pixel_model
  out = tmp_path / "x.npz"
  npz_samples.generate_npz(model, params, SPEC, 4, str(out), batch_size=2, keep_parts=True,
                        progress=False)
  out.unlink()  # as if it had been interrupted
  parts = snapshot(tmp_path)
  other = generate.SamplingSpec(**{**SPEC.__dict__, "seed": 7, "cfg_scale": 1.0})
  with pytest.raises(ValueError) as refused:
    npz_samples.generate_npz(model, params, other, 4, str(out), batch_size=2, progress=False)
  assert str(refused.value) == (
      f"--npz: {out}.parts holds 2 parts sampled with other settings (--cfg_scale 2.0 there, "
      "1.0 now; --seed 3 there, 7 now); resume with the flags it was started with, or delete "
      f"{out}.parts or give another --npz to start afresh. Nothing was written.")
  with pytest.raises(ValueError, match=r"--batch_size 2 there, 4 now; --num_samples 4 there, "
                                       r"8 now\)"):
    npz_samples.generate_npz(model, params, SPEC, 8, str(out), batch_size=4, progress=False)
  # Parts without a settings record (an older sample.py's) cannot be told apart: refused too.
  (tmp_path / "x.npz.parts" / npz_samples.SETTINGS_NAME).unlink()
  with pytest.raises(ValueError, match="holds 2 parts without a record of the settings"):
    npz_samples.generate_npz(model, params, SPEC, 4, str(out), batch_size=2, progress=False)
  del parts[pathlib.Path("x.npz.parts", npz_samples.SETTINGS_NAME)]
  assert snapshot(tmp_path) == parts and not out.exists()


def test_npz_settings_record_the_step_whose_weights_were_read(tmp_path):
  """The newest step's config reads but its weights do not: sampling falls back to the older
  step (README: a damaged checkpoint never blocks), and the parts' settings name that one."""
  save_tiny_checkpoint(tmp_path / "ckpt")
  save_tiny_checkpoint(tmp_path / "other")
  shutil.move(tmp_path / "other" / "0", tmp_path / "ckpt" / "1")
  shutil.rmtree(tmp_path / "ckpt" / "1" / "params")  # step 1: a config, no weights
  npz = tmp_path / "s.npz"
  killed = sample_py(tmp_path / "ckpt", *FAST, "--num_samples=4", "--batch_size=2",
                     f"--npz={npz}", die_after_parts=1)
  assert killed.returncode == 9, killed.stderr[-3000:]
  assert "checkpoint: step 1 of" in killed.stderr and "cannot be read" in killed.stderr
  settings = json.loads((tmp_path / "s.npz.parts" / npz_samples.SETTINGS_NAME).read_text())
  assert settings["step"] == 0


@pytest.mark.slow  # three runs of sample.py that sample
def test_resume_with_other_flags_is_refused_and_with_the_same_completes(tmp_path, checkpoint):
  """kill -9 after 2 of 4 parts; reruns with other sampling flags or another chunking are refused
  in one line naming the flags, the parts untouched; the same flags complete it (taking over the
  dead run's lock) with the samples of an uninterrupted run."""
  npz = tmp_path / "n4.npz"
  flags = [*FAST, "--seed=1", "--num_samples=8", "--batch_size=2"]
  killed = sample_py(checkpoint, *flags, f"--npz={npz}", die_after_parts=2)
  assert killed.returncode == 9, killed.stderr[-3000:]
  parts = snapshot(tmp_path)
  assert sorted(p.name for p in parts) == ["part_000000.npz", "part_000001.npz", LOCK_NAME,
                                           npz_samples.SETTINGS_NAME]
  settings = tmp_path / "n4.npz.parts" / npz_samples.SETTINGS_NAME
  assert json.loads(settings.read_text())["step"] == 0

  other = sample_py(checkpoint, "--sampler=ddpm", "--num_steps=2", "--cfg_scale=1", "--seed=7",
                    "--num_samples=8", "--batch_size=2", f"--npz={npz}")
  assert error_line(other) == (
      f"error: --npz: {npz}.parts holds 2 parts sampled with other settings (--sampler 'ddim' "
      "there, 'ddpm' now; --cfg_scale 2.0 there, 1.0 now; --seed 1 there, 7 now); resume with "
      f"the flags it was started with, or delete {npz}.parts or give another --npz to start "
      "afresh. Nothing was written.")
  chunks = sample_py(checkpoint, *FAST, "--seed=1", "--num_samples=4", "--batch_size=4",
                     f"--npz={npz}")
  assert "(--batch_size 2 there, 4 now; --num_samples 8 there, 4 now)" in error_line(chunks)
  assert snapshot(tmp_path) == parts

  resumed = sample_py(checkpoint, *flags, f"--npz={npz}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "taking over" in resumed.stderr  # the killed run's lock
  assert sorted(p.name for p in tmp_path.iterdir()) == ["n4.npz"]
  whole = sample_py(checkpoint, *flags, f"--npz={tmp_path / 'whole.npz'}")
  assert whole.returncode == 0, whole.stderr[-3000:]
  with np.load(npz) as a, np.load(tmp_path / "whole.npz") as b:
    assert a["arr_0"].shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
