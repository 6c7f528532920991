"""Tests of dit_jax.diffusion: parity with the official DiT diffusion code, plus JAX properties."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rel_close, nchw_to_nhwc

from dit_jax.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from dit_jax.samplers.ddim import (ddim_reverse_sample, ddim_reverse_sample_loop, ddim_sample,
                                   ddim_sample_loop)
from dit_jax.noise import standard_normal
from dit_jax.samplers.ddpm import p_sample_loop

TABLES = ["betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2"]


def _recording_model(output, calls):
  """A model_fn that returns a fixed output and records the timesteps (and kwargs) it got."""
  def model_fn(x, t, **kwargs):
    calls.append((t, kwargs))  # concrete when called eagerly
    assert x.shape[:-1] == output.shape[:-1]
    return jnp.asarray(output)
  return model_fn


# ------------------------------------------------------------------------------------------------
# Schedules and respacing.

@pytest.mark.parametrize("name", TABLES)
def test_tables_match_reference(dit_ref, name):
  diffusion = create_diffusion("")
  table = getattr(diffusion, name)
  assert table.dtype == np.float64
  assert_rel_close(table, dit_ref[f"diff_{name}"], rtol=1e-12, name=name)
  assert diffusion.num_timesteps == 1000
  np.testing.assert_array_equal(diffusion.timestep_map, np.arange(1000))


@pytest.mark.parametrize("key", ["250", "ddim50", "25_15_10", "100", "1000"])
def test_space_timesteps_match_reference(dit_ref, key):
  spec = key.replace("_", ",")
  np.testing.assert_array_equal(sorted(space_timesteps(1000, spec)), dit_ref[f"respace_{key}"])


def test_space_timesteps_list_and_rounding():
  assert space_timesteps(1000, [25, 15, 10]) == space_timesteps(1000, "25,15,10")
  # 10 steps into 4 sections of 3, 3, 2, 2: strides 2, 1, 1, 1 -> rounds 0, 2 / 3 / 6, 7 / 8.
  assert sorted(space_timesteps(10, [2, 1, 2, 1])) == [0, 2, 3, 6, 7, 8]
  assert sorted(space_timesteps(1000, "ddim4")) == [0, 250, 500, 750]


@pytest.mark.parametrize("num_timesteps,spec", [
    (1000, "ddim1"),  # the stride would have to be >= 1000
    (1000, "ddim37"),  # no integer stride gives exactly 37 steps
    (1000, "ddim1001"),
    (10, "11"),  # more steps than the section has
    (10, [3, 6]),  # second section has 5 steps
])
def test_space_timesteps_errors(num_timesteps, spec):
  with pytest.raises(ValueError):
    space_timesteps(num_timesteps, spec)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="cosine"):
    get_named_beta_schedule("cosine", 1000)


def test_respaced_250_matches_reference(dit_ref):
  diffusion = create_diffusion("250")
  assert diffusion.num_timesteps == 250
  assert_rel_close(diffusion.betas, dit_ref["d250_betas"], rtol=1e-12, name="d250_betas")
  np.testing.assert_array_equal(diffusion.timestep_map, dit_ref["d250_timestep_map"])
  assert diffusion.use_timesteps == set(dit_ref["d250_timestep_map"].tolist())
  # Respacing keeps the cumulative alphas of the kept steps.
  base = create_diffusion("")
  assert_rel_close(diffusion.alphas_cumprod, base.alphas_cumprod[diffusion.timestep_map],
                   rtol=1e-12, name="alphas_cumprod")


def test_squaredcos_cap_v2_schedule():
  n = 1000
  betas = get_named_beta_schedule("squaredcos_cap_v2", n)
  assert betas.shape == (n,) and betas.dtype == np.float64
  assert np.all(betas > 0) and np.all(betas <= 0.999)
  assert betas[-1] == 0.999  # the cap is active at the end
  alphas_cumprod = np.cumprod(1.0 - betas)
  assert np.all(np.diff(alphas_cumprod) < 0)

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  # Uncapped, alphas_cumprod[i] telescopes to alpha_bar((i + 1) / n) / alpha_bar(0).
  for i in (0, 10, 500, 900):
    assert alphas_cumprod[i] == pytest.approx(alpha_bar((i + 1) / n) / alpha_bar(0), rel=1e-10)
  diffusion = create_diffusion("", noise_schedule="squaredcos_cap_v2")
  assert_rel_close(diffusion.alphas_cumprod, alphas_cumprod, rtol=1e-12, name="cos ac")


def test_linear_schedule_scales_with_steps():
  betas = get_named_beta_schedule("linear", 250)
  assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


def test_invalid_construction():
  kw = dict(model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE)
  with pytest.raises(ValueError):
    GaussianDiffusion(betas=np.array([0.1, 0.0, 0.2]), **kw)
  with pytest.raises(ValueError):
    GaussianDiffusion(betas=np.full((2, 2), 0.1), **kw)
  with pytest.raises(ValueError, match="^model_mean_type:"):
    GaussianDiffusion(betas=np.full(4, 0.1), model_mean_type=ModelMeanType.PREVIOUS_X,
                      model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)


# ------------------------------------------------------------------------------------------------
# Losses and the model posterior, against the reference.

def test_training_losses_match_reference(dit_ref):
  diffusion = create_diffusion("")
  x_start = nchw_to_nhwc(dit_ref["loss_x_start"])
  noise = nchw_to_nhwc(dit_ref["loss_noise"])
  t = dit_ref["loss_t"]
  assert 0 in t and 1 in t  # decoder NLL and KL branches both exercised
  calls = []
  model_fn = _recording_model(nchw_to_nhwc(dit_ref["loss_model_output"]), calls)
  terms = diffusion.training_losses(model_fn, x_start, t, noise=noise)
  for key in ("loss", "mse", "vb"):
    assert terms[key].shape == (4,)
    assert_rel_close(terms[key], dit_ref[f"loss_{key}"], name=key)
  assert len(calls) == 1
  np.testing.assert_array_equal(calls[0][0], t)

  # Same numbers under jit, with the diffusion object closed over.
  jitted = jax.jit(lambda x, tt, n: diffusion.training_losses(model_fn, x, tt, noise=n))
  terms_jit = jitted(x_start, jnp.asarray(t), noise)
  for key in ("loss", "mse", "vb"):
    assert_rel_close(terms_jit[key], dit_ref[f"loss_{key}"], name=f"jit {key}")


def test_p_mean_variance_matches_reference(dit_ref):
  diffusion = create_diffusion("250")
  x = nchw_to_nhwc(dit_ref["pmv_x"])
  t = dit_ref["pmv_t"]
  calls = []
  model_fn = _recording_model(nchw_to_nhwc(dit_ref["pmv_model_output"]), calls)
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=False)
  for key in ("mean", "variance", "log_variance", "pred_xstart"):
    assert out[key].shape == x.shape
    assert_rel_close(out[key], nchw_to_nhwc(dit_ref[f"pmv_{key}"]), name=key)
  # The model sees the ORIGINAL step numbers, not the respaced indices.
  np.testing.assert_array_equal(calls[0][0], dit_ref["d250_timestep_map"][t])
  np.testing.assert_array_equal(calls[0][0], [0, 4, 497, 999])  # fractional stride 999 / 249


def test_vb_gradient_reaches_only_the_variance_half(dit_ref):
  diffusion = create_diffusion("")
  x_start = nchw_to_nhwc(dit_ref["loss_x_start"])
  noise = nchw_to_nhwc(dit_ref["loss_noise"])
  t = jnp.asarray(dit_ref["loss_t"])
  output = jnp.asarray(nchw_to_nhwc(dit_ref["loss_model_output"]))

  def term(out, key):
    return jnp.sum(diffusion.training_losses(lambda x, tt: out, x_start, t, noise=noise)[key])
  grad_vb = np.asarray(jax.grad(term)(output, "vb"))
  grad_mse = np.asarray(jax.grad(term)(output, "mse"))
  assert np.all(grad_vb[..., :4] == 0)
  assert np.all(np.abs(grad_vb[..., 4:]).sum(axis=(1, 2, 3)) > 0)  # every example, t=0 too
  assert np.all(grad_mse[..., 4:] == 0) and np.abs(grad_mse[..., :4]).sum() > 0


def test_fixed_variances_and_start_x_target():
  x = jnp.linspace(-1.5, 1.5, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  t = np.array([0, 7])
  for sigma_small, table_fn in ((False, lambda d: np.append(d.posterior_variance[1], d.betas[1:])),
                                (True, lambda d: d.posterior_variance)):
    diffusion = create_diffusion("10", learn_sigma=False, sigma_small=sigma_small)
    out = diffusion.p_mean_variance(lambda xx, tt: jnp.zeros_like(xx), x, t)
    expected = np.broadcast_to(table_fn(diffusion)[t].reshape(2, 1, 1, 1), x.shape)
    assert_rel_close(out["variance"], expected, name=f"variance sigma_small={sigma_small}")
    # eps = 0 predicts x0 = x / sqrt(alpha_bar), then clipped.
    expected_x0 = np.clip(np.asarray(x) * diffusion.sqrt_recip_alphas_cumprod[t].reshape(
        2, 1, 1, 1), -1, 1)
    assert_rel_close(out["pred_xstart"], expected_x0, name="pred_xstart")

  diffusion = create_diffusion("10", learn_sigma=False, predict_xstart=True)
  terms = diffusion.training_losses(lambda xx, tt: jnp.zeros_like(xx), x, t, noise=jnp.ones_like(x))
  assert set(terms) == {"loss", "mse"}
  assert_rel_close(terms["mse"], np.mean(np.asarray(x) ** 2, axis=(1, 2, 3)), name="x0 mse")


def test_kl_loss_and_rng_noise(dit_ref):
  x_start = nchw_to_nhwc(dit_ref["loss_x_start"])
  t = dit_ref["loss_t"]
  model_fn = _recording_model(nchw_to_nhwc(dit_ref["loss_model_output"]), [])
  noise = nchw_to_nhwc(dit_ref["loss_noise"])
  kl = create_diffusion("", use_kl=True).training_losses(model_fn, x_start, t, noise=noise)
  mse = create_diffusion("", rescale_learned_sigmas=True).training_losses(
      model_fn, x_start, t, noise=noise)
  # With 1000 steps RESCALED_MSE's vb is unscaled; the KL loss is that vb times 1000.
  assert_rel_close(mse["vb"], dit_ref["loss_vb"], name="rescaled mse vb")
  assert_rel_close(kl["loss"], 1000 * dit_ref["loss_vb"], name="rescaled kl")

  diffusion = create_diffusion("")
  with pytest.raises(ValueError):
    diffusion.training_losses(model_fn, x_start, t)
  key = jax.random.PRNGKey(0)
  a = diffusion.training_losses(model_fn, x_start, t, rng=key)["loss"]
  b = diffusion.training_losses(model_fn, x_start, t,
                                noise=jax.random.normal(key, x_start.shape))["loss"]
  np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# Samplers: one scan, deterministic, exact on an analytic model.

SHAPE = (2, 4, 4, 3)


def _counting_zero_model(counter):
  """eps = 0 and variance value 0 (the middle of the learned range)."""
  def model_fn(x, t, y=None):
    counter.append(1)
    assert t.shape == (x.shape[0],)
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype) + 0.01 * x.mean()
  return model_fn


def test_p_sample_loop_jit_deterministic_single_trace():
  diffusion = create_diffusion("10")
  counter = []
  model_fn = _counting_zero_model(counter)
  sample = jax.jit(lambda noise, key: p_sample_loop(diffusion, model_fn, noise, key))
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  a = sample(noise, jax.random.PRNGKey(2))
  b = sample(noise, jax.random.PRNGKey(2))
  c = sample(noise, jax.random.PRNGKey(3))
  assert len(counter) == 1  # traced once for 10 steps: a scan, not a Python loop
  assert a.shape == SHAPE and np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_ddim_sample_loop_jit_and_eta():
  diffusion = create_diffusion("10")
  counter = []
  model_fn = _counting_zero_model(counter)
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  y = jnp.array([3, 5])

  ddim = jax.jit(lambda n, key: ddim_sample_loop(diffusion,
      model_fn, n, eta=0.0, rng=key, model_kwargs={"y": y}))
  a = ddim(noise, jax.random.PRNGKey(0))
  b = ddim(noise, jax.random.PRNGKey(1))
  assert len(counter) == 1
  np.testing.assert_array_equal(a, b)  # eta = 0: the key does not matter
  c = ddim_sample_loop(diffusion, model_fn, noise)  # no key at all
  assert_rel_close(c, a, rtol=1e-6, name="eager vs jit")

  with pytest.raises(ValueError):
    ddim_sample_loop(diffusion, model_fn, noise, eta=0.5)
  with pytest.raises(ValueError):
    ddim_sample(diffusion, model_fn, noise, jnp.array([3, 3]), eta=1.0)
  noisy = jax.jit(lambda n, key: ddim_sample_loop(diffusion, model_fn, n, eta=0.5, rng=key))
  d1 = noisy(noise, jax.random.PRNGKey(0))
  d2 = noisy(noise, jax.random.PRNGKey(0))
  d3 = noisy(noise, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(d1, d2)
  assert not np.allclose(d1, d3)


def test_model_kwargs_passed_through():
  diffusion = create_diffusion("5")
  y = jnp.array([1, 2])
  seen = []

  def model_fn(x, t, y, cfg_scale):
    seen.append((y, cfg_scale))
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))
  ddim_sample_loop(diffusion, model_fn, jnp.ones(SHAPE),
                   model_kwargs={"y": y, "cfg_scale": 4.0})
  assert seen == [(y, 4.0)]


def _point_mass_model(base_alphas_cumprod, x0):
  """The exact eps-predictor for data that is always x0: eps = (x - sqrt(ab) x0) / sqrt(1 - ab).

  Indexed by the ORIGINAL step numbers, so it is only consistent with a respaced process if the
  model receives timestep_map[t] and respacing preserved alphas_cumprod.
  """
  # sqrt(1 - ab) comes from float64: in float32, 1 - 0.9999 loses most of its digits.
  sqrt_ab = jnp.asarray(np.sqrt(base_alphas_cumprod), jnp.float32)
  sqrt_one_minus_ab = jnp.asarray(np.sqrt(1.0 - base_alphas_cumprod), jnp.float32)

  def model_fn(x, t):
    eps = ((x - sqrt_ab[t].reshape(-1, 1, 1, 1) * x0)
           / sqrt_one_minus_ab[t].reshape(-1, 1, 1, 1))
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)
  return model_fn


def test_ddim_exact_on_point_mass_data():
  base = create_diffusion("")
  diffusion = create_diffusion("ddim25")
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x0 = jax.random.uniform(keys[0], SHAPE, minval=-0.9, maxval=0.9)
  z = jax.random.normal(keys[1], SHAPE)
  counter = []
  exact = _point_mass_model(base.alphas_cumprod, x0)

  def model_fn(x, t):
    counter.append(1)
    return exact(x, t)

  # Sampling: any noise is carried exactly onto x0.
  sample = jax.jit(lambda n: ddim_sample_loop(diffusion, model_fn, n, clip_denoised=False))(z)
  assert_rel_close(sample, x0, name="ddim sample")

  # Encoding: the step-0 state of the trajectory through (x0, z) is mapped back to z.
  ab0 = base.alphas_cumprod[diffusion.timestep_map[0]]
  x_first = math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * z
  encoded = jax.jit(lambda x: ddim_reverse_sample_loop(diffusion,
      model_fn, x, clip_denoised=False))(x_first)
  assert_rel_close(encoded, z, name="ddim reverse")
  assert len(counter) == 2  # one trace per loop
  with pytest.raises(ValueError):
    ddim_reverse_sample(diffusion, model_fn, x_first, jnp.zeros(2, jnp.int32), eta=0.5)


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_standard_normal_is_jax_random_normal_bit_for_bit(partitionable, dtype):
  """Every noise the library draws (dit_jax.noise, drawn flat for XLA's CPU compile time) holds
  `jax.random.normal`'s values exactly, in either of JAX's threefry modes."""
  key = jax.random.key(7)
  with jax.threefry_partitionable(partitionable):
    for shape in [(), (5,), (3, 4), (2, 3, 5, 4), (2, 4, 4, 3, 2)]:
      expected = jax.random.normal(key, shape, dtype)
      drawn = standard_normal(key, shape, dtype)
      assert drawn.shape == expected.shape and drawn.dtype == expected.dtype
      np.testing.assert_array_equal(np.asarray(drawn, np.float32), np.asarray(expected, np.float32))
    drawn = jax.jit(standard_normal, static_argnums=(1, 2))(key, (2, 3, 5, 4), dtype)
    expected = jax.random.normal(key, (2, 3, 5, 4), dtype)
    np.testing.assert_array_equal(np.asarray(drawn, np.float32), np.asarray(expected, np.float32))
