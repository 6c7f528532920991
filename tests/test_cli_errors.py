"""Every user error of the five programs is one line, `error: ...`, exit status 1, no traceback,
and nothing written: train.py, sample.py and python -m dit_jax.{evaluate,convert,latents.extract}.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dit_jax import cli
from train_utils import ROOT, env_with_devices, save_tiny_checkpoint, train_command


def run(args, num_devices: int = 1, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**env_with_devices(num_devices), **env})


def error_line(result: subprocess.CompletedProcess, alone: bool = True) -> str:
  """The one `error:` line, the last of stderr; `alone`: nothing else was printed."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
  if alone:
    assert len(lines) == 1, lines
  return lines[-1]


# --- config files and keys (absl programs; rejected before JAX is imported) ---------------------

@pytest.mark.parametrize("override, message", [
    ("--config.num_step=10", "config: no key 'num_step'; did you mean 'num_steps'?"),
    ("--config.sample.cfg=2", "config: no key 'sample.cfg'; did you mean 'sample.cfg_scale'?"),
    ("--config.cfg_scale=2", "config: no key 'cfg_scale'; did you mean 'sample.cfg_scale'?"),
])
def test_train_config_key_typo_names_the_closest_key(tmp_path, override, message):
  result = run(["train.py", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                override])
  assert error_line(result) == f"error: {message}"
  assert not (tmp_path / "run").exists()


def test_extract_config_key_typo_and_missing_config_file(tmp_path):
  base = ["-m", "dit_jax.latents.extract", f"--vae={tmp_path}", f"--out={tmp_path / 'out'}"]
  typo = run([*base, "--config=configs/tiny.py", "--config.data.imag_size=16"])
  assert error_line(typo) == ("error: config: no key 'data.imag_size'; did you mean "
                              "'data.image_size'?")
  missing = run([*base, "--config=configs/nope.py"])
  assert error_line(missing) == "error: --config: no such file 'configs/nope.py'"
  assert not (tmp_path / "out").exists()


def test_bad_config_argument_and_unknown_flag(tmp_path):
  bad_arg = run(["train.py", "--config=configs/folder.py:x,big", f"--workdir={tmp_path / 'a'}"])
  assert error_line(bad_arg) == ("error: --config=configs/folder.py:x,big: ValueError: invalid "
                                 "literal for int() with base 10: 'big'")
  unknown = run(["sample.py", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'x.png'}",
                 "--stpe=3"])
  assert error_line(unknown) == ("error: Unknown command line flag 'stpe'. Did you mean: "
                                 "stderrthreshold, step ?")
  assert not any(tmp_path.iterdir())


def test_verbose_shows_the_traceback(tmp_path):
  result = run(["train.py", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                "--config.num_step=10"], DIT_VERBOSE="1")
  assert result.returncode == 1
  assert "Traceback" in result.stderr
  assert result.stderr.strip().endswith(
      "UserError: config: no key 'num_step'; did you mean 'num_steps'?")
  assert not (tmp_path / "run").exists()


def test_config_key_suggestions():
  config = cli.load_config_file(str(ROOT / "configs/digits.py"))
  for key, hint in (("model.hiden_size", "model.hidden_size"),
                    ("sampel.cfg_scale", "sample.cfg_scale"),  # a misspelt section
                    ("optimizer.lr", None)):
    with pytest.raises(cli.UserError) as info:
      cli.check_config_key(config, key)
    assert str(info.value) == f"config: no key {key!r}" + (
        f"; did you mean {hint!r}?" if hint else "")
  cli.check_config_key(config, "data.data_dir")  # a None-valued, typed field exists
  cli.check_config_key(config, "mesh.axis_sizes")


# --- sample.py ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A step-0 checkpoint of a tiny digits model, as `python -m dit_jax.convert` writes it."""
  directory = tmp_path_factory.mktemp("ckpt") / "tiny"
  save_tiny_checkpoint(directory)
  return directory


