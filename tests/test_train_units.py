"""In-process tests of the training pieces: mesh, optimizer, EMA, the train step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import digits
from dit_jax import checkpoints
from dit_jax.diffusion import process_from_config
from dit_jax.models import build_model
from dit_jax.train import sharding as shd
from dit_jax.train import state as state_lib
from dit_jax.train.step import train_step
from dit_jax.train.throughput import peak_flops


def tiny_config() -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.model.depth, config.model.hidden_size, config.model.num_heads = 1, 32, 2
  return config


def test_make_mesh_fills_and_validates():
  mesh = shd.make_mesh(("data", "fsdp", "tensor"), (-1, 1, 1))
  assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match=r"^config\.mesh\.axis_sizes:"):
    shd.make_mesh(("data", "fsdp"), (-1, -1))
  with pytest.raises(ValueError, match=r"^config\.mesh\.axis_sizes:"):
    shd.make_mesh(("data",), (jax.device_count() + 1,))
  with pytest.raises(ValueError, match=r"^config\.mesh:"):
    shd.make_mesh(("data", "fsdp"), (1,))


def test_logical_rules_map_kernels_to_mesh_axes():
  config = tiny_config()
  model = build_model(config.model)
  tx, _ = state_lib.make_optimizer(config.optimizer)
  mesh = shd.make_mesh(("data", "fsdp", "tensor"), (-1, 1, 1))
  rules = shd.rules_from_config(config.axis_rules)
  boxed = jax.eval_shape(functools.partial(state_lib.init_state_boxed, model=model, tx=tx),
                         jax.random.key(0))
  shardings = shd.tree_shardings(boxed, mesh, rules)
  spec = shardings.params["blocks_0"]["attn"]["qkv"]["kernel"].spec
  assert tuple(spec) == ("fsdp", "tensor")  # embed -> fsdp, qkv -> tensor
  assert tuple(shardings.params["blocks_0"]["mlp"]["fc2"]["kernel"].spec) == ("tensor", "fsdp")
  # The optimizer moments are sharded like the parameters they belong to.
  adam_mu = shardings.opt_state[1][0].mu["blocks_0"]["attn"]["qkv"]["kernel"]
  assert tuple(adam_mu.spec) == ("fsdp", "tensor")
  assert tuple(shardings.step.spec) == ()
  assert tuple(shd.batch_sharding(mesh, rules, 4).spec) == (("data", "fsdp"), None, None, None)


def test_optimizer_warmup_and_clipping():
  config = ml_collections.ConfigDict(dict(learning_rate=1e-3, weight_decay=0.0, b1=0.9,
                                          b2=0.999, eps=1e-8, warmup_steps=10,
                                          grad_clip_norm=1.0))
  tx, schedule = state_lib.make_optimizer(config)
  assert float(schedule(0)) == 0.0 and np.isclose(float(schedule(5)), 5e-4)
  assert np.isclose(float(schedule(10)), 1e-3) and np.isclose(float(schedule(1000)), 1e-3)
  params = {"w": jnp.ones(3)}
  opt_state = tx.init(params)
  # Clipping bounds the (pre-Adam) gradient: a huge gradient gives the same update as a unit one.
  big, _ = tx.update({"w": jnp.full(3, 1e6)}, opt_state, params)
  unit, _ = tx.update({"w": jnp.full(3, 1.0 / np.sqrt(3))}, opt_state, params)
  np.testing.assert_allclose(big["w"], unit["w"], rtol=1e-5)


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0])}
  params = {"a": jnp.array([3.0, 4.0])}
  out = state_lib.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["a"], [1.2, 2.2], rtol=1e-6)


def pixels(batch, rng, frozen):
  """The x0 of a pixel-space pipeline (`InputPipeline.x0` without an encoder)."""
  del rng, frozen
  return batch["images"]


def jit_train_step(config, model):
  tx, schedule = state_lib.make_optimizer(config.optimizer)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_schedule=schedule,
                                   ema_decay=config.ema_decay, x0=pixels,
                                   process=process_from_config(config)))
  return tx, step


def test_train_step_learns_and_tracks_ema():
  config = tiny_config()
  config.optimizer.warmup_steps = 0
  model = build_model(config.model)
  tx, step = jit_train_step(config, model)
  state = state_lib.init_state(jax.random.key(0), model=model, tx=tx)
  initial = state.params
  batch = {"images": jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1),
           "labels": jnp.arange(16) % 10}
  rng = jax.random.key(2)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 40
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
  assert set(metrics) >= {"loss", "mse", "vb", "grad_norm", "param_norm", "learning_rate"}
  np.testing.assert_allclose(metrics["loss"], metrics["mse"] + metrics["vb"], rtol=1e-5)
  # EMA with decay 0.999 over 40 steps: mostly the initial weights, a little of the new ones.
  w0 = np.asarray(initial["blocks_0"]["mlp"]["fc1"]["kernel"])
  w = np.asarray(state.params["blocks_0"]["mlp"]["fc1"]["kernel"])
  ema = np.asarray(state.ema_params["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert np.abs(ema - w0).max() < np.abs(w - w0).max() / 5
  assert np.abs(ema - w0).max() > 0


def test_train_step_is_a_pure_function_of_state_batch_and_rng():
  config = tiny_config()
  model = build_model(config.model)
  tx, step = jit_train_step(config, model)
  batch = {"images": jnp.zeros((8, 8, 8, 1)), "labels": jnp.arange(8)}
  a, ma = step(state_lib.init_state(jax.random.key(0), model=model, tx=tx), batch,
               jax.random.key(5))
  b, mb = step(state_lib.init_state(jax.random.key(0), model=model, tx=tx), batch,
               jax.random.key(5))
  c, mc = step(state_lib.init_state(jax.random.key(0), model=model, tx=tx), batch,
               jax.random.key(6))
  assert float(ma["loss"]) == float(mb["loss"]) != float(mc["loss"])
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_peak_flops_known_and_unknown():
  assert peak_flops(jax.devices()[0]) is None  # CPUs: no MFU

  class FakeDevice:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert peak_flops(FakeDevice()) == 989e12


def test_optax_tree_norm_is_the_global_norm():
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  assert float(optax.tree.norm(grads)) == 5.0


def test_checkpointer_keeps_last_k_plus_every_mth(tmp_path):
  from dit_jax.train.checkpointing import Checkpointer, IncompatibleCheckpointError

  checkpointer = Checkpointer(str(tmp_path), keep=2, keep_period=4, async_save=True)
  arch = {"hidden_size": 8}
  for step in range(1, 11):
    checkpointer.save(step, {"w": jnp.full((2,), float(step))}, {"model": arch})
  checkpointer.wait()
  assert sorted(checkpointer.manager.all_steps()) == [4, 8, 9, 10]
  target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  np.testing.assert_array_equal(checkpointer.restore(8, target)["w"], [8.0, 8.0])
  checkpointer.check_compatible(arch)  # the same model: fine
  with pytest.raises(IncompatibleCheckpointError, match=r"hidden_size: checkpoint 8 vs config 16"):
    checkpointer.check_compatible({"hidden_size": 16})
  checkpointer.close()
  checkpointer.close()  # idempotent


def test_a_workdir_of_another_process_is_refused_naming_the_process(tmp_path):
  """A diffusion config on a flow workdir: the process is the difference to name, not the
  learn_sigma it implies (which the architecture comparison would find first)."""
  from dit_jax.diffusion import OFFICIAL_PROCESS, FlowProcess
  from dit_jax.models import DiT
  from dit_jax.train.checkpointing import Checkpointer

  flow_model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                   num_heads=2, num_classes=3, learn_sigma=False)
  checkpointer = Checkpointer(str(tmp_path), keep=1, keep_period=0, async_save=False)
  checkpointer.save(1, {"w": jnp.zeros(2)}, checkpoints.saved_config(flow_model, FlowProcess()))
  checkpointer.wait()
  diffusion_model = flow_model.clone(learn_sigma=True)
  with pytest.raises(ValueError,
                     match=r"^config.process: .* step 1 was trained for flow matching, linear "
                           r"path, velocity prediction; the config asks for linear schedule, "
                           r"1000 steps, eps prediction, learned sigma \(config.process"):
    checkpointer.check_compatible(diffusion_model.arch_config(), OFFICIAL_PROCESS)
  step, _ = checkpointer.check_compatible(flow_model.arch_config(), FlowProcess())
  assert step == 1
  checkpointer.close()


def test_metrics_log_keeps_each_step_once_across_resumes(tmp_path):
  import json
  from dit_jax.train.metrics_log import MetricsLog

  path = tmp_path / "metrics.jsonl"
  first = MetricsLog(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    first.append(step, {"train/loss": step / 10})
  first.append(5, {"eval/digits_accuracy": 0.5})
  with open(path, "a") as f:
    f.write('{"step": 6, "train/lo')  # a line cut short by kill -9
  # Resumed from the checkpoint at step 3: rows 4.. go (the run logs them again), 1..3 stay.
  resumed = MetricsLog(str(tmp_path), resume_step=3)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["train/loss"] == 0.3
  for step in range(4, 6):
    resumed.append(step, {"train/loss": step})
  resumed.append(5, {"eval/digits_accuracy": 0.7})
  # A finished run graded again at its last step: the grade is replaced, not repeated.
  again = MetricsLog(str(tmp_path), resume_step=5)
  again.append(5, {"eval/digits_accuracy": 0.9})
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], "eval/digits_accuracy" in r) for r in rows] == [
      (1, False), (2, False), (3, False), (4, False), (5, False), (5, True)]
  assert rows[3]["train/loss"] == 4 and rows[5]["eval/digits_accuracy"] == 0.9
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left
  MetricsLog(str(tmp_path), resume_step=0, enabled=False).append(9, {"train/loss": 1.0})
  assert "9" not in [str(r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_sigterm_and_a_first_ctrl_c_request_a_stop_and_a_second_ctrl_c_interrupts():
  import os
  import signal
  from dit_jax.train.checkpointing import PreemptionHandler

  before = {s: signal.getsignal(s) for s in PreemptionHandler.SIGNALS}
  handler = PreemptionHandler()
  try:
    assert not handler.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.requested and handler.signal_name == "SIGTERM"
  finally:
    handler.close()
  assert {s: signal.getsignal(s) for s in PreemptionHandler.SIGNALS} == before
  handler = PreemptionHandler()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C: checkpoint and stop
    assert handler.requested and handler.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second: now
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    handler.close()
  assert {s: signal.getsignal(s) for s in PreemptionHandler.SIGNALS} == before


def test_metrics_log_says_when_a_run_starts_over(tmp_path, caplog):
  import logging
  from dit_jax.train.metrics_log import MetricsLog

  MetricsLog(str(tmp_path), resume_step=0).append(1, {"train/loss": 1.0})
  with caplog.at_level(logging.INFO):
    MetricsLog(str(tmp_path), resume_step=0)
  assert "dropped 1 rows after step 0, no checkpoint: this run starts from the beginning" in (
      caplog.text)
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path):
  from dit_jax.train.checkpointing import Checkpointer
  from dit_jax.train.loop import _check_finite

  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=2, keep_period=None)
  finite = {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(3.0)}
  assert _check_finite(7, finite, checkpointer) == {"loss": 0.5, "grad_norm": 3.0}
  with pytest.raises(FloatingPointError, match=r"^non-finite loss inf at step 8: stopping; no "
                                               r"checkpoint was written before it$"):
    _check_finite(8, {**finite, "loss": jnp.float32(np.inf)}, checkpointer)
  checkpointer.save(6, {"w": jnp.zeros(2)}, {"model": {}})
  where = tmp_path / "checkpoints" / "6"
  with pytest.raises(FloatingPointError, match=rf"^non-finite grad_norm nan at step 8: stopping; "
                                               rf"the last good checkpoint is step 6 \({where}\)$"):
    _check_finite(8, {**finite, "grad_norm": jnp.float32(np.nan)}, checkpointer)
  checkpointer.close()


def test_resume_skips_unreadable_steps_and_sets_them_aside(tmp_path, caplog):
  import logging
  import shutil
  from dit_jax.train.checkpointing import Checkpointer

  directory = tmp_path / "checkpoints"
  first = Checkpointer(str(directory), keep=5, keep_period=None, async_save=False)
  for step in (1, 2, 3):
    first.save(step, {"w": jnp.full((2,), float(step))}, {"model": {"hidden_size": 8}})
  first.close()
  shutil.rmtree(directory / "3" / "state")  # a damaged step: its config reads, its state not
  (directory / "4").mkdir()  # an empty step folder
  shutil.copytree(directory / "2", directory / "5.orbax-checkpoint-tmp-123")  # an unfinished save
  with caplog.at_level(logging.INFO):
    checkpointer = Checkpointer(str(directory), keep=5, keep_period=None, async_save=False)
    checkpointer.check_compatible({"hidden_size": 8})  # reads step 3's config, skipping 4
    step, state = checkpointer.restore_newest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert step == 2
  np.testing.assert_array_equal(state["w"], [2.0, 2.0])
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert lines == [
      f"checkpoint: removed {directory}/5.orbax-checkpoint-tmp-123, the temporary folder of a "
      "save that did not finish",
      f"checkpoint: step 4 of {directory} cannot be read (ValueError: an empty folder); "
      "skipping it",
      f"checkpoint: step 3 of {directory} cannot be read "
      f"(KeyError: {lines[2].split('(KeyError: ')[1]}",
      f"checkpoint: moved the unreadable step 3 to {tmp_path}/unreadable_checkpoints/3; training "
      "resumes from step 2",
      f"checkpoint: moved the unreadable step 4 to {tmp_path}/unreadable_checkpoints/4; training "
      "resumes from step 2"]
  # Moved aside, not deleted; the run saves those steps again.
  assert sorted(p.name for p in (tmp_path / "unreadable_checkpoints").iterdir()) == ["3", "4"]
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
  assert checkpointer.save(3, {"w": jnp.full((2,), 30.0)}, {"model": {"hidden_size": 8}})
  checkpointer.wait()
  assert checkpointer.restore_newest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})[0] == 3
  checkpointer.close()


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
  import json
  import logging
  import os
  import socket
  import subprocess
  from dit_jax.train.workdir_lock import (WorkdirBusyError, WorkdirLock, _process_start,
                                          lock_workdir)

  workdir = tmp_path / "run"
  lock_file = workdir / "run.lock"
  held = lock_workdir(str(workdir))  # one process: process 0 takes it
  holder = json.loads(lock_file.read_text())
  assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
  with pytest.raises(WorkdirBusyError) as busy:  # flock is per open file: refused here too
    WorkdirLock(str(workdir))
  assert str(busy.value) == (f"workdir: {workdir} is in use by another run (host "
                             f"{holder['host']}, pid {os.getpid()}, started {holder['started']}); "
                             "wait for it to end, or use another --workdir. Nothing was written.")
  held.release()
  held.release()  # idempotent
  assert lock_file.read_text() == ""
  with caplog.at_level(logging.WARNING):
    WorkdirLock(str(workdir)).release()  # released properly: no warning
  assert not caplog.records

  child = subprocess.Popen(["true"])
  child.wait()  # a pid that has ended: its lock is taken over, with a warning
  dead = {"host": socket.gethostname(), "pid": child.pid, "pid_start": "1",
          "started": "2026-11-27T03:00:00+00:00"}
  lock_file.write_text(json.dumps(dead))
  with caplog.at_level(logging.WARNING):
    WorkdirLock(str(workdir)).release()
  assert [r.getMessage() for r in caplog.records] == [
      f"workdir: taking over {lock_file} from a run that ended without releasing it (host "
      f"{dead['host']}, pid {child.pid}, started {dead['started']})"]
  # A filesystem that ignores flock: a live holder of this host is still recognised.
  alive = {**dead, "pid": os.getpid(), "pid_start": _process_start(os.getpid())}
  lock_file.write_text(json.dumps(alive))
  with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}, started"):
    WorkdirLock(str(workdir))
  assert json.loads(lock_file.read_text()) == alive  # the refused run wrote nothing


def check_lease_lock(workdir: str, monkeypatch, caplog) -> None:
  """The lease protocol of gs:// workdirs (any path works: it only reads and writes files)."""
  import json
  import logging
  import threading
  import time
  from dit_jax import fs
  from dit_jax.train import workdir_lock
  from dit_jax.train.workdir_lock import LeaseLock, WorkdirBusyError

  monkeypatch.setattr(workdir_lock, "SETTLE_SECONDS", 0.3)
  monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.2)
  lock_file = fs.join(workdir, "run.lock")
  held = LeaseLock(workdir)
  first = json.loads(fs.read_text(lock_file))
  assert first["token"] == held.holder["token"]
  with pytest.raises(WorkdirBusyError, match=r"in use by another run \(host .*, renewed \d+ s "
                     r"ago; a lock not renewed for 120 s is taken over\)"):
    LeaseLock(workdir)
  time.sleep(0.5)  # renewed in the background
  assert json.loads(fs.read_text(lock_file))["renewed"] > first["renewed"]
  held.release()
  held.release()  # idempotent
  assert fs.read_text(lock_file) == ""
  with caplog.at_level(logging.WARNING):
    LeaseLock(workdir).release()  # released properly: no warning
  assert not caplog.records

  stale = {**first, "renewed": time.time() - 121}  # a run that died two minutes ago
  fs.write_text(lock_file, json.dumps(stale))
  with caplog.at_level(logging.WARNING):
    taken = LeaseLock(workdir)
  assert any("taking over" in r.getMessage() and "stopped renewing it 121 s ago" in
             r.getMessage() for r in caplog.records)
  taken.release()

  # Two runs starting together: exactly one holds the workdir.
  outcomes = []
  def start() -> None:
    try:
      outcomes.append(LeaseLock(workdir))
    except WorkdirBusyError as e:
      outcomes.append(e)
  threads = [threading.Thread(target=start) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [o for o in outcomes if isinstance(o, LeaseLock)]
  assert len(winners) == 1 and len(outcomes) == 2
  assert json.loads(fs.read_text(lock_file))["token"] == winners[0].holder["token"]
  winners[0].release()


def test_a_directory_in_the_lock_files_place_is_refused_untouched(tmp_path):
  from dit_jax.train.workdir_lock import WorkdirLock
  (tmp_path / "run.lock" / "inside").mkdir(parents=True)
  with pytest.raises(ValueError) as info:
    WorkdirLock(str(tmp_path))
  assert str(info.value) == (f"workdir: {tmp_path / 'run.lock'} is a directory where the run's "
                             "lock file goes; move it away, or use another --workdir")
  assert [p.name for p in tmp_path.rglob("*")] == ["run.lock", "inside"]


def test_lease_lock_on_a_local_folder(tmp_path, monkeypatch, caplog):
  check_lease_lock(str(tmp_path / "run"), monkeypatch, caplog)


def test_resume_with_a_changed_config(tmp_path, caplog):
  import json
  import logging
  from dit_jax import checkpoints
  from dit_jax.train import resume_check

  first = tiny_config()
  saved = checkpoints.saved_config(build_model(first.model),
                                   process_from_config(first),
                                   run=resume_check.run_config(first))
  check = functools.partial(resume_check.check_resume, saved, 300, where="ckpts")
  config = tiny_config()
  config.num_steps, config.sample.cfg_scale, config.mesh.axis_sizes = 9000, 2.0, (1, -1, 1)
  config.model.scan_unroll = 1
  assert set(check(config)) == {"num_steps", "sample.cfg_scale", "mesh.axis_sizes",
                                "model.scan_unroll"}  # free
  config.batch_size, config.optimizer.learning_rate, config.seed = 64, 2e-3, 7
  with pytest.raises(ValueError) as refused:
    check(config)
  assert str(refused.value) == (
      "config: ckpts step 300 was trained with other settings (batch_size 128 -> 64, "
      "optimizer.learning_rate 0.001 -> 0.002, seed 0 -> 7); changing them changes how "
      "training goes on. Pass --config.resume_changes=batch_size,optimizer.learning_rate,seed "
      "to accept (each accepted change is kept in config_history.jsonl), or use another "
      "--workdir. Nothing was written.")
  config.resume_changes = "batch_size, optimizer,seed"  # a key or a whole section
  with caplog.at_level(logging.WARNING):
    check(config)
  assert [r.getMessage() for r in caplog.records] == [
      "config: resuming from step 300 with batch_size changed from 128 to 64 "
      "(config.resume_changes)",
      "config: resuming from step 300 with optimizer.learning_rate changed from 0.001 to 0.002 "
      "(config.resume_changes)",
      "config: resuming from step 300 with seed changed from 0 to 7 (config.resume_changes)"]
  for key, value, message in (("diffusion.predict_xstart", True, "was trained for linear "),
                              ("optimizer.grad_clip_norm", 0.0, "trained with clipping")):
    other = tiny_config()
    other.resume_changes = "diffusion,optimizer"  # not enough for these
    section, name = key.split(".")
    other[section][name] = value
    with pytest.raises(ValueError, match=message):
      check(other)

  # The history: the first config, then each change, with the step it applies from.
  resume_check.record(str(tmp_path), 0, first)
  resume_check.record(str(tmp_path), 300, first)  # unchanged: no row
  resume_check.record(str(tmp_path), 300, config)
  rows = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [r["from_step"] for r in rows] == [0, 300] and rows[0]["changes"] == {}
  assert rows[1]["changes"]["batch_size"] == [128, 64] and rows[1]["config"]["seed"] == 7
  # A workdir from before the history: the saved config is recorded first.
  (tmp_path / "old").mkdir()
  resume_check.record(str(tmp_path / "old"), 300, config, saved)
  rows = [json.loads(line) for line in (tmp_path / "old" / "config_history.jsonl").read_text(
      ).splitlines()]
  assert [r["from_step"] for r in rows] == [None, 300] and rows[0]["config"]["seed"] == 0

