"""train.py end to end in subprocesses: meshes, resume after SIGKILL, two processes, SIGTERM,
a folder run, init_from, and the failure behaviours. Runs compared only by their results may
share one subprocess (train_utils.run_trains_in_one_process), and every subprocess here shares
the session's compilation cache."""
import json
import os
import pathlib
import signal
import socket
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import train_utils
from conftest import fixture_path
from train_utils import (ROOT, checkpoint_steps, env_with_devices, flat, read_metrics, restore_state,
                         run_train, train_command)

# Every test here runs train.py end to end in subprocesses.
pytestmark = pytest.mark.slow


def assert_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, result.stderr[-3000:]


def assert_states_equal(a, b, atol: float = 0.0) -> None:
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    if atol == 0.0:
      np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    else:
      np.testing.assert_allclose(fa[key], fb[key], atol=atol, rtol=0, err_msg=key)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict[str, pathlib.Path]:
  """The tiny run on one process of 8 devices, on a data-parallel mesh (the one the default
  (-1, 1, 1) makes, which the two-process test compares with) and on a data x fsdp mesh: the
  two runs one after the other in one process."""
  root = tmp_path_factory.mktemp("eight_devices")
  meshes = {"data8": "(8,1,1)", "fsdp": "(4,2,1)"}
  assert_ok(train_utils.run_trains_in_one_process(
      [(root / name, dict(mesh__axis_sizes=sizes)) for name, sizes in meshes.items()],
      num_devices=8))
  return {name: root / name for name in meshes}


