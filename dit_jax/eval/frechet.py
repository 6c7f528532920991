"""Fréchet distance between Gaussians fitted to features (the statistic behind FID).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

Two ways to get the trace term are provided:

* `method="eigh"` (default, the robust one). From `sigma_k = V_k diag(w_k) V_k^T` (symmetric
  eigendecompositions), `tr((sigma1 sigma2)^{1/2})` is the nuclear norm (sum of singular values)
  of `diag(sqrt(w1)) V1^T V2 diag(sqrt(w2))`, whose squared singular values are the
  eigenvalues of `sigma1^{1/2} sigma2 sigma1^{1/2}`, a matrix similar to `sigma1 sigma2`. The
  result is real by construction, singular (rank-deficient) covariances need no regularisation,
  and swapping the arguments only transposes the matrix, so the value is symmetric.
* `method="sqrtm"` is the reference FID algorithm (pytorch-fid / TTUR): `scipy.linalg.sqrtm`
  of the non-symmetric product, retried with `eps * I` added to both covariances if that is not
  finite, and the real part taken when the imaginary part is negligible. Use it to follow the
  published recipe exactly. On rank-deficient inputs (e.g. 2048-d Inception statistics of fewer
  than 2048 images) the square root of the singular product is ill-conditioned: against the
  closed form for 100 samples in 2048-d it is off by ~1e-5 relative where "eigh" is off by
  ~1e-14, and it can come back complex.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

# Eigenvalues of a PSD matrix below this fraction of its largest one, times the dimension, are
# treated as exact zeros: they are round-off, and taking their square root would turn an error of
# ~1e-16 into one of ~1e-8 per dimension (thousands of dimensions for Inception features).
_NULL_RTOL = np.finfo(np.float64).eps
# Covariances may be stored in float32: a negative eigenvalue of up to this fraction of the
# largest is accepted as round-off; anything beyond it means the input is not a covariance.
_PSD_RTOL = 1e-5
# Relative asymmetry accepted (float32 round-off) before a covariance is rejected as not symmetric.
_SYMMETRY_RTOL = 1e-5
# A negative distance smaller than this fraction of ||dmu||^2 + tr(sigma1) + tr(sigma2) is
# round-off of the cancellation in d^2 and is reported as 0.
_NEGATIVE_RTOL = 1e-6


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a set of feature vectors, in float64.

  Args:
    features: `[num_samples, dim]`, num_samples >= 2.

  Returns:
    `(mu [dim], sigma [dim, dim])`; sigma is the unbiased sample covariance (ddof=1), as in the
    reference FID code.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [num_samples, dim], got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"features needs at least 2 samples for a covariance, got {features.shape[0]}")
  if not np.all(np.isfinite(features)):
    raise ValueError("features contains NaN or inf")
  mu = features.mean(axis=0)
  # atleast_2d: np.cov of a single feature column returns a 0-d array.
  sigma = np.atleast_2d(np.cov(features, rowvar=False))
  return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6, method: str = "eigh") -> float:
  """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: mean of the first Gaussian, `[dim]`.
    sigma1: covariance of the first Gaussian, `[dim, dim]`, symmetric positive semi-definite.
    mu2: mean of the second Gaussian, `[dim]`.
    sigma2: covariance of the second Gaussian, `[dim, dim]`, symmetric positive semi-definite.
    eps: only for `method="sqrtm"`: the diagonal offset added to both covariances when the
      square root of their product is not finite (as pytorch-fid does).
    method: "eigh" (robust, default) or "sqrtm" (the reference FID algorithm); see the module
      docstring.

  Returns:
    The squared distance as a Python float, >= 0. Negatives of round-off size are returned as 0.

  Raises:
    ValueError: on mismatched or malformed shapes, non-finite values, a covariance that is not
      symmetric PSD, a non-negligible imaginary part (`"sqrtm"`), or a negative distance beyond
      round-off.
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, "mu1", "sigma1")
  mu2, sigma2 = _check_gaussian(mu2, sigma2, "mu2", "sigma2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 and mu2 have different dimensions: {mu1.shape} vs {mu2.shape}")
  if method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  elif method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  else:
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")

  diff = mu1 - mu2
  mean_term = float(diff @ diff)
  tr1, tr2 = float(np.trace(sigma1)), float(np.trace(sigma2))
  distance = mean_term + tr1 + tr2 - 2.0 * tr_covmean
  if not np.isfinite(distance):
    raise ValueError(f"Fréchet distance is not finite ({distance})")
  if distance < 0.0:
    # The formula cancels large terms (identical inputs give tr1 + tr2 - 2 tr_covmean), so a
    # tiny negative is round-off; a large one is a numerical failure that must not be hidden.
    scale = mean_term + tr1 + tr2
    if distance < -_NEGATIVE_RTOL * scale:
      raise ValueError(f"Fréchet distance {distance} is negative beyond round-off "
                       f"(scale {scale}); the covariances are probably ill-formed")
    distance = 0.0
  return float(distance)