@pytest.mark.slow
def test_sample_checkpoint_errors(tmp_path, checkpoint):
  out = tmp_path / "grid.png"
  missing = run(["sample.py", f"--checkpoint={tmp_path / 'nope'}", f"--out={out}"])
  assert error_line(missing, alone=False) == f"error: checkpoint: no directory {tmp_path / 'nope'}"
  (tmp_path / "empty").mkdir()
  empty = run(["sample.py", f"--checkpoint={tmp_path / 'empty'}", f"--out={out}"])
  assert error_line(empty, alone=False) == (f"error: checkpoint: {tmp_path / 'empty'} holds no "
                                            "checkpoint steps")
  no_step = run(["sample.py", f"--checkpoint={checkpoint}", "--step=5", f"--out={out}"])
  line = error_line(no_step, alone=False)  # names the steps there are
  assert line.startswith(f"error: checkpoint: {checkpoint} has no step 5") and "steps [0]" in line
  classes = run(["sample.py", f"--checkpoint={checkpoint}", "--classes=3,10", f"--out={out}"])
  assert error_line(classes, alone=False) == ("error: --classes: 3,10: class ids must lie in "
                                              "[0, 10)")
  steps = run(["sample.py", f"--checkpoint={checkpoint}", "--num_steps=1001", f"--out={out}"])
  assert error_line(steps, alone=False) == ("error: --num_steps: 1001 is not in [1, 1000], the "
                                            "steps of the model's process")
  negative = run(["sample.py", f"--checkpoint={checkpoint}", "--num_steps=0", f"--out={out}"])
  assert error_line(negative, alone=False) == ("error: --num_steps: 0 is not in [1, 1000], the "
                                               "steps of the model's process")
  # The flow samplers' settings, checked whatever the sampler (one line naming the flag).
  atol = run(["sample.py", f"--checkpoint={checkpoint}", "--atol=-1", f"--out={out}"])
  assert error_line(atol, alone=False) == "error: --atol: must be a positive number, got -1.0"
  form = run(["sample.py", f"--checkpoint={checkpoint}", "--diffusion_form=cosine", f"--out={out}"])
  assert error_line(form, alone=False).startswith("error: --diffusion_form: 'cosine' is not one of")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
  assert not any((tmp_path / "empty").iterdir())


def test_sample_existing_out_is_one_line_without_usage(tmp_path, checkpoint):
  out = tmp_path / "grid.png"
  out.write_bytes(b"mine")
  result = run(["sample.py", f"--checkpoint={checkpoint}", f"--out={out}"])
  assert error_line(result) == f"error: --out: {out} already exists; refusing to overwrite it"
  assert out.read_bytes() == b"mine"
  nothing = run(["sample.py", f"--checkpoint={checkpoint}"])
  assert error_line(nothing) == ("error: nothing to do: give --out (a grid) and/or --npz with "
                                 "--num_samples")


# --- train.py: workdir, data and batch size, all refused before anything is written -------------

def tiny_train(workdir, config="configs/digits.py", **overrides):
  return train_command(workdir, config=config, **overrides)[1:]


@pytest.mark.slow
def test_train_workdir_that_is_a_file(tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("notes")
  result = run(tiny_train(workdir))
  assert error_line(result, alone=False) == f"error: workdir: {workdir} is a file, not a directory"
  assert workdir.read_text() == "notes" and sorted(tmp_path.iterdir()) == [workdir]


@pytest.mark.slow
def test_train_workdir_on_a_read_only_file_system(tmp_path):
  mount = tmp_path / "ro"
  mount.mkdir()
  unshare = shutil.which("unshare")
  if not unshare or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode:
    pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a read-only tmpfs")
  command = " ".join(f"'{a}'" for a in [sys.executable, *tiny_train(mount / "run")])
  result = subprocess.run(
      [unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{mount}' && exec {command}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_with_devices(1))
  assert error_line(result, alone=False) == (f"error: workdir: cannot write in {mount} "
                                             "(read-only file system)")
  assert not any(mount.iterdir())


@pytest.mark.slow
def test_train_image_folder_where_nothing_decodes(tmp_path):
  folder = tmp_path / "images"
  for name in ("cat", "dog"):
    (folder / name).mkdir(parents=True)
    for i in range(3):
      (folder / name / f"{i}.png").write_bytes(b"not a png")
  result = run(tiny_train(tmp_path / "run", config=f"configs/folder.py:{folder},8,2"))
  assert error_line(result, alone=False) == (
      f"error: image folder '{folder}': none of its 6 image files could be decoded "
      f"(e.g. '{folder / 'cat' / '0.png'}')")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, axis_sizes, shards, axes", [
    (127, "(-1,1,1)", 8, "data=8 x fsdp=1"),
    (12, "(4,2,1)", 8, "data=4 x fsdp=2"),  # 12 splits over `data` alone, not over data x fsdp
])
def test_train_batch_size_that_the_devices_cannot_split(tmp_path, batch_size, axis_sizes, shards,
                                                        axes):
  result = run(tiny_train(tmp_path / "run", batch_size=batch_size, mesh__axis_sizes=axis_sizes),
               num_devices=8)
  assert error_line(result, alone=False) == (
      f"error: config.batch_size: {batch_size} does not split over the {shards} data-parallel "
      f"devices (mesh axes {axes}); use a multiple of {shards}")
  assert not (tmp_path / "run").exists()


# --- convert and evaluate: files that are not what they claim ---------------------------------

@pytest.mark.parametrize("content, what", [
    (b"", "not a PyTorch checkpoint (it is empty)"),
    (b"model weights, honest\n", "not a PyTorch checkpoint"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "not a PyTorch checkpoint"),
])
def test_convert_file_that_is_not_a_checkpoint(tmp_path, content, what):
  path = tmp_path / "weights.pt"
  path.write_bytes(content)
  result = run(["-m", "dit_jax.convert", "--torch", path, "--model", "DiT-S/2", "--out",
                tmp_path / "out"])
  assert error_line(result) == (f"error: --torch: {path} is {what}: expected a state_dict or an "
                                "official train.py checkpoint saved with torch.save")
  assert "weights_only" not in result.stderr  # never the advice to unpickle arbitrary code
  assert sorted(tmp_path.iterdir()) == [path]


def test_evaluate_truncated_npz(tmp_path):
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.arange(4))
  samples.write_bytes(samples.read_bytes()[:300])
  result = run(["-m", "dit_jax.evaluate", "--samples", samples, "--ref", "digits", "--out",
                tmp_path / "results.json"])
  assert error_line(result) == (f"error: --samples: {samples} is not a readable .npz file "
                                "(truncated, damaged or another format)")
  assert sorted(tmp_path.iterdir()) == [samples]