def test_meshes_give_the_same_parameters_as_one_device(tmp_path, eight_devices):
  assert_ok(run_train(tmp_path / "one", num_devices=1))
  one = restore_state(tmp_path / "one")
  assert int(one["step"]) == 3
  for other_dir in eight_devices.values():
    other = restore_state(other_dir)
    assert_states_equal(one["params"], other["params"], atol=1e-5)
    assert_states_equal(one["ema_params"], other["ema_params"], atol=1e-5)
    losses = [m["train/loss"] for m in read_metrics(other_dir)]
    np.testing.assert_allclose(losses, [m["train/loss"] for m in read_metrics(tmp_path / "one")],
                               rtol=1e-5)


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended early: {proc.stderr.read()[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("timed out waiting for train.py")
    time.sleep(0.05)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(train_command(killed, num_steps=100_000), cwd=ROOT, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env_with_devices(1))
  wait_for(lambda: len(checkpoint_steps(killed)) > 0, 240, proc)
  # A second run on the workdir of a live one is refused at start, naming the holder.
  second = run_train(killed, num_steps=100_000)
  assert second.returncode == 1
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: workdir: {killed} is in use by another run (host ")
  assert f", pid {proc.pid}, started " in line and proc.poll() is None
  proc.send_signal(signal.SIGKILL)  # a hard kill: no handler, no final checkpoint
  proc.wait()
  resume_from = checkpoint_steps(killed)[-1]
  assert resume_from % 3 == 0
  total = resume_from + 3
  # The resumed run, then an uninterrupted one to the same step, in one process. The
  # uninterrupted run checkpoints only at its end (the killed one saved every 3 steps, up to
  # hundreds of times before the kill): saving never changes the state or the losses.
  runs = train_utils.run_trains_in_one_process(
      [(killed, dict(num_steps=total)),
       (tmp_path / "straight", dict(num_steps=total, checkpoint__every_steps=total)),
       (killed, dict(num_steps=total - 1))])  # behind the checkpoint: says so, trains nothing
  assert_ok(runs)
  assert (f"config.num_steps={total - 1}: the checkpoint is at step {total} already; nothing "
          "to train") in runs.stderr
  # The killed run's lock is taken over, with a warning naming it.
  assert f"workdir: taking over {killed / 'run.lock'} from a run that ended without releasing " \
         f"it (host " in runs.stderr and f", pid {proc.pid}, started " in runs.stderr
  resumed, straight = restore_state(killed, total), restore_state(tmp_path / "straight", total)
  assert int(resumed["step"]) == total
  assert_states_equal(resumed, straight)  # params, EMA, optimizer state, step: bit for bit
  # Same data order: the losses of the resumed steps equal the uninterrupted run's.
  got, want = read_metrics(killed), read_metrics(tmp_path / "straight")
  # Each step once: the rows logged after the checkpoint by the killed run were replaced.
  assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, total + 1))
  for step in range(resume_from + 1, total + 1):
    assert got[step - 1]["train/loss"] == want[step - 1]["train/loss"], step


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tmp_path, eight_devices):
  data8 = eight_devices["data8"]
  port = free_port()
  procs = [subprocess.Popen(
      train_command(tmp_path / "multi") + [f"--coordinator_address=127.0.0.1:{port}",
                                           "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=env_with_devices(4)) for i in range(2)]
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, err[-3000:]
  multi_losses = [m["train/loss"] for m in read_metrics(tmp_path / "multi")]
  single_losses = [m["train/loss"] for m in read_metrics(data8)]
  assert len(multi_losses) == 3
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-6)
  assert_states_equal(restore_state(tmp_path / "multi")["params"],
                      restore_state(data8)["params"], atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_the_current_step_and_exits_zero(tmp_path, signum):
  proc = subprocess.Popen(train_command(tmp_path, num_steps=100_000,
                                        checkpoint__every_steps=100_000),
                          cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env_with_devices(1))
  metrics = tmp_path / "metrics.jsonl"
  wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 240, proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert f"{signal.Signals(signum).name}: checkpointing step" in err and "Traceback" not in err
  steps = checkpoint_steps(tmp_path)
  assert len(steps) == 1 and steps[0] >= 5
  state = restore_state(tmp_path)
  assert int(state["step"]) == steps[0]
  # Every step up to the checkpoint has its row (the checkpoint's own step included).
  assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, steps[0] + 1))


def write_folder(root, sizes=((12, 10), (9, 14), (16, 16))):
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cat", "dog"]):
    (root / name).mkdir(parents=True)
    for i, (w, h) in enumerate(sizes * 2):
      pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
      pixels[..., c] = 255  # a class-dependent colour
      Image.fromarray(pixels).save(root / name / f"{i}.png")
  (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")


def test_folder_run_end_to_end(tmp_path):
  folder = tmp_path / "images"
  write_folder(folder)
  workdir = tmp_path / "run"
  result = run_train(workdir, config=f"configs/folder.py:{folder},8,2", num_steps=2,
                     checkpoint__every_steps=2, sample__every_steps=2, model__dtype="float32",
                     batch_size=12, data__random_flip=True)
  assert_ok(result)
  assert checkpoint_steps(workdir) == [2]
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
  assert grid.shape[2] == 3 and grid.shape[0] == 2 * (8 * 8 + 1) + 1  # one row per class
  assert "broken.jpg" in result.stderr  # the unreadable file is named, and skipped


def test_init_from_imported_official_weights(tmp_path):
  import jax
  from dit_jax import convert
  from dit_jax.convert import save_torch_checkpoint
  from dit_jax.models import create_model, init_params

  model = create_model("S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  params = init_params(model, jax.random.key(7))
  params = jax.tree.map(lambda p: p + 0.01, params)  # distinct from any fresh init
  pt = tmp_path / "official.pt"
  save_torch_checkpoint(params, model, str(pt))
  ckpt = tmp_path / "imported"
  # The import, called as its command line is (test_convert runs the command itself).
  convert.main(["--torch", str(pt), "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
                "--num-heads", "2", "--image-size", "64", "--in-channels", "1", "--num-classes",
                "10", "--out", str(ckpt)])
  workdir = tmp_path / "finetune"
  # The tiny config's own optimizer (so its compiled step serves this run too): its warmup
  # starts at learning rate 0, so step 1 leaves the weights as they were imported.
  assert_ok(run_train(workdir, num_steps=1, checkpoint__every_steps=1, init_from=str(ckpt)))
  assert read_metrics(workdir)[0]["train/learning_rate"] == 0.0
  state = restore_state(workdir)
  assert_states_equal(state["params"], jax.tree.map(np.asarray, params), atol=0.0)
  # A model of another size is refused (while the checkpoint is there: not for its absence).
  bad = run_train(tmp_path / "bad", num_steps=1, init_from=str(ckpt), model__hidden_size=64,
                  model__num_heads=4)
  assert bad.returncode != 0 and "config.init_from" in bad.stderr
  assert "the config asks for" in bad.stderr.strip().splitlines()[-1], bad.stderr[-3000:]
  # Resuming reads the workdir's checkpoint, not init_from: it may be gone by then.
  shutil.rmtree(ckpt)
  assert_ok(run_train(workdir, num_steps=2, checkpoint__every_steps=1, init_from=str(ckpt)))
  assert restore_state(workdir)["step"] == 2


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  result = run_train(tmp_path, num_steps=20, checkpoint__every_steps=1,
                     optimizer__learning_rate=1e30, optimizer__warmup_steps=0,
                     optimizer__grad_clip_norm=0.0)
  assert result.returncode != 0
  line = result.stderr.strip().splitlines()[-1]
  assert "non-finite loss" in line and "at step" in line
  bad_step = int(line.split("at step ")[1].split(":")[0])
  # The step as metrics.jsonl numbers it: the rows before it are finite, it has none.
  rows = read_metrics(tmp_path)
  assert [m["step"] for m in rows] == list(range(1, bad_step))
  assert all(np.isfinite(m["train/loss"]) for m in rows)
  # It names the last good checkpoint: the newest there is, from before the bad step.
  assert line.endswith(f"the last good checkpoint is step {bad_step - 1} "
                       f"({tmp_path / 'checkpoints' / str(bad_step - 1)})")
  assert max(checkpoint_steps(tmp_path)) == bad_step - 1
  # Every checkpoint kept is from before the bad step, and finite.
  for step in checkpoint_steps(tmp_path):
    assert step <= bad_step
    values = flat(restore_state(tmp_path, step)).values()
    assert all(np.all(np.isfinite(v)) for v in values if np.issubdtype(v.dtype, np.floating))


def test_a_damaged_newest_checkpoint_is_skipped_by_sampling_and_training(tmp_path):
  workdir = tmp_path / "run"
  assert_ok(run_train(workdir, num_steps=6))  # checkpoints 3 and 6
  # Truncated data files: every large one, since which file holds the EMA parameters that
  # sampling reads depends on the order of orbax's concurrent writes.
  data = [p for p in (workdir / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir()
          if p.stat().st_size > 1000]
  assert data
  for path in data:
    path.write_bytes(path.read_bytes()[:1000])
  unfinished = workdir / "checkpoints" / "9.orbax-checkpoint-tmp-99"  # a save that never ended
  shutil.copytree(workdir / "checkpoints" / "3", unfinished)
  grid = tmp_path / "grid.png"
  sampled = subprocess.run(
      [os.sys.executable, str(ROOT / "sample.py"), f"--checkpoint={workdir}", f"--out={grid}",
       "--sampler=ddim", "--num_steps=2", "--classes=0,1", "--per_class=2"], cwd=ROOT,
      capture_output=True, text=True, timeout=300, env=env_with_devices(1))
  assert sampled.returncode == 0 and grid.exists(), sampled.stderr[-3000:]
  reported = [line for line in sampled.stderr.splitlines() if "cannot be read" in line]
  assert len(reported) == 1 and "checkpoint: step 6 of" in reported[0], sampled.stderr[-3000:]
  assert "OUT_OF_RANGE" in reported[0]  # the real error, not 'Event loop is closed'
  assert "Traceback" not in sampled.stderr and "Event loop" not in sampled.stderr
  assert unfinished.exists()  # sampling writes nothing

  resumed = run_train(workdir, num_steps=6)
  assert_ok(resumed)
  assert "Traceback" not in resumed.stderr and "Event loop" not in resumed.stderr
  for text in (f"removed {unfinished}", "step 6 of", "moved the unreadable step 6 to "
               f"{workdir / 'unreadable_checkpoints' / '6'}; training resumes from step 3"):
    assert sum(text in line for line in resumed.stderr.splitlines()) == 1, text
  assert not unfinished.exists() and (workdir / "unreadable_checkpoints" / "6" / "state").is_dir()
  assert checkpoint_steps(workdir) == [3, 6] and int(restore_state(workdir, 6)["step"]) == 6
  assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 7))


def test_missing_dataset_says_where_and_how(tmp_path):
  result = run_train(tmp_path / "run", config="configs/imagenet.py:S/2",
                     data__data_dir=str(tmp_path / "tfds"))
  assert result.returncode != 0
  message = result.stderr[result.stderr.rindex("error: "):]  # where the data goes, how to build it
  assert str(tmp_path / "tfds") in message and "dit_jax.data.prepare imagenet2012" in message
  assert "downloads/manual" in message
  assert not checkpoint_steps(tmp_path / "run")


def test_latent_config_on_pixels_asks_for_the_vae(tmp_path):
  folder = tmp_path / "images"
  write_folder(folder)
  result = run_train(tmp_path / "run", config=f"configs/folder.py:{folder},8,2",
                     model__in_channels=4)
  assert result.returncode != 0 and "VAE" in result.stderr.strip().splitlines()[-1]


def test_workdir_of_another_model_is_refused_untouched(tmp_path):
  assert_ok(run_train(os.path.relpath(tmp_path, ROOT)))  # a relative --workdir works too
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "checkpoints" in p.parts}
  result = run_train(tmp_path, model__hidden_size=64, model__num_heads=4, num_steps=6)
  assert result.returncode != 0
  line = result.stderr.strip().splitlines()[-1]
  assert "different model" in line and "hidden_size" in line
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "checkpoints" in p.parts}
  assert before == after and checkpoint_steps(tmp_path) == [3]

  # The same model with a change that alters training: refused unless accepted, then recorded.
  history = tmp_path / "config_history.jsonl"
  recorded = history.read_text()
  assert [json.loads(row)["from_step"] for row in recorded.splitlines()] == [0]
  changed = run_train(tmp_path, batch_size=32, num_steps=6)
  assert changed.returncode == 1
  line = changed.stderr.strip().splitlines()[-1]
  assert "(batch_size 16 -> 32)" in line and "--config.resume_changes=batch_size " in line
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "checkpoints" in p.parts}
  assert before == after and history.read_text() == recorded
  accepted = run_train(tmp_path, batch_size=32, num_steps=6, resume_changes="batch_size")
  assert_ok(accepted)
  assert ("config: resuming from step 3 with batch_size changed from 16 to 32 "
          "(config.resume_changes)") in accepted.stderr
  rows = [json.loads(row) for row in history.read_text().splitlines()]
  assert [r["from_step"] for r in rows] == [0, 3] and rows[0]["config"]["batch_size"] == 16
  assert rows[1]["changes"]["batch_size"] == [16, 32] and checkpoint_steps(tmp_path) == [3, 6]


