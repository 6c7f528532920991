"""The flow samplers (ode-euler, ode-heun, ode-dopri5, sde-euler) on Gaussian targets whose
fields are exact (tests/flow_targets.py), so that everything they should sample is known.

For data N(m, s^2) the exact velocity and score at time t are affine in x (v = P + Q x), so each
step of every fixed-step scheme is an affine map plus Gaussian noise: the distribution of its
output is Gaussian with moments this file computes in float64 (`scheme_moments`), and the
ODE's exact flow keeps the standardised coordinate (x - alpha_t m) / sqrt(Var x_t) constant
(`exact_flow`). The samplers are checked against both: against the scheme's own moments within
Monte-Carlo error only (the implementation), and these against the target within the
discretisation error (the method).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import samplers
from dit_jax.diffusion import OFFICIAL_PROCESS, FlowProcess
from dit_jax.models import DiT, init_params
from dit_jax.samplers import flow_ode
from dit_jax.samplers.guidance import guide, make_sample_fn
from dit_jax.samplers.loop import SamplerOptions, run_with_nfe
from flow_targets import exact_prediction

MEAN, STD = 1.5, 0.5  # the target: far from the noise's N(0, 1) in both moments
N = 20000  # samples: Monte-Carlo standard errors STD / 141 (mean) and STD / 200 (std)
PROCESSES = [FlowProcess(path=path, prediction=prediction)
             for path in ("linear", "gvp") for prediction in ("velocity", "noise", "score")]
IDS = [f"{p.path}-{p.prediction}" for p in PROCESSES]
FLOW_SAMPLERS = ["ode-euler", "ode-heun", "ode-dopri5", "sde-euler"]
TIGHT = SamplerOptions(rtol=1e-5, atol=1e-6)  # SiT's rtol 1e-3 takes 3 steps here: see below


def path_coefficients(process, t):
  """(alpha, sigma, alpha', sigma') in float64, from the paths' definitions."""
  t = np.float64(t)
  if process.path == "linear":
    return t, 1.0 - t, 1.0, -1.0
  q = np.pi / 2
  return np.sin(q * t), np.cos(q * t), q * np.cos(q * t), -q * np.sin(q * t)


def exact_fields(process, t, mean=MEAN, std=STD):
  """((P_v, Q_v), (P_s, Q_s)): velocity P_v + Q_v x and score P_s + Q_s x at time t, and the
  marginal's variance."""
  alpha, sigma, d_alpha, d_sigma = path_coefficients(process, t)
  var = alpha ** 2 * std ** 2 + sigma ** 2
  cov = alpha * d_alpha * std ** 2 + sigma * d_sigma
  return (d_alpha * mean - cov / var * alpha * mean, cov / var), (alpha * mean / var, -1 / var)


def exact_flow(process, z, t0, t1, mean=MEAN, std=STD):
  """The probability-flow ODE's exact map from x = z at t0 to t1."""
  (a0, s0), (a1, s1) = (path_coefficients(process, t)[:2] for t in (t0, t1))
  v0, v1 = a0 ** 2 * std ** 2 + s0 ** 2, a1 ** 2 * std ** 2 + s1 ** 2
  return a1 * mean + np.sqrt(v1 / v0) * (z - a0 * mean)


def ode_map(velocity, times, orders):
  """(A, B): the Euler (order 1) / Heun (order 2) chain over `times` is x -> A + B x, for a
  velocity(t) -> (P, Q) that is affine in x."""
  big_a, big_b = 0.0, 1.0
  for t, t_next, order in zip(times[:-1], times[1:], orders):
    dt = t_next - t
    (p1, q1) = velocity(t)
    if order == 1:
      a, b = dt * p1, 1 + dt * q1
    else:  # x~ = x + dt k1, x' = x + dt/2 (k1 + k2(x~))
      p2, q2 = velocity(t_next)
      a = dt / 2 * (p1 + p2 + q2 * dt * p1)
      b = 1 + dt / 2 * (q1 + q2 * (1 + dt * q1))
    big_a, big_b = a + b * big_a, b * big_b
  return big_a, big_b


