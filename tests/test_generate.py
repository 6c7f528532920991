"""Sampling: determinism, guidance, resumable chunked generation, the .npz layout, sample.py."""
import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dit_jax import generate, npz_samples, samplers
from dit_jax.diffusion import OFFICIAL_PROCESS
from dit_jax.models import DiT, create_model, init_params
from train_utils import ROOT, env_with_devices, run_train

SPEC = generate.SamplingSpec(sampler="ddim", num_steps=5, cfg_scale=2.0, guidance_channels=None,
                             clip_denoised=True, seed=3)


@pytest.fixture(scope="module")
def pixel_model():
  model = create_model("S/2", input_size=8, in_channels=3, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  params = init_params(model, jax.random.key(0))
  # Give the zero-initialized layers weights, so that outputs depend on labels and noise.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        params)
  return model, params


def test_grid_is_deterministic_per_seed(pixel_model):
  model, params = pixel_model
  a, grid = generate.sample_grid(model, params, SPEC, [1, 2, 3], per_class=2)
  b, _ = generate.sample_grid(model, params, SPEC, [1, 2, 3], per_class=2)
  c, _ = generate.sample_grid(model, params, generate.SamplingSpec(**{**SPEC.__dict__, "seed": 4}),
                              [1, 2, 3], per_class=2)
  assert a.dtype == np.uint8 and a.shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert grid.shape == (3 * (8 * 8 + 1) + 1, 2 * (8 * 8 + 1) + 1, 3)
  with pytest.raises(ValueError, match="^--classes:"):
    generate.sample_grid(model, params, SPEC, [10], per_class=1)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_guidance_scale_one_equals_unguided(pixel_model, sampler):
  model, params = pixel_model
  labels = jnp.array([1, 5])
  noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

  def guided(x, t, y):
    return model.apply({"params": params}, x, t, y, 1.0, guidance_channels=None,
                       method=DiT.forward_with_cfg)

  def plain(x, t, y):
    return model.apply({"params": params}, x, t, y)

  kw = dict(eta=0.0, num_steps=10, clip_denoised=False)
  out_guided = samplers.run(samplers.get(sampler)(
      OFFICIAL_PROCESS, guided, jnp.concatenate([noise, noise]), jax.random.key(1),
      model_kwargs={"y": jnp.array([1, 5, 10, 10])}, **kw))
  out_plain = samplers.run(samplers.get(sampler)(
      OFFICIAL_PROCESS, plain, noise, jax.random.key(1), model_kwargs={"y": labels}, **kw))
  np.testing.assert_allclose(out_guided[:2], out_plain, rtol=1e-4, atol=1e-5)


def test_chunked_generation_resumes_exactly(tmp_path, pixel_model):
  model, params = pixel_model
  full = tmp_path / "full.npz"
  npz_samples.generate_npz(model, params, SPEC, 10, str(full), batch_size=4, keep_parts=True,
                        progress=False)
  with np.load(full) as data:
    images, labels = data["arr_0"], data["arr_1"]
  assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
  assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 10
  assert len(set(labels.tolist())) > 1  # random classes
  # An interruption: the last chunks and the final file were never written.
  full.unlink()
  (tmp_path / "full.npz.parts" / "part_000002.npz").unlink()
  (tmp_path / "full.npz.parts" / "part_000001.npz").unlink()
  npz_samples.generate_npz(model, params, SPEC, 10, str(full), batch_size=4, progress=False)
  with np.load(full) as data:
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["arr_1"], labels)
  assert not (tmp_path / "full.npz.parts").exists()
  with pytest.raises(FileExistsError, match="--npz"):
    npz_samples.generate_npz(model, params, SPEC, 10, str(full), batch_size=4, progress=False)


def test_latents_without_vae_are_refused():
  with pytest.raises(ValueError, match="VAE"):
    generate.to_images(np.zeros((1, 4, 4, 4), np.float32))
  gray = generate.to_images(np.zeros((1, 4, 4, 1), np.float32))
  assert gray.shape == (1, 4, 4, 3) and np.all(gray == 128)


