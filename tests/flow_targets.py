"""Targets whose flow-matching fields are known in closed form, for tests of the flow process and
its samplers without a trained model.

Data x ~ N(mean, std^2) independently per coordinate, noise eps ~ N(0, 1), and the path
x_t = alpha_t x + sigma_t eps of a `FlowProcess`. Then x_t ~ N(alpha m, v) with v = alpha^2 s^2 +
sigma^2, and the velocity u_t = alpha' x + sigma' eps is jointly Gaussian with x_t, so

  E[u_t | x_t] = alpha' m + c (x_t - alpha m) / v,  c = Cov(u_t, x_t) = alpha alpha' s^2 + sigma sigma',
  E[eps | x_t] = sigma (x_t - alpha m) / v,
  E[|u_t - E[u_t | x_t]|^2] = alpha'^2 s^2 + sigma'^2 - c^2 / v  (per coordinate),

the last being the flow-matching loss of the exact field at t: its analytic minimum.
"""
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import FlowProcess


def _moments(process: FlowProcess, t, mean: float, std: float):
  alpha, sigma, d_alpha, d_sigma = process.coefficients(t)
  var = alpha ** 2 * std ** 2 + sigma ** 2
  cov = alpha * d_alpha * std ** 2 + sigma * d_sigma
  return alpha, sigma, d_alpha, d_sigma, var, cov


def exact_prediction(process: FlowProcess, mean: float, std: float):
  """model_fn(x [N, ...], t [N], **ignored): the exact output in `process.prediction`."""
  def model_fn(x, t, **_):
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma, d_alpha, d_sigma, var, cov = (jnp.reshape(a, shape) for a in
                                                _moments(process, t, mean, std))
    centred = x - alpha * mean
    if process.prediction == "velocity":
      return d_alpha * mean + cov / var * centred
    if process.prediction == "noise":
      return sigma * centred / var
    return -centred / var  # the score of N(alpha m, v)
  return model_fn


def minimum_loss(process: FlowProcess, mean: float, std: float, t0: float = 0.0,
                 t1: float = 1.0, points: int = 20001) -> float:
  """The velocity-prediction loss of the exact field, averaged over t uniform on [t0, t1]."""
  t = np.linspace(t0, t1, points)
  _, _, d_alpha, d_sigma, var, cov = (np.asarray(a, np.float64) for a in
                                      _moments(process, t, mean, std))
  residual = d_alpha ** 2 * std ** 2 + d_sigma ** 2 - cov ** 2 / var
  return float(np.trapezoid(residual, t) / (t1 - t0))