def sde_moments(process, num_steps, options, fields=None):
  """(mean, std) of sde-euler's output from N(0, 1), rebuilt here from SiT's description;
  `fields(t)` as `exact_fields` (default: those of the target)."""
  fields = fields or (lambda t: exact_fields(process, t))
  h = options.last_step_size
  eps = process.sample_eps
  t0 = eps if options.diffusion_form == "SBDM" or process.prediction != "velocity" else 0.0
  last = options.last_step != "none"
  grid = (np.linspace(t0, 1 - h, num_steps) if last else
          np.linspace(t0, 1 - eps, num_steps + 1))
  mu, var = 0.0, 1.0
  for t, t_next in zip(grid[:-1], grid[1:]):
    dt = t_next - t
    w = diffusion_coefficient(process, t, options)
    (pv, qv), (ps, qs) = fields(t)
    mu = mu + dt * (pv + qv * mu + w * (ps + qs * mu))
    var = (1 + dt * (qv + w * qs)) ** 2 * var + 2 * w * dt
  if last:
    t = 1 - h
    (pv, qv), (ps, qs) = fields(t)
    alpha, sigma = path_coefficients(process, t)[:2]
    w = diffusion_coefficient(process, t, options)
    a, p, q = {"mean": (1.0, h * (pv + w * ps), h * (qv + w * qs)),
               "euler": (1.0, h * pv, h * qv),
               "tweedie": (1 / alpha, sigma ** 2 / alpha * ps, sigma ** 2 / alpha * qs)
               }[options.last_step]
    mu, var = p + (a + q) * mu, (a + q) ** 2 * var
  return mu, math.sqrt(var)


def diffusion_coefficient(process, t, options):
  """w(t) for the forms these tests use, from SiT's definitions."""
  alpha, sigma, d_alpha, d_sigma = path_coefficients(process, t)
  form = options.diffusion_form
  if form == "SBDM":
    return options.diffusion_norm * (d_alpha / alpha * sigma ** 2 - sigma * d_sigma)
  return options.diffusion_norm * {"sigma": sigma, "constant": 1.0, "linear": 1 - t}[form]


def compiled(name, process, model_fn, num_steps, options=SamplerOptions(), model_kwargs=None):
  """A registered sampler as one jitted program `(noise, seed) -> (samples, nfe)` (float64
  numpy samples, an int nfe)."""
  sampler = samplers.get(name, process=process)

  @jax.jit
  def sample(z, rng):
    return run_with_nfe(sampler(process, model_fn, z, rng, num_steps=num_steps,
                                clip_denoised=False, eta=0.0, model_kwargs=model_kwargs or {},
                                options=options))

  def run(noise, seed=1):
    x, nfe = sample(noise, jax.random.key(seed))
    return np.asarray(x, np.float64), int(nfe)
  return run


def draw(name, process, model_fn, noise, num_steps, options=SamplerOptions(), model_kwargs=None):
  """(samples, nfe) of a registered sampler from `noise`, compiled as one program."""
  return compiled(name, process, model_fn, num_steps, options, model_kwargs)(noise)


def noise_of(n=N, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 1, 1, 1), jnp.float32)


def assert_moments(x, mean, std, allowance):
  """Sample moments within 4 Monte-Carlo standard errors plus `allowance` of (mean, std)."""
  n = x.size
  assert abs(x.mean() - mean) <= 4 * std / math.sqrt(n) + allowance, (x.mean(), mean)
  assert abs(x.std() - std) <= 4 * std / math.sqrt(2 * n) + allowance, (x.std(), std)


# Steps of the moment tests, and how far from the target the scheme may land there (the
# largest over the six processes of the exact computation below, rounded up): Euler's O(h)
# error at 100 steps, Heun's O(h^2) at 50 evaluations, Dopri5's at rtol 1e-5.
ODE_STEPS = {"ode-euler": (100, 0.012), "ode-heun": (50, 1e-3), "ode-dopri5": (0, 2e-4)}