@pytest.mark.slow  # an end-to-end run of the program
def test_sample_py_on_a_training_workdir(tmp_path):
  """sample.py on a workdir; with the run's sampler settings it redraws the run's last grid."""
  trained = run_train(tmp_path / "run", sample__every_steps=3, sample__classes="(0,1,2)",
                      sample__per_class=4, sample__sampler="dpm-solver++", sample__num_steps=5,
                      sample__cfg_scale=3.0)
  assert trained.returncode == 0, trained.stderr[-3000:]
  grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
  cmd = [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'run'}",
         "--sampler=dpm-solver++", "--num_steps=5", "--cfg_scale=3", "--classes=0,1,2",
         "--per_class=4", f"--out={grid}", "--num_samples=6", f"--npz={npz}", "--batch_size=4"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env_with_devices(1))
  assert result.returncode == 0, result.stderr[-3000:]
  pixels = np.asarray(Image.open(grid))
  # One grid layout: a row per class, 4 columns, RGB, 8x8 cells magnified 8x, 1 px of gray 128.
  assert pixels.shape == (3 * (8 * 8 + 1) + 1, 4 * (8 * 8 + 1) + 1, 3)
  assert np.all(pixels[0] == 128) and np.all(pixels[:, 65] == 128)
  from_training = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_0000003.png"))
  np.testing.assert_array_equal(pixels, from_training)
  with np.load(npz) as data:
    assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_1"].shape == (6,)
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env_with_devices(1))
  assert again.returncode != 0 and "refusing to overwrite" in again.stderr


