"""The checkpoint format (dit_jax.checkpoints): the recorded process, what loading reads."""
import dataclasses
import gc
import logging
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dit_jax import checkpoints, logs
from dit_jax.diffusion import OFFICIAL_PROCESS, DiffusionProcess
from dit_jax.models import create_model, init_params
from train_utils import flat

NON_DEFAULT = DiffusionProcess(noise_schedule="squaredcos_cap_v2", diffusion_steps=500,
                               learn_sigma=False, sigma_small=True, predict_xstart=True)


def tiny_model(**overrides):
  return create_model("S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                      hidden_size=32, num_heads=2, **overrides)


def test_imported_weights_record_the_official_process(tmp_path):
  model = tiny_model()
  params = init_params(model, jax.random.key(0))
  checkpoints.save_params(str(tmp_path / "imported"), params, model)
  loaded, process, restored = checkpoints.load_for_sampling(str(tmp_path / "imported"))
  assert loaded == model and process == OFFICIAL_PROCESS
  assert checkpoints.load_config(str(tmp_path / "imported"))[0]["process"] == {
      "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True,
      "sigma_small": False, "predict_xstart": False}
  for key, value in flat(params).items():
    np.testing.assert_array_equal(flat(restored)[key], value, err_msg=key)


def test_a_trained_process_comes_back_from_the_checkpoint(tmp_path):
  model = tiny_model(learn_sigma=False)
  checkpoints.save_params(str(tmp_path / "ckpt"), init_params(model, jax.random.key(0)), model,
                          process=NON_DEFAULT)
  _, process, _ = checkpoints.load_for_sampling(str(tmp_path / "ckpt"))
  assert process == NON_DEFAULT


def test_checkpoints_from_before_the_process_was_recorded():
  run = {"diffusion": {"noise_schedule": "squaredcos_cap_v2", "diffusion_steps": 500,
                       "learn_sigma": False, "sigma_small": True, "predict_xstart": True,
                       "timestep_respacing": "", "use_kl": False}}
  assert checkpoints.process_of({"model": {}, "run": run}) == NON_DEFAULT  # training
  # Imported before: the official process, with the model's output channels.
  assert checkpoints.process_of({"model": {"learn_sigma": True}}) == OFFICIAL_PROCESS
  assert checkpoints.process_of({"model": {"learn_sigma": False}}) == dataclasses.replace(
      OFFICIAL_PROCESS, learn_sigma=False)


def test_sampling_restores_only_the_weights_it_needs(tmp_path, monkeypatch):
  """EMA (or raw) weights of a training checkpoint, never the optimizer state."""
  model = tiny_model()
  params = init_params(model, jax.random.key(0))
  ema = jax.tree.map(lambda p: p + 1.0, params)
  moments = jax.tree.map(np.zeros_like, params)
  state = {"step": np.int32(3), "params": params, "ema_params": ema,
           "opt_state": {"mu": moments, "nu": moments}}
  with ocp.CheckpointManager(str(tmp_path)) as manager:
    checkpoints.write_state(manager, 3, state,
                            checkpoints.saved_config(model, OFFICIAL_PROCESS, run={}))
    manager.wait_until_finished()
  handler = ocp.BasePyTreeCheckpointHandler
  original, read = handler._maybe_deserialize, []

  async def counting(self, item, metadata, param_infos, restore_args):
    read.append(len(jax.tree.leaves(metadata)))
    return await original(self, item, metadata, param_infos, restore_args)

  monkeypatch.setattr(handler, "_maybe_deserialize", counting)
  for use_ema, want in ((True, ema), (False, params)):
    read.clear()
    _, _, got = checkpoints.load_for_sampling(str(tmp_path), use_ema=use_ema)
    assert read == [len(jax.tree.leaves(params))]  # the weights alone: not 4x as many
    for key, value in flat(want).items():
      np.testing.assert_array_equal(flat(got)[key], value, err_msg=key)


def write_steps(directory, steps, model):
  """A convert-style checkpoint (params + config) holding several steps; their params differ."""
  params = init_params(model, jax.random.key(0))
  with ocp.CheckpointManager(str(directory)) as manager:
    for step in steps:
      shifted = jax.tree.map(lambda p, s=step: np.asarray(p) + s, params)
      manager.save(step, args=ocp.args.Composite(**{
          checkpoints.PARAMS_ITEM: ocp.args.StandardSave(shifted),
          checkpoints.CONFIG_ITEM: ocp.args.JsonSave(
              checkpoints.saved_config(model, OFFICIAL_PROCESS))}))
    manager.wait_until_finished()
  return params


def damage(step_dir, how):
  item = step_dir / checkpoints.PARAMS_ITEM
  if how == "truncated data file":
    data = max((item / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
  elif how == "missing manifest":
    (item / "manifest.ocdbt").unlink()
  elif how == "missing item folder":
    shutil.rmtree(item)


@pytest.mark.parametrize("how", ["truncated data file", "missing manifest", "missing item folder",
                                 "empty newer folder"])
def test_sampling_falls_back_to_the_newest_intact_step(tmp_path, monkeypatch, caplog, how):
  # Reads that the failed restore abandoned print nothing (what logs.setup installs).
  monkeypatch.setattr(sys, "unraisablehook", logs._without_closed_loop_errors(sys.unraisablehook))
  abandoned = logs.AbandonedReadFilter()
  logging.getLogger("asyncio").addFilter(abandoned)
  try:
    _falls_back(tmp_path, caplog, how)
  finally:
    logging.getLogger("asyncio").removeFilter(abandoned)


def _falls_back(tmp_path, caplog, how):
  model = tiny_model()
  params = write_steps(tmp_path, [1, 2], model)
  bad = 3 if how == "empty newer folder" else 2
  (tmp_path / str(bad)).mkdir(exist_ok=True)
  damage(tmp_path / str(bad), how)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with caplog.at_level(logging.WARNING), checkpoints.Reader(str(tmp_path)) as reader:
    _, config_step = reader.config()
    step, (_, _, got) = reader.load_step_for_sampling()
  # The step read is the one whose weights read, whichever config reads (sample.py records it).
  assert (step, config_step) == (bad - 1, 2)
  time.sleep(0.3)  # the abandoned reads end while the filter is installed
  gc.collect()
  np.testing.assert_array_equal(flat(got)["/final_layer/linear/bias"],
                                flat(params)["/final_layer/linear/bias"] + (bad - 1))
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(lines) == 1 and lines[0].startswith(f"checkpoint: step {bad} of {tmp_path} cannot "
                                                 "be read (") and "\n" not in lines[0], lines
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=f"^checkpoint: step {bad} of {tmp_path} cannot be read \\("):
    checkpoints.load_for_sampling(str(tmp_path), step=bad)
  time.sleep(0.3)
  gc.collect()


def test_no_readable_step_is_one_error_naming_each(tmp_path):
  model = tiny_model()
  write_steps(tmp_path, [1], model)
  shutil.rmtree(tmp_path / "1" / checkpoints.PARAMS_ITEM)
  (tmp_path / "2").mkdir()
  with pytest.raises(checkpoints.UnreadableCheckpointError) as error:
    checkpoints.load_for_sampling(str(tmp_path))
  assert str(error.value).startswith(f"checkpoint: no step of {tmp_path} can be read: step 2: "
                                     "ValueError: an empty folder; step 1: ")
