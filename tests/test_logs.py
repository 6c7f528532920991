"""What a run prints: a short console by default, and a training checkpoint that loads quietly."""
import logging
import subprocess

import numpy as np
import pytest

from dit_jax import checkpoints, logs
from train_utils import ROOT, env_with_devices, flat, restore_state, train_command

GRID = dict(sample__every_steps=3, sample__classes="(0,1)", sample__per_class=2,
            sample__sampler="ddim", sample__num_steps=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 3-step digits run (a log line per step, a checkpoint and a grid at step 3): its output."""
  workdir = tmp_path_factory.mktemp("logs") / "run"
  env = env_with_devices(1)
  env.pop("TF_CPP_MIN_LOG_LEVEL")  # what a user's shell has: nothing set
  result = subprocess.run(train_command(workdir, **GRID), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, (result.stdout + result.stderr).splitlines()


@pytest.mark.slow
def test_a_short_run_prints_only_what_a_user_reads(tiny_run):
  workdir, lines = tiny_run
  expected = ["JAX process 0/1", "Model: DiT, ", "Mesh: data=1, fsdp=1, tensor=1",
              "Data: digits, 1,797 examples",
              "step 1/3: loss ", "step 2/3: loss ", "step 3/3: loss ",
              f"Checkpoint: {workdir / 'checkpoints' / '3'}",
              f"Samples: {workdir / 'samples' / 'step_0000003.png'}", "step=3 "]
  for text in expected:
    assert sum(text in line for line in lines) == 1, (text, lines)
  # The lines above and nothing else: no TensorFlow, JAX, orbax or clu chatter, no warnings.
  assert len(lines) == len(expected), "\n".join(lines)


def test_tensorflow_import_lines_dropped_are_info_only():
  assert logs._CPP_INFO.match("I0000 00:00:1795745603.357494    3130 port.cc:153] oneDNN custom "
                              "operations are on.")
  assert logs._CPP_INFO.match("I1127 02:13:27.930193 139754868169600 xla_bridge.py:849] x")
  for kept in ("W0000 00:00:1795745603.357494    3130 port.cc:153] a warning",
               "E0000 00:00:1795745603.357494    3130 cuda_dnn.cc:8579] an error",
               "Info: a line of some other shape"):
    assert not logs._CPP_INFO.match(kept)


def test_a_training_checkpoint_loads_without_orbax_warnings(tiny_run, caplog):
  workdir, _ = tiny_run
  with caplog.at_level(logging.INFO):
    model, ema = checkpoints.load_params(str(workdir))
    _, raw = checkpoints.load_params(str(workdir), use_ema=False)
  # Before: "Metadata file does not exist: .../3/state/_CHECKPOINT_METADATA", for reading the
  # item directory as if it were a checkpoint of its own.
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  state = restore_state(workdir)
  assert model.depth == 1 and model.hidden_size == 32
  for loaded, saved in ((ema, state["ema_params"]), (raw, state["params"])):
    a, b = flat(loaded), flat(saved)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(flat(ema)["/final_layer/linear/kernel"],
                            flat(raw)["/final_layer/linear/kernel"])
  with pytest.raises(FileNotFoundError, match="has no step 7; it holds steps \\[3\\]"):
    checkpoints.load_params(str(workdir), step=7)


def test_abandoned_orbax_reads_are_not_logged_but_other_futures_are():
  """asyncio's 'Future exception was never retrieved' of a read a failed restore left is dropped."""
  import logging

  from dit_jax import logs

  def record(error):
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, "Future exception "
                             "was never retrieved\nfuture: <Future>", None,
                             (type(error), error, None))

  keep = logs.AbandonedReadFilter().filter
  assert not keep(record(ValueError('NOT_FOUND: ... [tensorstore_spec=\'{"driver":"zarr"}\']')))
  assert not keep(record(ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database')))
  assert keep(record(ValueError("a real bug elsewhere")))
  assert keep(logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, "Task was destroyed", None,
                                None))
