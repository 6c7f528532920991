"""The flow-matching process (`dit_jax.diffusion.flow`): its path, the conversions between its
three predictions, its training loss against the analytic minimum, and how configs and
checkpoints name it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dit_jax.diffusion import (DiffusionProcess, FlowProcess, process_from_config,
                               process_from_dict)
from tests import flow_targets

ALL = [FlowProcess(path=path, prediction=prediction)
       for path in ("linear", "gvp") for prediction in ("velocity", "noise", "score")]


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_path_ends_and_velocity(path):
  """t = 0 is the noise, t = 1 the data, and u_t is the time derivative of x_t."""
  process = FlowProcess(path=path)
  rng = np.random.default_rng(0)
  data, noise = (jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32) for _ in range(2))
  ones = jnp.ones((3,))
  np.testing.assert_allclose(process.interpolate(data, noise, 0 * ones)[0], noise, atol=1e-6)
  np.testing.assert_allclose(process.interpolate(data, noise, ones)[0], data, atol=1e-6)
  t = jnp.asarray([0.2, 0.5, 0.9])
  h = 1e-3
  ahead = process.interpolate(data, noise, t + h)[0]
  behind = process.interpolate(data, noise, t - h)[0]
  np.testing.assert_allclose(process.interpolate(data, noise, t)[1], (ahead - behind) / (2 * h),
                             rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("process", ALL, ids=lambda p: f"{p.path}-{p.prediction}")
def test_conversions_are_identities(process):
  """A prediction turned into noise and back, and into velocity / score and back into the
  process's own prediction, is unchanged; and the exact field converts into the exact field of
  every other prediction."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32)
  t = jnp.asarray([0.05, 0.3, 0.6, 0.95])
  out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  back = process.from_noise(process.to_noise(out, x, t), x, t, process.prediction)
  np.testing.assert_allclose(back, out, rtol=1e-4, atol=1e-4)
  exact = {p: flow_targets.exact_prediction(FlowProcess(path=process.path, prediction=p),
                                            0.7, 0.5)(x, t) for p in ("velocity", "noise", "score")}
  mine = exact[process.prediction]
  np.testing.assert_allclose(process.velocity(mine, x, t), exact["velocity"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(process.score(mine, x, t), exact["score"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(process.to_noise(mine, x, t), exact["noise"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_exact_field_has_the_analytic_minimum_loss(path):
  """The loss of the exact velocity field, over many draws of t and noise, is the analytic
  minimum E_t[Var(u_t | x_t)]; a field off by a constant pays exactly that constant squared."""
  process = FlowProcess(path=path)
  mean, std = 0.7, 0.5
  minimum = flow_targets.minimum_loss(process, mean, std)
  data = mean + std * jax.random.normal(jax.random.key(2), (4096, 4, 4, 2))
  exact = flow_targets.exact_prediction(process, mean, std)
  terms = jax.jit(lambda fn_shift, rng: process.loss_terms(
      lambda x, t: exact(x, t) + fn_shift, data, rng))
  losses = np.asarray([terms(0.0, jax.random.key(i))["loss"] for i in range(4)])
  assert losses.shape == (4, 4096)
  # 16384 examples of 32 coordinates: the mean's standard error is about 0.4% of it.
  np.testing.assert_allclose(losses.mean(), minimum, rtol=0.02)
  shifted = np.asarray(terms(0.3, jax.random.key(0))["loss"]).mean()
  np.testing.assert_allclose(shifted - losses[0].mean(), 0.09, rtol=0.1)


@pytest.mark.parametrize("prediction,weight", [("noise", "none"), ("score", "likelihood"),
                                               ("noise", "velocity")])
def test_noise_and_score_losses_vanish_at_the_exact_field_of_a_point(prediction, weight):
  """Data all equal to one point: the exact noise / score prediction is exact for every draw,
  so its loss is 0 under any weighting, and a wrong field's is positive; t stays inside the
  train interval (the weights are finite)."""
  process = FlowProcess(prediction=prediction, loss_weight=weight)
  data = jnp.full((256, 2, 2, 1), 0.4)
  exact = flow_targets.exact_prediction(process, 0.4, 0.0)
  zero = process.loss_terms(exact, data, jax.random.key(0))["loss"]
  assert zero.shape == (256,)
  np.testing.assert_allclose(zero, 0.0, atol=1e-5)
  wrong = process.loss_terms(lambda x, t: exact(x, t) + 0.1, data, jax.random.key(0))["loss"]
  assert np.all(np.isfinite(wrong)) and np.all(wrong > 0)


def test_loss_reads_the_prediction_before_the_variance_channels():
  """learn_sigma=True (SiT's checkpoints): the loss uses the first C channels only."""
  process = FlowProcess(learn_sigma=True)
  data = jax.random.normal(jax.random.key(3), (8, 2, 2, 3))
  exact = flow_targets.exact_prediction(process, 0.0, 1.0)
  plain = FlowProcess().loss_terms(exact, data, jax.random.key(4))["loss"]
  doubled = process.loss_terms(lambda x, t: jnp.concatenate([exact(x, t), 1e3 + x], -1), data,
                               jax.random.key(4))["loss"]
  np.testing.assert_array_equal(plain, doubled)


def test_train_times_keep_off_the_ends():
  """Noise and score predictions draw t from [1e-3, 1 - 1e-3] (SiT), velocity from [0, 1]."""
  seen = {}
  for prediction in ("velocity", "noise"):
    process = FlowProcess(prediction=prediction)
    def model_fn(x, t, prediction=prediction):
      seen[prediction] = t
      return jnp.zeros_like(x)
    process.loss_terms(model_fn, jnp.zeros((20000, 1, 1, 1)), jax.random.key(5))
  assert float(seen["noise"].min()) >= 1e-3 and float(seen["noise"].max()) <= 1 - 1e-3
  assert float(seen["velocity"].min()) < 1e-3 and float(seen["velocity"].max()) > 1 - 1e-3
  assert abs(float(seen["velocity"].mean()) - 0.5) < 0.01


def test_settings_resolve_compare_and_round_trip():
  """SiT's offsets are filled in, so a default and its explicit value are the same process;
  loss_weight is not recorded; to_dict reads back through process_from_dict."""
  assert FlowProcess(prediction="score") == FlowProcess(prediction="score", train_eps=1e-3,
                                                        sample_eps=1e-3)
  assert FlowProcess().train_eps == 0.0
  assert (FlowProcess(prediction="noise", loss_weight="likelihood")
          == FlowProcess(prediction="noise"))
  for process in ALL + [FlowProcess(path="gvp", learn_sigma=True, sample_eps=0.01)]:
    recorded = process.to_dict()
    assert recorded["kind"] == "flow" and "loss_weight" not in recorded
    assert process_from_dict(recorded) == process
  assert FlowProcess() != DiffusionProcess()
  # A process recorded before flows (no kind) is a diffusion.
  assert process_from_dict(DiffusionProcess().to_dict()) == DiffusionProcess()
  assert "kind" not in DiffusionProcess().to_dict()


@pytest.mark.parametrize("settings,message", [
    ({"path": "cosine"}, "flow.path: 'cosine' is not one of linear, gvp"),
    ({"prediction": "x0"}, "flow.prediction: 'x0' is not one of velocity, noise, score"),
    ({"prediction": "noise", "train_eps": 0.0}, "flow.train_eps: noise prediction is singular"),
    ({"sample_eps": 0.7}, "flow.sample_eps: must be in [0, 0.5), got 0.7"),
    ({"loss_weight": "likelihood"}, "flow.loss_weight: 'likelihood' weighs noise and score"),
])
def test_bad_settings_name_the_field(settings, message):
  with pytest.raises(ValueError) as error:
    FlowProcess(**settings)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_config_switches_the_process():
  """config.process chooses; the flow settings come from config.flow and learn_sigma from the
  model; an unknown process is refused naming config.process."""
  config = digits.get_config()
  assert isinstance(process_from_config(config), DiffusionProcess)
  config.process = "flow"
  config.flow.path = "gvp"
  config.model.learn_sigma = False
  assert process_from_config(config) == FlowProcess(path="gvp", learn_sigma=False)
  config.process = "ode"
  with pytest.raises(ValueError, match=r"^config.process: 'ode' is not one of diffusion, flow$"):
    process_from_config(config)


def test_bad_sampler_options_name_their_key():
  """config.sample.options and sample.py's flags share one check, each naming its own key."""
  from dit_jax import generate
  config = digits.get_config("flow")
  config.sample.options.atol = -1.0
  with pytest.raises(ValueError, match=r"^config\.sample\.options\.atol: must be a positive "
                     r"number, got -1\.0$"):
    generate.spec_from_config(config)
  with pytest.raises(ValueError, match=r"^--last_step: 'end' is not one of mean, tweedie, "
                     r"euler, none$"):
    generate.sampler_from_flags(FlowProcess(), None, None, {"last_step": "end", "atol": None})
  assert generate.sampler_from_flags(FlowProcess(), None, None, {"atol": None})[:2] == (
      "ode-heun", 50)