def test_user_errors_keep_their_cause_and_bugs_their_traceback():
  with pytest.raises(cli.UserError, match="^bad value$") as info:
    with cli.user_errors():
      raise ValueError("bad value")
  assert isinstance(info.value.__cause__, ValueError)
  with pytest.raises(KeyError):  # not a user error: it propagates untouched
    with cli.user_errors(ValueError):
      raise KeyError("bug")

  def main():
    raise cli.UserError("two\nlines")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  assert exit_info.value.code == 1


def test_convert_without_torch_is_one_line(tmp_path):
  """requirements.txt leaves torch out: importing weights without it says how to get it."""
  blocker = ("import sys\n"
             "class Block:\n"
             "  def find_spec(self, name, path=None, target=None):\n"
             "    if name.split('.')[0] == 'torch':\n"
             "      raise ImportError('no torch')\n"
             "sys.meta_path.insert(0, Block())\n"
             "from dit_jax.convert import main\n"
             "main(sys.argv[1:])\n")
  pt = tmp_path / "model.pt"
  pt.write_bytes(b"\x80\x02}q\x00.")
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-c", blocker, "--torch", str(pt), "--model",
                           "DiT-S/2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  assert result.stderr.strip() == (
      "error: --torch: reading a PyTorch checkpoint needs PyTorch, which requirements.txt "
      "leaves out: install it with .venv/bin/pip install -r requirements-dev.txt")
  assert not out.exists()


def test_an_unhandled_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
  monkeypatch.delenv("DIT_VERBOSE", raising=False)

  def main():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  assert exit_info.value.code == 130
  assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_python_command_is_the_running_interpreter_relative_under_the_current_directory(
    tmp_path, monkeypatch):
  import os
  venv_python = tmp_path / ".venv" / "bin" / "python"
  monkeypatch.setattr(sys, "executable", str(venv_python))
  monkeypatch.chdir(tmp_path)
  assert cli.python_command() == os.path.join(".venv", "bin", "python")
  monkeypatch.chdir(tmp_path / "..")
  assert cli.python_command() == os.path.join(tmp_path.name, ".venv", "bin", "python")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  assert cli.python_command() == str(venv_python)


@pytest.mark.parametrize("env, start", [
    ({"JAX_PLATFORMS": "bogus"},
     "error: JAX_PLATFORMS=bogus: Unable to initialize backend 'bogus'"),
    ({"DIT_DISTRIBUTED": "auto"}, "error: DIT_DISTRIBUTED=auto: JAX found no multi-process "
                                  "environment to join"),
])
def test_an_environment_jax_cannot_start_in_is_one_line(tmp_path, env, start):
  result = run(["train.py", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}"], **env)
  assert error_line(result).startswith(start)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address, num_processes, process_id, message", [
    ("localhost", 2, 0, "--coordinator_address: expected host:port, got 'localhost'"),
    ("localhost:1234", None, 0, "--coordinator_address needs --num_processes and --process_id"),
    ("localhost:1234", 0, 0, "--num_processes: must be positive, got 0"),
    ("localhost:1234", 2, 5, "--process_id: must be in [0, 2) for --num_processes=2, got 5"),
    ("localhost:1234", 2, -1, "--process_id: must be in [0, 2) for --num_processes=2, got -1"),
])
def test_distributed_flags_are_checked(address, num_processes, process_id, message):
  with pytest.raises(cli.UserError) as info:
    cli.check_distributed_flags(address, num_processes, process_id)
  assert str(info.value).startswith(message)
  cli.check_distributed_flags("10.0.0.1:1234", 2, 1)  # a valid process: no error
