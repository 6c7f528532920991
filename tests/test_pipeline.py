"""Model + diffusion together: the official guided DDIM loop, training loss, configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_rel_close, fixture_path, nchw_to_nhwc
from configs import imagenet, tiny
from dit_jax.convert import load_torch_checkpoint
from dit_jax.diffusion import create_diffusion
from dit_jax.models import VARIANTS, DiT, build_model, count_params, init_params
from dit_jax.samplers.ddim import ddim_sample_loop
from dit_jax.samplers.ddpm import p_sample_loop


@pytest.fixture(scope="module")
def tiny_setup():
  model = build_model(tiny.get_config().model)
  params = load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), model)
  return model, params


def guided_model_fn(model, params, guidance_channels=3):
  def model_fn(x, t, y, cfg_scale):
    return model.apply({"params": params}, x, t, y, cfg_scale,
                       guidance_channels=guidance_channels, method=DiT.forward_with_cfg)
  return model_fn


def test_guided_ddim_loop_matches_official(dit_ref, tiny_setup):
  model, params = tiny_setup
  diffusion = create_diffusion(str(dit_ref["ddim_spacing"]))
  np.testing.assert_array_equal(diffusion.timestep_map, dit_ref["ddim_timesteps"])
  model_fn = guided_model_fn(model, params)
  kwargs = dict(y=jnp.asarray(dit_ref["ddim_y"]), cfg_scale=float(dit_ref["ddim_cfg_scale"]))
  sample = jax.jit(lambda noise: ddim_sample_loop(diffusion,
      model_fn, noise, eta=0.0, clip_denoised=False, model_kwargs=kwargs))(
          jnp.asarray(nchw_to_nhwc(dit_ref["ddim_noise"])))
  assert_rel_close(sample, nchw_to_nhwc(dit_ref["ddim_out"]), name="ddim_out")


def test_ddpm_loop_with_model_is_deterministic_and_finite(tiny_setup):
  model, params = tiny_setup
  diffusion = create_diffusion("25")
  model_fn = guided_model_fn(model, params, guidance_channels=None)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  noise = jnp.concatenate([z, z])
  kwargs = dict(y=jnp.array([1, 2, 10, 10]), cfg_scale=4.0)
  run = jax.jit(lambda n, key: p_sample_loop(diffusion, model_fn, n, key, clip_denoised=False,
                                              model_kwargs=kwargs))
  a = run(noise, jax.random.key(1))
  b = run(noise, jax.random.key(1))
  c = run(noise, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(a)) and not np.allclose(a, c)
  # The second half is only a carrier: the next step feeds the first half to both halves.
  assert a.shape == (4, 8, 8, 4)


def test_training_loss_gradient_flows_through_model(tiny_setup):
  model, params = tiny_setup
  diffusion = create_diffusion("")
  x0 = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
  t = jnp.array([0, 10, 500, 999])
  y = jnp.array([0, 1, 2, 3])

  def loss_fn(p):
    model_fn = lambda x, tt, y: model.apply({"params": p}, x, tt, y)  # noqa: E731
    terms = diffusion.training_losses(model_fn, x0, t, model_kwargs=dict(y=y),
                                      rng=jax.random.key(1))
    return terms["loss"].mean(), terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(loss, (terms["mse"] + terms["vb"]).mean(), rtol=1e-6)
  grad_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  assert np.isfinite(grad_norm) and grad_norm > 0


@pytest.mark.parametrize("variant", [v.removeprefix("DiT-") for v in VARIANTS])
def test_imagenet_config_builds_each_variant(variant):
  config = imagenet.get_config(variant)
  model = build_model(config.model)
  assert model.input_size == 32 and model.scan_blocks and model.dtype == jnp.bfloat16
  assert model.hidden_size == VARIANTS[f"DiT-{variant}"]["hidden_size"]


def test_imagenet_512_config():
  model = build_model(imagenet.get_config("XL/2,512").model)
  assert model.input_size == 64 and model.num_tokens == 1024
  # The 512 px model differs only in the (fixed, untrained) position table: same parameters.
  assert count_params(model) == 674_834_720


def test_tiny_config_is_the_fixture_architecture(dit_ref, tiny_setup):
  model, params = tiny_setup
  out = model.apply({"params": params}, nchw_to_nhwc(dit_ref["fwd_x"]), dit_ref["fwd_t"],
                    dit_ref["fwd_y"])
  assert_rel_close(out, nchw_to_nhwc(dit_ref["fwd_out"]), name="tiny config fwd_out")


def test_config_errors_name_the_key():
  config = imagenet.get_config("B/4")
  config.lock()  # as config_flags.DEFINE_config_file(..., lock_config=True) does
  with pytest.raises(AttributeError, match="hiden_size"):
    config.model.hiden_size = 3  # a typo in --config.model.hiden_size fails
  model_config = dict(config.model)
  model_config["dtype"] = "float8"
  with pytest.raises(ValueError, match=r"^config\.model\.dtype:"):
    build_model(model_config)
  with pytest.raises(ValueError, match="^variant:"):
    build_model(dict(config.model, variant="Q/2"))
  with pytest.raises(ValueError, match=r"^config\.model: unknown key"):
    build_model(dict(config.model, widht=3))


def test_init_then_train_step_changes_only_through_gradients():
  """The zero-initialized adaLN output still receives gradient (adaLN-Zero is trainable)."""
  model = build_model(tiny.get_config().model)
  params = init_params(model, jax.random.key(0))
  diffusion = create_diffusion("")
  x0 = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))

  def loss(p):
    fn = lambda x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
    return diffusion.training_losses(fn, x0, jnp.array([5, 50, 500, 900]),
                                     model_kwargs=dict(y=jnp.arange(4)),
                                     rng=jax.random.key(3))["loss"].mean()

  grads = jax.grad(loss)(params)
  assert np.abs(np.asarray(grads["final_layer"]["linear"]["kernel"])).max() > 0
  # Blocks' gates start at zero, so before the first update only the final layer (and the
  # adaLN modulations feeding it) get gradient: the blocks' qkv does not.
  assert np.abs(np.asarray(grads["blocks_0"]["attn"]["qkv"]["kernel"])).max() == 0