@pytest.mark.parametrize("name", ["ode-euler", "ode-heun", "ode-dopri5"])
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_ode_samplers_reproduce_the_target(process, name):
  num_steps, allowance = ODE_STEPS[name]
  z = noise_of()
  x, nfe = draw(name, process, exact_prediction(process, MEAN, STD), z, num_steps, TIGHT)
  z = np.asarray(z, np.float64)
  t0, t1 = process.interval(process.sample_eps)
  flow = exact_flow(process, z, t0, t1)
  # The exact flow lands on the target up to the sampling interval's offsets (1e-3 for noise
  # and score predictions: the start at t0 > 0 is not quite N(0, 1), the end not quite data).
  offset = 0.0 if process.prediction == "velocity" else 3e-3
  np.testing.assert_allclose(exact_flow(process, np.array([-1.0, 0.0, 1.0]), t0, t1),
                             [MEAN - STD, MEAN, MEAN + STD], atol=offset + 1e-12)
  # Each sample is the same affine map of its noise: the discretisation error, deterministic.
  assert np.abs(x - flow).max() <= allowance * (1 + np.abs(z).max())
  # So the moments are the target's within Monte-Carlo error, the scheme's and the offsets.
  assert_moments(x, MEAN, STD, allowance + offset)
  if name != "ode-dopri5":
    assert nfe == num_steps


@pytest.mark.parametrize("name", ["ode-euler", "ode-heun"])
def test_ode_allowances_are_the_scheme_errors(name):
  """ODE_STEPS' allowances: the exact Euler and Heun maps at those steps, against the flow."""
  num_steps, allowance = ODE_STEPS[name]
  worst = 0.0
  for process in PROCESSES:
    t0, t1 = process.interval(process.sample_eps)
    steps = num_steps if name == "ode-euler" else num_steps // 2
    a, b = ode_map(lambda t: exact_fields(process, t)[0], np.linspace(t0, t1, steps + 1),
                   [1 if name == "ode-euler" else 2] * steps)
    exact_b = exact_flow(process, 1.0, t0, t1) - exact_flow(process, 0.0, t0, t1)
    worst = max(worst, abs(a - exact_flow(process, 0.0, t0, t1)), abs(b - exact_b))
  assert allowance / 4 < worst <= allowance  # the allowance is the error, not a loose bound


@pytest.mark.parametrize("process", [PROCESSES[0], PROCESSES[4]], ids=[IDS[0], IDS[4]])
def test_heun_converges_at_second_order_and_euler_at_first(process):
  """The deterministic error max_z |x(z) - flow(z)| as the evaluations double (32 to 128,
  where both are in their asymptotic regime: at 8 Heun's ratio is still 2 to 3.5)."""
  z = jnp.linspace(-3.0, 3.0, 13).reshape(-1, 1, 1, 1)
  t0, t1 = process.interval(process.sample_eps)
  flow = exact_flow(process, np.asarray(z, np.float64), t0, t1)
  model_fn = exact_prediction(process, MEAN, STD)
  errors = {name: [np.abs(draw(name, process, model_fn, z, n)[0] - flow).max()
                   for n in (32, 64, 128)] for name in ("ode-euler", "ode-heun")}
  euler, heun = np.array(errors["ode-euler"]), np.array(errors["ode-heun"])
  np.testing.assert_allclose(euler[:-1] / euler[1:], 2.0, rtol=0.1)  # O(h)
  np.testing.assert_allclose(heun[:-1] / heun[1:], 4.0, rtol=0.15)  # O(h^2)
  assert (heun < euler / 5).all()  # at equal evaluations


@pytest.mark.parametrize("name,num_steps,orders", [
    ("ode-euler", 5, [1] * 5), ("ode-heun", 6, [2] * 3), ("ode-heun", 7, [2, 2, 2, 1])])