def test_config_typo_fails(tmp_path):
  result = run_train(tmp_path, model__hiden_size=3)
  assert result.returncode != 0 and "hiden_size" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_fixture_dir_is_available():
  assert fixture_path("dit_reference", "tiny_dit.pt").exists()


def test_latent_training_from_extracted_latents_and_on_the_fly(tmp_path):
  """A tiny image folder -> latents with the tiny VAE -> three training steps -> a decoded grid."""
  folder = tmp_path / "images"
  write_folder(folder, sizes=((20, 18), (16, 24), (32, 32)))
  vae = str(fixture_path("vae_reference", "tiny_vae"))  # 2x downsampling, 4 latent channels
  latents = tmp_path / "latents"
  config = f"--config={ROOT / 'configs/folder.py'}:{folder},16,2"
  extract = subprocess.run([os.sys.executable, "-m", "dit_jax.latents.extract", config,
                            f"--vae={vae}", f"--out={latents}", "--batch_size=4"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env_with_devices(1))
  assert extract.returncode == 0, extract.stderr[-3000:]
  common = dict(config=f"configs/folder.py:{folder},16,2", model__in_channels=4,
                model__input_size=8, model__dtype="float32", batch_size=4,
                sample__every_steps=3, sample__guidance_channels=3, vae__path=vae)
  # From the stored latents, then encoding on the fly: both runs in one process.
  assert_ok(train_utils.run_trains_in_one_process(
      [(tmp_path / "from_latents", dict(latents_dir=str(latents), **common)),
       (tmp_path / "on_the_fly", common)]))
  grid = np.asarray(Image.open(tmp_path / "from_latents" / "samples" / "step_0000003.png"))
  assert grid.shape == (2 * (4 * 16 + 1) + 1, 8 * (4 * 16 + 1) + 1, 3)  # decoded 16 px images
  assert int(restore_state(tmp_path / "on_the_fly")["step"]) == 3
  losses = [m["train/loss"] for m in read_metrics(tmp_path / "from_latents")]
  assert len(losses) == 3 and all(np.isfinite(losses))
