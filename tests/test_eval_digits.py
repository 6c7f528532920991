"""Tests for dit_jax.eval: the Fréchet distance against closed forms, and the digits grader."""
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
import sklearn.datasets

from dit_jax.eval import DigitsGrader, frechet_distance, gaussian_stats
from dit_jax.images import to_uint8

METHODS = ["eigh", "sqrtm"]


def _random_spd(rng, dim, scale=1.0):
  a = rng.normal(size=(dim, dim))
  return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def _exact_from_samples(x, y):
  """Closed form for sample statistics: with sigma_x = A^T A and sigma_y = B^T B,
  tr((sigma_x sigma_y)^1/2) is the nuclear norm of A B^T (an n x n matrix, exact via SVD)."""
  a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
  b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
  dmu = x.mean(0) - y.mean(0)
  nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  return dmu @ dmu + np.sum(a * a) + np.sum(b * b) - 2 * nuclear


# ----------------------------------------------------------------------------- gaussian_stats


def test_gaussian_stats_matches_numpy_with_ddof_1():
  x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
  mu, sigma = gaussian_stats(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / 49, rtol=1e-10)
  mu1, sigma1 = gaussian_stats(x[:, :1])  # One feature: still [1] and [1, 1].
  assert mu1.shape == (1,) and sigma1.shape == (1, 1)
  np.testing.assert_allclose(sigma1[0, 0], np.var(x64[:, 0], ddof=1), rtol=1e-10)


def test_gaussian_stats_rejects_bad_input():
  with pytest.raises(ValueError, match="num_samples, dim"):
    gaussian_stats(np.zeros(5))
  with pytest.raises(ValueError, match="at least 2"):
    gaussian_stats(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="NaN"):
    gaussian_stats(np.array([[0.0], [np.nan]]))


# --------------------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize("method", METHODS)
def test_identical_stats_give_zero(method):
  x = np.random.default_rng(1).normal(size=(200, 16))
  mu, sigma = gaussian_stats(x)
  d = frechet_distance(mu, sigma, mu, sigma, method=method)
  assert isinstance(d, float)
  assert 0.0 <= d < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mu1,s1,mu2,s2", [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -2.0, 3.0),
                                           (4.0, 2.0, 4.0, 2.0), (0.0, 1e-3, 1.0, 5.0)])