def test_the_steps_are_the_schemes(name, num_steps, orders):
  """Samples are the exact Euler / Heun chain's map of their noise (the odd last step Euler).
  Velocity prediction: no conversion's float32 rounding (noise to velocity divides by
  alpha_t0 = 1.6e-3 on gvp) in the way."""
  process = PROCESSES[3]
  z = jnp.linspace(-3.0, 3.0, 13).reshape(-1, 1, 1, 1)
  x, nfe = draw(name, process, exact_prediction(process, MEAN, STD), z, num_steps)
  t0, t1 = process.interval(process.sample_eps)
  a, b = ode_map(lambda t: exact_fields(process, t)[0], np.linspace(t0, t1, len(orders) + 1),
                 orders)
  np.testing.assert_allclose(x, a + b * np.asarray(z, np.float64), atol=3e-6)
  assert nfe == num_steps


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_sde_reproduces_the_target(process):
  """SiT's defaults (w = sigma_t, the "mean" last step of 0.04) at 250 evaluations."""
  options = SamplerOptions()
  x, nfe = draw("sde-euler", process, exact_prediction(process, MEAN, STD), noise_of(), 250,
                options)
  mean, std = sde_moments(process, 250, options)
  assert_moments(x, mean, std, 0.0)  # the implementation: Monte-Carlo error only
  # The method: Euler-Maruyama's O(dt) error and the last step's fixed size h = 0.04, an O(h)
  # bias that more steps do not remove (the noise it leaves out, of variance 2 w h: the std
  # 5e-3 to 8e-3 below the target at 250 steps and at 4000 alike; the mean up to 5.4e-3 off).
  assert abs(mean - MEAN) < 6e-3 and abs(std - STD) < 1e-2
  assert nfe == 250


@pytest.mark.parametrize("form,last_step,process", [
    ("sigma", "tweedie", PROCESSES[0]), ("sigma", "euler", PROCESSES[3]),
    ("sigma", "none", PROCESSES[3]), ("constant", "euler", PROCESSES[1]),
    ("linear", "mean", PROCESSES[5]), ("SBDM", "mean", PROCESSES[2]),
    ("SBDM", "mean", PROCESSES[4])])
def test_sde_diffusion_forms_and_last_steps(form, last_step, process):
  options = SamplerOptions(diffusion_form=form, last_step=last_step)
  x, nfe = draw("sde-euler", process, exact_prediction(process, MEAN, STD), noise_of(), 250,
                options)
  mean, std = sde_moments(process, 250, options)
  assert_moments(x, mean, std, 0.0)
  # Each keeps the target's marginals up to the method's error (as above; at most 1e-2 here;
  # "mean" with a constant w = 1 would leave out noise of variance 2 h: the std 0.08 short).
  assert abs(mean - MEAN) < 6e-3 and abs(std - STD) < 1.2e-2
  assert nfe == 250


def test_sde_noise_is_per_step_and_per_key():
  process = PROCESSES[0]
  model_fn = exact_prediction(process, MEAN, STD)
  z = noise_of(8)
  sample = compiled("sde-euler", process, model_fn, 10)
  a, b, c = (sample(z, seed)[0] for seed in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).min() > 1e-4


@pytest.mark.parametrize("name", ["ode-euler", "ode-heun", "ode-dopri5"])
def test_ode_samplers_are_deterministic_and_invertible(name):
  """The same noise gives the same samples whatever the key, and integrating the same ODE back
  from them returns the noise, up to the scheme's error (which the exact flow inverts)."""
  process = PROCESSES[1]
  model_fn = exact_prediction(process, MEAN, STD)
  z = noise_of(64)
  num_steps = {"ode-euler": 200, "ode-heun": 100, "ode-dopri5": 0}[name]
  sample = compiled(name, process, model_fn, num_steps, TIGHT)
  (x, _), (again, _) = sample(z, 1), sample(z, 2)
  np.testing.assert_array_equal(x, again)
  field = flow_ode.velocity_field(process, model_fn, 1, {})
  t0, t1 = process.interval(process.sample_eps)
  if name == "ode-dopri5":
    back = flow_ode.dopri5_loop(field, jnp.asarray(x, jnp.float32), t1, t0, TIGHT)
  else:
    steps = num_steps // (1 if name == "ode-euler" else 2)
    back = flow_ode.fixed_step_loop(field, jnp.asarray(x, jnp.float32),
                                    np.linspace(t1, t0, steps + 1),
                                    [1 if name == "ode-euler" else 2] * steps)
  z_back = np.asarray(samplers.run(back))
  error = np.abs(z_back - np.asarray(z)).max()
  assert error < {"ode-euler": 0.05, "ode-heun": 1e-4, "ode-dopri5": 1e-4}[name]
  assert error > 1e-7 or name != "ode-euler"  # a real round trip, not the input handed back


