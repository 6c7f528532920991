"""Gaussian KL and likelihood terms of the variational bound (jnp, jit-compatible)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ArrayLike = jax.typing.ArrayLike


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch axes: `[batch, ...]` -> `[batch]`."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: ArrayLike, logvar1: ArrayLike, mean2: ArrayLike,
              logvar2: ArrayLike) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  Arguments broadcast against each other (scalars allowed).
  """
  mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by the reference code.

  Kept instead of the exact `jax.scipy.stats.norm.cdf` so the decoder likelihood matches the
  reference numerically.
  """
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def continuous_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                       log_scales: jax.Array) -> jax.Array:
  """Elementwise log density (nats) of x under N(means, exp(log_scales)**2), standardized.

  Like the reference, this is the standard normal log density of `(x - means) / scale` (the
  `-log_scales` Jacobian term is not included).
  """
  normalized_x = (x - means) * jnp.exp(-log_scales)
  return jax.scipy.stats.norm.logpdf(normalized_x)


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """Log probability (nats) of 8-bit data under a Gaussian discretized into 256 bins.

  Args:
    x: targets rescaled from uint8 to [-1, 1], any shape, e.g. `[batch, height, width, channels]`.
    means: Gaussian means, same shape as x.
    log_scales: Gaussian log standard deviations, same shape as x.

  Returns:
    Elementwise log probabilities, same shape as x. The extreme bins (x below -0.999 or above
    0.999) take the whole tail mass.
  """
  if not x.shape == means.shape == log_scales.shape:
    raise ValueError(f"shapes differ: x {x.shape}, means {means.shape}, "
                     f"log_scales {log_scales.shape}")
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  # The floors keep log() finite (and its gradient free of NaNs) for far-off bins.
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