def test_one_dimensional_closed_form(method, mu1, s1, mu2, s2):
  d = frechet_distance(np.array([mu1]), np.array([[s1**2]]), np.array([mu2]),
                       np.array([[s2**2]]), method=method)
  np.testing.assert_allclose(d, (mu1 - mu2)**2 + (s1 - s2)**2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_closed_form(method):
  rng = np.random.default_rng(2)
  a, b = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  d = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
  np.testing.assert_allclose(d, expected, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_commuting_covariances_closed_form(method):
  rng = np.random.default_rng(3)
  q = scipy.stats.ortho_group.rvs(12, random_state=4)  # Shared eigenvectors.
  a, b = rng.uniform(0.05, 3.0, size=12), rng.uniform(0.05, 3.0, size=12)
  sigma1, sigma2 = (q * a) @ q.T, (q * b) @ q.T
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  d = frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
  np.testing.assert_allclose(d, expected, rtol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_general_full_rank_matches_sample_closed_form(method):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
  y = 0.8 * x + 0.3 + rng.normal(size=(300, 20))
  d = frechet_distance(*gaussian_stats(x), *gaussian_stats(y), method=method)
  np.testing.assert_allclose(d, _exact_from_samples(x, y), rtol=1e-9)


def test_rank_deficient_stats_are_exact_finite_and_symmetric():
  # Fewer samples than dimensions (like 2048-d Inception features of 100 images): both
  # covariances are singular and so is their product.
  rng = np.random.default_rng(6)
  x = rng.normal(size=(24, 384)) @ (rng.normal(size=(384, 384)) / np.sqrt(384))
  y = 1.1 * x + 0.05 + 0.1 * rng.normal(size=(24, 384))
  stats_x, stats_y = gaussian_stats(x), gaussian_stats(y)
  assert np.linalg.matrix_rank(stats_x[1]) == 23
  expected = _exact_from_samples(x, y)
  d_xy = frechet_distance(*stats_x, *stats_y)
  d_yx = frechet_distance(*stats_y, *stats_x)
  assert np.isfinite(d_xy) and d_xy >= 0.0
  np.testing.assert_allclose(d_xy, expected, rtol=1e-10)
  np.testing.assert_allclose(d_yx, d_xy, rtol=1e-12)
  assert frechet_distance(*stats_x, *stats_x) < 1e-9
  # The reference algorithm needs its eps regularisation here and is only approximately right.
  d_ref = frechet_distance(*stats_x, *stats_y, method="sqrtm")
  assert np.isfinite(d_ref) and d_ref >= 0.0
  np.testing.assert_allclose(d_ref, expected, rtol=1e-3)
  np.testing.assert_allclose(frechet_distance(*stats_y, *stats_x, method="sqrtm"), d_ref,
                             rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_shift_invariance(method):
  rng = np.random.default_rng(7)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  sigma1, sigma2 = _random_spd(rng, 6), _random_spd(rng, 6)
  shift = 100.0 * rng.normal(size=6)
  d = frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
  d_shifted = frechet_distance(mu1 + shift, sigma1, mu2 + shift, sigma2, method=method)
  assert d > 0.1
  np.testing.assert_allclose(d_shifted, d, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_scaling(method):
  rng = np.random.default_rng(8)
  mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
  # Same mean, covariance scaled by c^2: (c sigma)^2 has root c sigma, so d = (1 - c)^2 tr(sigma).
  d = frechet_distance(mu, sigma, mu, 9.0 * sigma, method=method)
  np.testing.assert_allclose(d, 4.0 * np.trace(sigma), rtol=1e-9)
  # Scaling the features by k scales the squared distance by k^2.
  mu2, sigma2 = rng.normal(size=5), _random_spd(rng, 5)
  d1 = frechet_distance(mu, sigma, mu2, sigma2, method=method)
  d3 = frechet_distance(3 * mu, 9 * sigma, 3 * mu2, 9 * sigma2, method=method)
  np.testing.assert_allclose(d3, 9.0 * d1, rtol=1e-9)


def test_methods_agree_on_well_conditioned_input():
  rng = np.random.default_rng(9)
  args = (rng.normal(size=10), _random_spd(rng, 10), rng.normal(size=10), _random_spd(rng, 10, 3))
  np.testing.assert_allclose(frechet_distance(*args, method="sqrtm"),
                             frechet_distance(*args, method="eigh"), rtol=1e-10)


def test_sqrtm_method_follows_the_reference_recipe(monkeypatch):
  """Non-finite root -> retry with eps * I; negligible imaginary part dropped, large rejected."""
  rng = np.random.default_rng(10)
  mu, sigma1, sigma2 = rng.normal(size=4), _random_spd(rng, 4), _random_spd(rng, 4)
  expected = frechet_distance(mu, sigma1, mu, sigma2)
  true_sqrtm = scipy.linalg.sqrtm
  seen = []

  def nan_first(a):
    seen.append(a)
    return np.full_like(a, np.nan) if len(seen) == 1 else true_sqrtm(a)

  monkeypatch.setattr(scipy.linalg, "sqrtm", nan_first)
  d = frechet_distance(mu, sigma1, mu, sigma2, eps=1e-3, method="sqrtm")
  np.testing.assert_allclose(seen[1], (sigma1 + 1e-3 * np.eye(4)) @ (sigma2 + 1e-3 * np.eye(4)))
  assert abs(d - expected) > 1e-5  # The regularised answer is a different number...
  np.testing.assert_allclose(d, expected, rtol=1e-2)  # ...but close to the exact one.

  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: true_sqrtm(a) + 1e-6j)
  np.testing.assert_allclose(frechet_distance(mu, sigma1, mu, sigma2, method="sqrtm"), expected,
                             rtol=1e-9)
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: true_sqrtm(a) + 0.1j)
  with pytest.raises(ValueError, match="imaginary"):
    frechet_distance(mu, sigma1, mu, sigma2, method="sqrtm")


def test_negative_round_off_clips_to_zero_but_real_negatives_raise(monkeypatch):
  mu, sigma = np.zeros(3), np.diag([1.0, 2.0, 3.0])
  true_sqrtm = scipy.linalg.sqrtm
  # A trace term too large by 1e-12 relative: round-off, reported as exactly 0.
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: true_sqrtm(a) * (1 + 1e-12))
  assert frechet_distance(mu, sigma, mu, sigma, method="sqrtm") == 0.0
  # Too large by 10%: a numerical failure, not something to hide behind a 0.
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: true_sqrtm(a) * 1.1)
  with pytest.raises(ValueError, match="negative"):
    frechet_distance(mu, sigma, mu, sigma, method="sqrtm")


def test_frechet_rejects_bad_arguments():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match="mu1 and mu2"):
    frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="sigma2 must be a square"):
    frechet_distance(mu, sigma, mu, np.ones((3, 2)))
  with pytest.raises(ValueError, match="sigma1 has shape"):
    frechet_distance(mu, np.eye(4), mu, sigma)
  with pytest.raises(ValueError, match="mu1 must be a vector"):
    frechet_distance(np.zeros((3, 1)), sigma, mu, sigma)
  with pytest.raises(ValueError, match="not symmetric"):
    frechet_distance(mu, np.triu(np.ones((3, 3))), mu, sigma)
  with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
    frechet_distance(mu, sigma, mu, np.diag([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match="NaN"):
    frechet_distance(np.array([0.0, np.nan, 0.0]), sigma, mu, sigma)
  with pytest.raises(ValueError, match="method"):
    frechet_distance(mu, sigma, mu, sigma, method="svd")


# ------------------------------------------------------------------------------ DigitsGrader


@pytest.fixture(scope="module")
def grader():
  return DigitsGrader(seed=0)


@pytest.fixture(scope="module")
def real(grader):
  return grader.real_images()


@pytest.fixture(scope="module")
def noise(real):
  return np.random.default_rng(0).uniform(-1, 1, size=real[0].shape).astype(np.float32)


def test_real_images_follow_the_pipeline_mapping(grader, real):
  images, labels = real
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert images.min() == -1.0 and images.max() == 1.0
  digits = sklearn.datasets.load_digits()
  np.testing.assert_array_equal(to_uint8(images)[..., 0],
                                np.round(digits.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(labels, digits.target)


def test_classifier_is_accurate_on_held_out_real_digits(grader):
  assert grader.real_accuracy >= 0.95


def test_grading_real_digits(grader, real):
  result = grader.grade(*real)
  assert result["num_samples"] == 1797
  assert result["accuracy"] >= 0.97
  # The reference statistics are those of all real digits: the same set is at distance 0.
  assert 0.0 <= result["frechet_distance"] < 1e-6
  assert len(result["per_class_accuracy"]) == 10
  assert min(result["per_class_accuracy"]) >= 0.9
  np.testing.assert_array_equal(result["per_class_count"], np.bincount(real[1]))
  counts = np.array(result["per_class_count"])
  np.testing.assert_allclose(np.dot(result["per_class_accuracy"], counts) / counts.sum(),
                             result["accuracy"], rtol=1e-12)


def test_noise_scores_low_and_far(grader, real, noise):
  images, labels = real
  result = grader.grade(noise, labels)
  assert result["accuracy"] < 0.25
  subset = grader.grade(images[:400], labels[:400])  # Real, but a different sample set.
  assert subset["frechet_distance"] > 0.1
  assert result["frechet_distance"] > 5 * subset["frechet_distance"]


def test_shuffled_labels_score_chance(grader, real):
  images, labels = real
  shuffled = np.random.default_rng(1).permutation(labels)
  assert grader.grade(images, shuffled)["accuracy"] < 0.2


def test_degraded_digits_rank_between_real_and_noise(grader, real, noise):
  images, labels = real
  blurred = scipy.ndimage.gaussian_filter(images, sigma=(0, 0.7, 0.7, 0))
  real_r, blur_r, noise_r = (grader.grade(x, labels) for x in (images, blurred, noise))
  assert real_r["frechet_distance"] < blur_r["frechet_distance"] < noise_r["frechet_distance"]
  assert real_r["accuracy"] > blur_r["accuracy"] > noise_r["accuracy"]


def test_per_class_accuracy_marks_absent_classes_nan(grader, real):
  images, labels = real
  keep = labels < 3
  result = grader.grade(images[keep], labels[keep])
  assert result["per_class_count"][3:] == [0] * 7
  assert np.all(np.isnan(result["per_class_accuracy"][3:]))
  assert all(a >= 0.9 for a in result["per_class_accuracy"][:3])


def test_inputs_are_quantised_like_a_png(grader, real):
  images = real[0][:50]
  features = grader.features(images)
  assert features.shape == (50, 128) and features.dtype == np.float64
  # Less than half a uint8 step (1 / 127.5) does not change the saved pixel, nor the features.
  np.testing.assert_array_equal(grader.features(images + 0.003), features)
  # Out-of-range values clip like a PNG would, and uint8 / channel-less inputs are equivalent.
  np.testing.assert_array_equal(grader.features(np.where(images == 1.0, 5.0, images)), features)
  np.testing.assert_array_equal(grader.features(to_uint8(images)), features)
  np.testing.assert_array_equal(grader.features(images[..., 0]), features)
  np.testing.assert_array_equal(grader.predict(images[..., 0]), grader.predict(images))


def test_grader_is_deterministic(grader, real, noise):
  other = DigitsGrader(seed=0)
  assert other.real_accuracy == grader.real_accuracy
  for images in (real[0], noise):
    np.testing.assert_array_equal(other.features(images), grader.features(images))
    assert other.grade(images, real[1]) == grader.grade(images, real[1])


def test_grader_rejects_bad_input(grader, real):
  images, labels = real
  with pytest.raises(ValueError, match="images"):
    grader.grade(images.reshape(-1, 64), labels)
  with pytest.raises(ValueError, match="images"):
    grader.predict(np.zeros((3, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="images"):
    grader.features(np.zeros((3, 8, 8), np.int32))
  with pytest.raises(ValueError, match="labels"):
    grader.grade(images, labels[:-1])
  with pytest.raises(ValueError, match="labels"):
    grader.grade(images[:4], np.array([0, 1, 2, 10]))
  with pytest.raises(ValueError, match="labels"):
    grader.grade(images[:4], np.array([0, 1, 2, -1]))
  with pytest.raises(ValueError, match="labels"):
    grader.grade(images[:4], np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="at least 2"):
    grader.grade(images[:1], labels[:1])
