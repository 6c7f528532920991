"""DPM-Solver++(2M): coefficients, and accuracy against a 1000-step DDIM on the fixture model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from dit_jax.convert import load_torch_checkpoint
from dit_jax.diffusion import create_diffusion
from dit_jax.models import DiT
from dit_jax.samplers.ddim import ddim_sample_loop
from dit_jax.samplers.dpm_solver import (dpm_solver_pp_sample_loop, solver_coefficients,
                                         solver_timesteps)


def test_timesteps_and_first_order_coefficients():
  steps = solver_timesteps(1000, 20)
  assert steps[0] == 999 and len(steps) == 20 and np.all(np.diff(steps) < 0)
  diffusion = create_diffusion("")
  coef = solver_coefficients(diffusion.alphas_cumprod, steps)
  # First step first order, then second order; the last step returns the x0 prediction.
  assert coef["c"][0] == 1 and coef["p"][0] == 0 and coef["p"][1] < 0
  assert coef["a"][-1] == 0 and coef["b"][-1] == 1 and coef["p"][-1] == 0
  np.testing.assert_allclose(coef["c"][1:-1] + coef["p"][1:-1], 1.0)  # D' is an extrapolation
  # For an exact x0 predictor the first-order step is exactly DDIM (eta = 0).
  ac = diffusion.alphas_cumprod
  s, t = steps[0], steps[1]
  x, x0 = 0.7, -0.2
  eps = (x - np.sqrt(ac[s]) * x0) / np.sqrt(1 - ac[s])
  ddim = np.sqrt(ac[t]) * x0 + np.sqrt(1 - ac[t]) * eps
  assert np.isclose(coef["a"][0] * x + coef["b"][0] * x0, ddim)


def test_exact_model_recovers_x0():
  diffusion = create_diffusion("")
  x0 = jnp.linspace(-0.5, 0.5, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
  ac = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)

  def model_fn(x, t):  # the exact noise for data that is always x0
    a = ac[t][:, None, None, None]
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  noise = jax.random.normal(jax.random.key(0), x0.shape)
  out = dpm_solver_pp_sample_loop(diffusion, model_fn, noise, num_steps=10)
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_x0_predicting_model_recovers_x0():
  """A `predict_xstart` process: the model's output is x0 itself, not noise."""
  diffusion = create_diffusion("", predict_xstart=True, noise_schedule="squaredcos_cap_v2",
                               diffusion_steps=500)
  x0 = jnp.linspace(-0.5, 0.5, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  out = dpm_solver_pp_sample_loop(diffusion, lambda x, t: jnp.broadcast_to(x0, x.shape), noise,
                                  num_steps=10)
  np.testing.assert_allclose(out, x0, atol=1e-5)


@pytest.fixture(scope="module")
def guided_setup():
  model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
              num_classes=10)
  params = load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), model)

  def model_fn(x, t, y):
    return model.apply({"params": params}, x, t, y, 1.5, method=DiT.forward_with_cfg)

  z = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
  return model_fn, jnp.concatenate([z, z]), jnp.array([1, 7, 10, 10])


def test_twenty_steps_closer_to_the_ode_than_ddim(guided_setup):
  model_fn, noise, y = guided_setup
  kwargs = {"y": y}
  reference = jax.jit(lambda n: ddim_sample_loop(create_diffusion("ddim1000"),
      model_fn, n, clip_denoised=False, model_kwargs=kwargs))(noise)
  ddim20 = jax.jit(lambda n: ddim_sample_loop(create_diffusion("ddim20"),
      model_fn, n, clip_denoised=False, model_kwargs=kwargs))(noise)
  dpm20 = jax.jit(lambda n: dpm_solver_pp_sample_loop(
      create_diffusion(""), model_fn, n, num_steps=20, model_kwargs=kwargs))(noise)
  err_ddim = float(jnp.linalg.norm(ddim20[:2] - reference[:2]))
  err_dpm = float(jnp.linalg.norm(dpm20[:2] - reference[:2]))
  assert np.all(np.isfinite(dpm20))
  assert err_dpm < err_ddim, (err_dpm, err_ddim)


def test_spaced_process_is_refused():
  with pytest.raises(ValueError, match="^diffusion:"):
    dpm_solver_pp_sample_loop(create_diffusion("100"), lambda x, t: x, jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="^num_steps:"):
    solver_timesteps(1000, 0)