def _check_gaussian(mu, sigma, mu_name: str, sigma_name: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts one (mean, covariance) pair to float64."""
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1:
    raise ValueError(f"{mu_name} must be a vector [dim], got shape {mu.shape}")
  if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
    raise ValueError(f"{sigma_name} must be a square matrix [dim, dim], got shape {sigma.shape}")
  if sigma.shape[0] != mu.shape[0]:
    raise ValueError(f"{sigma_name} has shape {sigma.shape} but {mu_name} has dim {mu.shape[0]}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{mu_name} or {sigma_name} contains NaN or inf")
  asymmetry = np.max(np.abs(sigma - sigma.T), initial=0.0)
  if asymmetry > _SYMMETRY_RTOL * max(np.max(np.abs(sigma), initial=0.0), 1e-300):
    raise ValueError(f"{sigma_name} is not symmetric (max |sigma - sigma^T| = {asymmetry:.3g})")
  # Exact symmetry lets eigh (which reads one triangle) see the same matrix either way round.
  return mu, 0.5 * (sigma + sigma.T)


def _psd_eigh(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Eigendecomposition of a symmetric PSD matrix with round-off eigenvalues set to exactly 0."""
  w, v = np.linalg.eigh(sigma)
  top = max(float(np.max(np.abs(w), initial=0.0)), 1e-300)
  if w.size and w[0] < -_PSD_RTOL * top:
    raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w[0]:.3g}, "
                     f"largest {top:.3g})")
  w = np.where(w > _NULL_RTOL * w.size * top, w, 0.0)
  return w, v


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^{1/2}) as a nuclear norm, from the eigendecompositions of both inputs.

  With `sigma_k = V_k diag(w_k) V_k^T`, let `F = diag(sqrt(w1)) V1^T V2 diag(sqrt(w2))`.
  `F F^T = diag(sqrt(w1)) V1^T sigma2 V1 diag(sqrt(w1))` is similar to
  `sigma1^{1/2} sigma2 sigma1^{1/2}`, so the eigenvalues of `sigma1 sigma2` are the squared
  singular values of `F` and the trace term is their plain sum. Taking singular values of `F`
  rather than eigenvalues of `F F^T` keeps the error at eps * ||F|| instead of
  sqrt(eps) * ||F|| for the small ones (no squaring of the condition number), and swapping
  the arguments only transposes `F`, so the result is symmetric.
  """
  w1, v1 = _psd_eigh(sigma1, "sigma1")
  w2, v2 = _psd_eigh(sigma2, "sigma2")
  # Null directions contribute nothing: dropping them shrinks the SVD for rank-deficient
  # statistics (e.g. 2048-d features of a few hundred images).
  keep1, keep2 = w1 > 0, w2 > 0
  f = (np.sqrt(w1[keep1])[:, None] * (v1[:, keep1].T @ v2[:, keep2])) * np.sqrt(w2[keep2])
  if f.size == 0:
    return 0.0
  return float(np.sum(np.linalg.svd(f, compute_uv=False)))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """tr((sigma1 sigma2)^{1/2}) exactly as pytorch-fid computes it."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    # The product is singular: regularise both covariances, as the reference does.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = float(np.max(np.abs(np.diagonal(covmean).imag), initial=0.0))
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
      raise ValueError(f"sqrtm(sigma1 sigma2) has a large imaginary component ({max_imag:.3g})")
    covmean = covmean.real
  return float(np.trace(covmean))