def grids_of_a_tiny_run(run: pathlib.Path, grid: pathlib.Path, sampler: str):
  """(sample.py's grid, checked equal to training's grid of step 3; `by_hand(process)`: the
  grid of the run's EMA weights sampled with `process` in-process, 4 steps, scale 2)."""
  from train_utils import restore_state
  from_sample_py = np.asarray(Image.open(grid))
  from_training = np.asarray(Image.open(run / "samples" / "step_0000003.png"))
  np.testing.assert_array_equal(from_sample_py, from_training)
  model = create_model("S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2, learn_sigma=False)
  params = restore_state(run)["ema_params"]

  def by_hand(process):
    spec = generate.SamplingSpec(sampler=sampler, num_steps=4, cfg_scale=2.0,
                                 guidance_channels=None, clip_denoised=True, process=process)
    return generate.sample_grid(model, params, spec, [0, 1], per_class=2)[1]
  return from_sample_py, by_hand


@pytest.mark.slow  # an end-to-end run of the program
def test_sample_py_samples_with_the_process_the_model_was_trained_with(tmp_path):
  """Every non-default process setting at once: training's grid, sample.py's grid and a grid
  sampled with the process built by hand agree; reverting any one setting changes the grid."""
  from dit_jax.diffusion import DiffusionProcess
  process = DiffusionProcess(noise_schedule="squaredcos_cap_v2", diffusion_steps=500,
                             learn_sigma=False, sigma_small=True, predict_xstart=True)
  # learn_sigma is the model's setting (model__learn_sigma below); the process derives it.
  settings = {f"diffusion__{k}": v for k, v in process.to_dict().items() if k != "learn_sigma"}
  # No warmup, a large step and EMA = the raw weights: 3 steps give outputs that depend on the
  # process (a fresh DiT's zero output layer draws gray under any x0-predicting process).
  trained = run_train(tmp_path / "run", model__learn_sigma=False, optimizer__warmup_steps=0,
                      optimizer__learning_rate=0.01, ema_decay=0.0, sample__every_steps=3,
                      sample__classes="(0,1)", sample__per_class=2, sample__sampler="ddpm",
                      sample__num_steps=4, sample__cfg_scale=2.0, **settings)
  assert trained.returncode == 0, trained.stderr[-3000:]
  grid = tmp_path / "grid.png"
  result = subprocess.run(
      [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'run'}",
       "--sampler=ddpm", "--num_steps=4", "--cfg_scale=2", "--classes=0,1", "--per_class=2",
       f"--out={grid}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=env_with_devices(1))
  assert result.returncode == 0, result.stderr[-3000:]
  from_sample_py, by_hand = grids_of_a_tiny_run(tmp_path / "run", grid, "ddpm")
  np.testing.assert_array_equal(from_sample_py, by_hand(process))
  default = DiffusionProcess(learn_sigma=False)
  for field in ("noise_schedule", "diffusion_steps", "sigma_small", "predict_xstart"):
    other = by_hand(dataclasses.replace(process, **{field: getattr(default, field)}))
    assert not np.array_equal(other, from_sample_py), field


@pytest.mark.slow  # an end-to-end run of the program
def test_sample_py_samples_a_flow_checkpoint_without_a_sampler_flag(tmp_path):
  """A flow run (gvp path): sample.py, given no --sampler, samples it with the
  flow's default sampler and the recorded process, redrawing training's grid; the settings
  matter; a diffusion sampler is refused in one line and writes nothing."""
  from dit_jax.diffusion import FlowProcess
  process = FlowProcess(path="gvp")
  # Velocity prediction: 3 steps leave a velocity away from adaLN-Zero's zero, but not so far
  # that every sample saturates (a noise or score prediction would divide by alpha ~ 0 near the
  # noise end).
  trained = run_train(tmp_path / "run", process="flow", flow__path="gvp", model__learn_sigma=False,
                      optimizer__warmup_steps=0, optimizer__learning_rate=0.003, ema_decay=0.0,
                      sample__every_steps=3, sample__classes="(0,1)", sample__per_class=2,
                      sample__sampler="ode-heun", sample__num_steps=4, sample__cfg_scale=2.0)
  assert trained.returncode == 0, trained.stderr[-3000:]

  def sample_py(*flags):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"),
                           f"--checkpoint={tmp_path / 'run'}", "--cfg_scale=2", "--classes=0,1",
                           "--per_class=2", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env_with_devices(1))
  grid = tmp_path / "grid.png"
  result = sample_py("--num_steps=4", f"--out={grid}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {grid} (ode-heun, 4 model evaluations a sample)" in result.stderr
  from_sample_py, by_hand = grids_of_a_tiny_run(tmp_path / "run", grid, "ode-heun")
  np.testing.assert_array_equal(from_sample_py, by_hand(process))
  # A velocity model's ODE does not depend on the path (only training does); its prediction
  # and sampling interval do.
  for other in (FlowProcess(path="gvp", sample_eps=0.3),
                FlowProcess(path="gvp", prediction="noise")):
    assert not np.array_equal(by_hand(other), from_sample_py), other

  refused = sample_py("--sampler=ddpm", f"--out={tmp_path / 'ddpm.png'}")
  assert refused.returncode == 1 and not (tmp_path / "ddpm.png").exists()
  assert refused.stderr.strip().splitlines()[-1] == (
      "error: --sampler: 'ddpm' samples diffusion processes, not this flow (flow matching, gvp "
      "path, velocity prediction); the flow samplers: ode-euler, ode-heun, ode-dopri5, sde-euler")


@pytest.mark.slow  # an end-to-end run of the program
def test_sample_py_decodes_latents_with_the_vae(tmp_path):
  from conftest import fixture_path
  ckpt = tmp_path / "ckpt"
  subprocess.run([sys.executable, "-m", "dit_jax.convert", "--torch",
                  str(fixture_path("dit_reference", "tiny_dit.pt")), "--model", "DiT-S/2",
                  "--depth", "1", "--hidden-size", "64", "--num-heads", "4", "--image-size",
                  "64", "--num-classes", "10", "--out", str(ckpt)], check=True, cwd=ROOT,
                 capture_output=True)
  base = [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={ckpt}", "--sampler=ddim",
          "--num_steps=3", "--classes=1,2", "--per_class=2"]
  missing = subprocess.run(base + [f"--out={tmp_path / 'x.png'}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env_with_devices(1))
  assert missing.returncode != 0 and "--vae" in missing.stderr
  vae = str(fixture_path("vae_reference", "tiny_vae"))  # 2x downsampling: 8x8 latents -> 16 px
  result = subprocess.run(base + [f"--vae={vae}", f"--out={tmp_path / 'g.png'}",
                                  "--num_samples=3", "--batch_size=2",
                                  f"--npz={tmp_path / 's.npz'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env_with_devices(1))
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / "s.npz") as data:
    assert data["arr_0"].shape == (3, 16, 16, 3) and data["arr_0"].dtype == np.uint8
  assert np.asarray(Image.open(tmp_path / "g.png")).shape[:2] == (2 * (4 * 16 + 1) + 1,
                                                                 2 * (4 * 16 + 1) + 1)


def test_guidance_is_applied_with_and_without_batch_sharding(pixel_model):
  """make_sample_fn guides alike with and without a batch sharding."""
  from dit_jax.samplers.guidance import make_sample_fn
  model, params = pixel_model
  labels = np.array([0, 3, 7, 9], np.int32)
  kwargs = dict(sampler="ddim", num_steps=5, guidance_channels=None, clip_denoised=True)
  plain = make_sample_fn(model, cfg_scale=3.0, **kwargs)(params, labels, jax.random.key(0))
  sharded, nfe = generate.sharded_sampler(model, generate.SamplingSpec(cfg_scale=3.0, **kwargs), 4)(
      params, labels, jax.random.key(0))
  assert int(nfe) == 5  # one guided evaluation per step covers the doubled batch
  unguided = make_sample_fn(model, cfg_scale=1.0, **kwargs)(params, labels, jax.random.key(0))
  np.testing.assert_allclose(plain, sharded, rtol=1e-5, atol=1e-6)
  assert not np.allclose(plain, unguided, atol=1e-3)