def counting(model_fn):
  """model_fn, and a list that counts its evaluations as they run (not as they are traced)."""
  calls = []

  def counted(x, t, **kwargs):
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    return model_fn(x, t, **kwargs)
  return counted, calls


@pytest.mark.parametrize("name,num_steps,options", [
    ("ode-euler", 7, SamplerOptions()), ("ode-heun", 7, SamplerOptions()),
    ("ode-heun", 8, SamplerOptions()), ("sde-euler", 7, SamplerOptions()),
    ("sde-euler", 7, SamplerOptions(last_step="none"))])
def test_nfe_is_the_number_of_model_evaluations(name, num_steps, options):
  process = PROCESSES[1]
  model_fn, calls = counting(exact_prediction(process, MEAN, STD))
  _, nfe = draw(name, process, model_fn, noise_of(16), num_steps, options)
  jax.effects_barrier()
  assert nfe == len(calls) == num_steps


def test_dopri5_counts_rejected_steps_and_ignores_num_steps():
  """Dopri5's count from diffrax's statistics (6 a step, accepted or rejected, 1 to start),
  whatever num_steps says; its tolerances decide."""
  process = PROCESSES[0]
  model_fn, calls = counting(exact_prediction(process, MEAN, STD))
  z = noise_of(16)
  runs = {}
  for num_steps, options in ((5, TIGHT), (500, TIGHT), (5, SamplerOptions())):
    loop = samplers.get("ode-dopri5")(process, model_fn, z, jax.random.key(0),
                                      num_steps=num_steps, clip_denoised=False, eta=0.0,
                                      model_kwargs={}, options=options)
    x, nfe = jax.jit(lambda loop=loop: run_with_nfe(loop))()
    jax.effects_barrier()
    runs[num_steps, options.rtol] = (np.asarray(x), int(nfe), len(calls))
    calls.clear()
  (x5, nfe5, calls5), (x500, nfe500, _), (_, loose, _) = runs.values()
  np.testing.assert_array_equal(x5, x500)
  assert nfe5 == nfe500 == calls5 and (nfe5 - 1) % 6 == 0
  assert loose < nfe5  # SiT's rtol 1e-3: fewer steps


def guided_model(scale, classes):
  """forward_with_cfg's arithmetic on exact fields: a doubled batch [cond; null], the first
  half of x fed to both, the prediction uncond + scale (cond - uncond) returned for both
  halves. Class y's target is N(classes[y]); the last class is the null one."""
  def model_fn(x, t, y):
    n = x.shape[0] // 2
    half, t_half = x[:n], t[:n]
    fields = [exact_prediction(PROCESSES[0], m, s)(half, t_half) for m, s in classes]
    labels = y[:n].reshape(-1, 1, 1, 1)
    cond = sum(jnp.where(labels == k, f, 0.0) for k, f in enumerate(fields[:-1]))
    guided = fields[-1] + scale * (cond - fields[-1])
    return jnp.concatenate([guided, guided])
  return model_fn


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_guidance_goes_through_model_fn(name):
  """Scale 1: each class's own target; scale 3: the guided field's (an affine field too)."""
  classes = [(1.5, 0.5), (-1.0, 0.3), (0.2, 1.0)]  # two classes, then the null class
  labels = jnp.arange(2 * 4000) % 2
  z = noise_of(labels.shape[0])
  num_steps = {"ode-euler": 100, "ode-heun": 50, "ode-dopri5": 0, "sde-euler": 250}[name]
  process = PROCESSES[0]
  options = TIGHT
  null = jnp.full_like(labels, 2)
  for scale in (1.0, 3.0):
    x, nfe = draw(name, process, guided_model(scale, classes), jnp.concatenate([z, z]),
                  num_steps, options, model_kwargs={"y": jnp.concatenate([labels, null])})
    x = x[:labels.shape[0]]
    if name != "ode-dopri5":
      assert nfe == num_steps  # the doubled batch is one evaluation
    for k in (0, 1):
      def fields(t, k=k):  # the guided prediction's velocity and score: the same mix
        cond, uncond = exact_fields(process, t, *classes[k]), exact_fields(process, t, *classes[2])
        return tuple(tuple(u + scale * (c - u) for c, u in zip(cs, us))
                     for cs, us in zip(cond, uncond))
      if name == "sde-euler":
        # Guided velocity and score are not one density's: the SDE has its own endpoint.
        mean, std = sde_moments(process, num_steps, options, fields)
        allowance = 0.0
      else:  # the guided ODE's endpoint, from its map at many Heun steps (error ~1e-6)
        mean, std = ode_map(lambda t: fields(t)[0], np.linspace(0.0, 1.0, 2001), [2] * 2000)
        allowance = {"ode-euler": 0.03, "ode-heun": 2e-3, "ode-dopri5": 1e-3}[name]
      if scale == 1.0:  # the class's own target, up to the SDE's last-step bias (see above)
        np.testing.assert_allclose((mean, std), classes[k],
                                   atol=1e-2 if name == "sde-euler" else 1e-5)
      assert_moments(x[np.asarray(labels) == k], mean, abs(std), allowance)


