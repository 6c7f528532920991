"""The train step's seams: the process's loss terms (every loss of the official code trains),
what is logged of them, and what each input pipeline hands the step (its spec and x0)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.diffusion import create_diffusion, process_from_config
from dit_jax.models import build_model
from dit_jax.train import state as state_lib
from test_train_units import jit_train_step, tiny_config


# Every loss of the official code: config overrides, and the terms the step must log.
LOSS_VARIANTS = {
    "hybrid": ({}, {"loss", "mse", "vb"}),
    "use_kl": ({"diffusion.use_kl": True}, {"loss", "vb"}),
    "predict_xstart": ({"diffusion.predict_xstart": True}, {"loss", "mse", "vb"}),
    "fixed_large_sigma": ({"model.learn_sigma": False}, {"loss", "mse"}),
    "sigma_small": ({"model.learn_sigma": False, "diffusion.sigma_small": True},
                    {"loss", "mse"}),
    # 100 steps, so that the rescaling (steps / 1000) shows.
    "rescale_learned_sigmas": ({"diffusion.rescale_learned_sigmas": True,
                                "diffusion.diffusion_steps": 100}, {"loss", "mse", "vb"}),
}


def digits_batch(size: int) -> dict[str, jax.Array]:
  """The first `size` digits in [-1, 1] (learnable, unlike uniform noise, also as x_0)."""
  from dit_jax.data import DigitsSource, to_float
  source = DigitsSource()
  images, labels = zip(*(source.get(i) for i in range(size)))
  return {"images": jnp.asarray(to_float(np.stack(images))), "labels": jnp.asarray(labels)}


@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_every_loss_variant_trains(variant):
  """Each loss trains (use_kl crashed the first step with KeyError: 'mse'), logs its own terms,
  and its first step's loss is the official `training_losses` at the step's t and noise."""
  from dit_jax.models import LABEL_DROPOUT_RNG
  from dit_jax.train.step import step_keys

  overrides, terms = LOSS_VARIANTS[variant]
  config = tiny_config()
  config.optimizer.warmup_steps = 0
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  model = build_model(config.model)
  tx, step = jit_train_step(config, model)
  state = state_lib.init_state(jax.random.key(0), model=model, tx=tx)
  initial = state.params
  batch = digits_batch(16)
  rng = jax.random.key(2)
  state, metrics = step(state, batch, rng)
  assert set(metrics) == terms | {"grad_norm", "param_norm", "learning_rate"}

  # The same step through the official code path: create_diffusion(**config.diffusion), with
  # the model's learn_sigma (the process derives it from the model).
  diffusion = create_diffusion("", learn_sigma=config.model.learn_sigma, **config.diffusion)
  _, loss_rng, dropout_rng = step_keys(rng, 0)
  t_rng, noise_rng = jax.random.split(loss_rng)
  t = jax.random.randint(t_rng, (16,), 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, batch["images"].shape)
  model_fn = functools.partial(model.apply, {"params": initial}, train=True,
                               rngs={LABEL_DROPOUT_RNG: dropout_rng})
  want = diffusion.training_losses(model_fn, batch["images"], t, {"y": batch["labels"]},
                                   noise=noise)
  assert set(want) == terms
  for name in terms:
    np.testing.assert_allclose(metrics[name], want[name].mean(), rtol=2e-5, err_msg=name)

  # Training lowers the loss at fixed draws of t and noise.
  process = process_from_config(config)
  built = process.diffusion()  # the sampling side too: the same variance and prediction
  assert (built.loss_type, built.model_mean_type, built.model_var_type) == (
      diffusion.loss_type, diffusion.model_mean_type, diffusion.model_var_type)

  def fixed_loss(params):
    fn = functools.partial(model.apply, {"params": params})
    return float(process.loss_terms(fn, batch["images"], jax.random.key(3),
                                    {"y": batch["labels"]})["loss"].mean())

  losses = [float(metrics["loss"])]
  for _ in range(29):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  before, after = fixed_loss(initial), fixed_loss(state.params)
  assert after < 0.8 * before, (before, after)


def test_process_from_config_records_the_sampling_settings_only():
  """The loss settings choose the loss, not what sampling must match: checkpoints keep the
  format they had, and a process that differs only in its loss is the same process."""
  config = tiny_config()
  config.diffusion.use_kl = True
  process = process_from_config(config)
  assert process.to_dict() == {"noise_schedule": "linear", "diffusion_steps": 1000,
                               "learn_sigma": True, "sigma_small": False,
                               "predict_xstart": False}
  assert process == process_from_config(tiny_config())
  assert process.diffusion().loss_type.name == "RESCALED_KL"
  # learn_sigma is the model's: one key, not two that must agree.
  config.model.learn_sigma = False
  assert not process_from_config(config).learn_sigma
  assert "learn_sigma" not in config.diffusion


def test_reporter_logs_whatever_terms_the_process_returns(tmp_path, caplog):
  import json
  import logging
  from dit_jax.train.reporting import Reporter

  config = tiny_config()
  config.tensorboard, config.log_every_steps = False, 1
  reporter = Reporter(config, str(tmp_path), build_model(config.model), start_step=0)
  optimizer = {"grad_norm": 0.5, "param_norm": 9.0, "learning_rate": 1e-3}
  with caplog.at_level(logging.INFO):
    reporter.step(1, {"loss": 2.5, "vb": 0.0025, **optimizer}, None)  # use_kl's terms
    reporter.step(2, {"loss": 0.25, "mse": 0.2, "vb": 0.05, **optimizer}, None)  # hybrid
  reporter.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert lines[0].startswith("step 1/4000: loss 2.5 (vb 0.0025), grad_norm 0.5, lr 0.001, ")
  assert lines[1].startswith("step 2/4000: loss 0.25 (mse 0.2, vb 0.05), grad_norm 0.5, ")
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [sorted(k for k in row if k.startswith("train/") and not k.endswith("_sec"))
          for row in rows] == [
      ["train/grad_norm", "train/learning_rate", "train/loss", "train/param_norm", "train/vb"],
      ["train/grad_norm", "train/learning_rate", "train/loss", "train/mse", "train/param_norm",
       "train/vb"]]
  assert rows[0]["train/vb"] == 0.0025 and rows[1]["train/mse"] == 0.2


class FakeLatentSource:
  """What `LatentPipeline` reads of a `LatentSource` before any record: no directory needed."""
  moments_shape = (4, 4, 8)
  num_classes = 10

  def __init__(self, scaling_factor: float, shift_factor=None):
    self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

  def __len__(self) -> int:
    return 6

  def close(self) -> None:
    pass


def test_pipelines_give_the_step_x0_and_the_spec_of_a_global_batch():
  from conftest import fixture_path
  from dit_jax.data import DigitsSource, InputPipeline
  from dit_jax.latents import LatentPipeline
  from dit_jax.vae import AutoencoderKL, load_diffusers_vae

  order = dict(global_batch_size=2, seed=0, random_flip=False, num_threads=0, prefetch=0)
  latents = LatentPipeline(FakeLatentSource(0.18215), **order)
  assert latents.element_spec == {"moments": jax.ShapeDtypeStruct((2, 4, 4, 8), np.float32),
                                  "labels": jax.ShapeDtypeStruct((2,), np.int32)}
  assert latents.frozen is None
  mean = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  # A (near) zero variance posterior gives its mean, times the scaling factor.
  moments = jnp.concatenate([mean, jnp.full_like(mean, -30.0)], axis=-1)
  out = latents.x0({"moments": moments, "labels": jnp.zeros(2)}, jax.random.key(1))
  np.testing.assert_allclose(out, mean * 0.18215, atol=1e-6)
  # A VAE with a shift (as encode_to_latents): shifted, then scaled.
  shifted = LatentPipeline(FakeLatentSource(0.5, shift_factor=0.25), **order)
  np.testing.assert_allclose(shifted.x0({"moments": moments}, jax.random.key(1)),
                             (mean - 0.25) * 0.5, atol=1e-6)
  # A unit variance posterior adds unit noise (before scaling).
  moments = jnp.concatenate([jnp.zeros_like(mean), jnp.zeros_like(mean)], axis=-1)
  noise = LatentPipeline(FakeLatentSource(1.0), **order).x0({"moments": moments},
                                                              jax.random.key(1))
  assert 0.7 < float(jnp.std(noise)) < 1.3

  pixels_pipeline = InputPipeline(DigitsSource(), image_size=16, **order)
  assert pixels_pipeline.element_spec["images"] == jax.ShapeDtypeStruct((2, 16, 16, 1),
                                                                        np.float32)
  images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(pixels_pipeline.x0({"images": images}, jax.random.key(1)),
                                images)
  config, params = load_diffusers_vae(str(fixture_path("vae_reference", "tiny_vae")))
  vae = AutoencoderKL(config)
  on_the_fly = InputPipeline(DigitsSource(), image_size=16, encode=vae.encode_to_latents,
                             encode_params=params, **order)
  assert on_the_fly.frozen is params
  encoded = jax.jit(on_the_fly.x0)({"images": images}, jax.random.key(1), params)
  np.testing.assert_allclose(encoded, vae.encode_to_latents(params, images, jax.random.key(1)),
                             rtol=1e-5, atol=1e-6)
  assert encoded.shape == (2, 8, 8, 4)