def test_a_sampler_of_the_other_kind_is_refused_in_one_line():
  with pytest.raises(ValueError, match=(
      r"^--sampler: 'ddim' samples diffusion processes, not this flow \(flow matching, gvp "
      r"path, noise prediction\); the flow samplers: ode-euler, ode-heun, ode-dopri5, "
      r"sde-euler$")):
    samplers.get("ddim", "--sampler", FlowProcess(path="gvp", prediction="noise"))
  with pytest.raises(ValueError, match=(
      r"^sampler: 'sde-euler' samples flow processes, not this diffusion \(linear schedule, "
      r"1000 steps, eps prediction, learned sigma\); the diffusion samplers: ddpm, ddim, "
      r"dpm-solver\+\+$")):
    samplers.get("sde-euler", process=OFFICIAL_PROCESS)
  assert samplers.get("ode-heun", process=FlowProcess()) is samplers.SAMPLERS["ode-heun"].sampler
  assert samplers.names("flow") == FLOW_SAMPLERS
  assert samplers.default_for(FlowProcess(prediction="score")) == ("ode-heun", 50)
  assert samplers.default_for(OFFICIAL_PROCESS) == ("ddpm", 250)
  text = samplers.describe()
  assert "; ode-dopri5 (flow): Adaptive Dopri5" in text and text.startswith("ddpm (diffusion): ")


@pytest.mark.parametrize("settings,message", [
    ({"atol": 0.0}, "options.atol: must be a positive number, got 0.0"),
    ({"rtol": -1e-3}, "options.rtol: must be a positive number, got -0.001"),
    ({"max_steps": 0}, "options.max_steps: must be a positive integer, got 0"),
    ({"max_steps": 2.5}, "options.max_steps: must be a positive integer, got 2.5"),
    ({"diffusion_form": "sbdm"}, "options.diffusion_form: 'sbdm' is not one of constant, "
     "SBDM, sigma, linear, decreasing, increasing-decreasing"),
    ({"diffusion_norm": -1.0}, "options.diffusion_norm: must be a number >= 0, got -1.0"),
    ({"last_step": "Mean"}, "options.last_step: 'Mean' is not one of mean, tweedie, euler, "
     "none"),
    ({"last_step_size": 1.0}, "options.last_step_size: must be in (0, 1), got 1.0")])
def test_bad_options_are_refused(settings, message):
  with pytest.raises(ValueError, match="^" + __import__("re").escape(message) + "$"):
    SamplerOptions(**settings)


@pytest.mark.parametrize("name,process,num_steps,options,message", [
    ("sde-euler", FlowProcess(), 10, SamplerOptions(diffusion_form="SBDM"),
     "options.diffusion_form: SBDM is infinite at t = 0; it needs the process's sample_eps > 0"),
    ("sde-euler", FlowProcess(prediction="noise"), 10, SamplerOptions(last_step_size=0.9995),
     "options.last_step_size: 0.9995 leaves no time for the SDE after t0 = 0.001"),
    ("sde-euler", FlowProcess(), 1, SamplerOptions(),
     "num_steps: sde-euler with last_step 'mean' takes at least 2 evaluations, got 1"),
    ("ode-heun", FlowProcess(), 0, SamplerOptions(),
     "num_steps: must be a positive integer, got 0")])
def test_settings_a_sampler_cannot_use_are_refused(name, process, num_steps, options, message):
  with pytest.raises(ValueError, match="^" + __import__("re").escape(message) + "$"):
    samplers.get(name)(process, exact_prediction(process, MEAN, STD), noise_of(2),
                       jax.random.key(0), num_steps=num_steps, clip_denoised=False, eta=0.0,
                       model_kwargs={}, options=options)


def test_dopri5_past_max_steps_raises():
  process = PROCESSES[0]
  with pytest.raises(Exception, match="maximum number of solver steps"):
    draw("ode-dopri5", process, exact_prediction(process, MEAN, STD), noise_of(4), 0,
         SamplerOptions(rtol=1e-8, atol=1e-10, max_steps=3))


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_each_sampler_compiles_into_one_program(name):
  """Lowering the jitted chain traces the model a fixed number of times whatever the steps,
  into one program whose steps are one loop (`while`), not unrolled."""
  process = PROCESSES[0]
  traces = []

  def model_fn(x, t):
    traces.append(1)
    return exact_prediction(process, MEAN, STD)(x, t)

  counts, loops = [], []
  for num_steps in (4, 41):  # 41: Heun's odd last step too
    traces.clear()
    sampler = samplers.get(name)
    text = jax.jit(lambda z, n=num_steps: samplers.run(sampler(
        process, model_fn, z, jax.random.key(0), num_steps=n, clip_denoised=False, eta=0.0,
        model_kwargs={}))).lower(noise_of(4)).as_text()
    counts.append(len(traces))
    loops.append(text.count("stablehlo.while"))
  assert loops[0] == loops[1]  # the same loops (the chain's; random bits' and diffrax's own)
  expected = {"ode-euler": 1, "ode-heun": 2, "sde-euler": 1}
  if name in expected:  # Heun: its two slopes (the odd last step uses the first alone)
    assert counts == [expected[name]] * 2
  else:  # diffrax traces the field for its own shapes too, a fixed number of times
    assert counts[0] == counts[1] <= 8


def test_a_tiny_dit_samples_through_make_sample_fn():
  """A real model (learn_sigma=False, as flow configs build it), guided, through the one
  compiled sampling function: the chain it runs is ode-heun's on the guided model."""
  model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
              num_classes=10, learn_sigma=False)

  # Random weights of the parameters' shapes (no zero-initialised layers: the outputs depend
  # on x, t and y), drawn at once: no initialisation run, no random program a parameter.
  shapes, tree = jax.tree.flatten(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
  values = np.random.default_rng(0).normal(0.0, 0.05, sum(s.size for s in shapes))
  offsets = np.cumsum([0] + [s.size for s in shapes])
  params = tree.unflatten([jnp.asarray(values[a:b].reshape(s.shape), jnp.float32)
                           for a, b, s in zip(offsets[:-1], offsets[1:], shapes)])
  labels = jnp.array([1, 7, 3])
  rng = jax.random.key(5)
  process = FlowProcess()
  sample = make_sample_fn(model, sampler="ode-heun", num_steps=5, cfg_scale=2.0,
                          guidance_channels=None, process=process)
  out = np.asarray(sample(params, labels, rng))
  assert out.shape == (3, 8, 8, 4) and np.isfinite(out).all()
  noise_rng, loop_rng = jax.random.split(rng)

  @jax.jit
  def by_hand(params):
    noise = jax.random.normal(noise_rng, (3, 8, 8, 4), jnp.float32)
    model_fn, doubled, kwargs = guide(model, params, noise, labels, cfg_scale=2.0,
                                      guidance_channels=None)
    return noise, *run_with_nfe(flow_ode.heun(process, model_fn, doubled, loop_rng, num_steps=5,
                                              clip_denoised=False, eta=0.0,
                                              model_kwargs=kwargs))
  noise, expected, nfe = by_hand(params)
  np.testing.assert_allclose(out, expected[:3], atol=1e-5)
  assert int(nfe) == 5 and np.abs(out - np.asarray(noise)).mean() > 1e-2
