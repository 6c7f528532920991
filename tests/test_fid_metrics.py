"""FID/sFID, Inception Score and improved precision/recall on features with known answers."""
import numpy as np
import pytest
import scipy.special

from dit_jax.eval import fid_metrics


def _clusters(rng, centres, per_cluster, std=1.0):
  """`per_cluster` Gaussian points around each centre: `[len(centres) * per_cluster, dim]`."""
  centres = np.asarray(centres, np.float64)
  noise = rng.standard_normal((len(centres), per_cluster, centres.shape[1])) * std
  return (centres[:, None] + noise).reshape(-1, centres.shape[1]).astype(np.float32)


def _far_centres(rng, count, dim, spread=100.0):
  return rng.standard_normal((count, dim)) * spread


def test_fid_identical_sets_is_zero_and_mean_shift_is_its_square():
  rng = np.random.RandomState(0)
  feats = rng.standard_normal((500, 16)).astype(np.float32)
  assert fid_metrics.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)
  assert fid_metrics.fid_from_features(feats, feats, method="sqrtm") == pytest.approx(0.0, abs=1e-6)
  # Same covariance, mean moved by (3, 4, 0, ...): distance ||shift||^2 = 25.
  shift = np.zeros(16, np.float32)
  shift[:2] = (3.0, 4.0)
  assert fid_metrics.fid_from_features(feats, feats + shift) == pytest.approx(25.0, rel=1e-6)


def test_inception_score_uniform_is_one():
  assert fid_metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
  # Identical (non-uniform) predictions for every sample also carry no information.
  logits = np.tile(np.random.RandomState(0).standard_normal(1008), (64, 1))
  assert fid_metrics.inception_score(logits) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("num_classes", [1, 10, 1008])
def test_inception_score_confident_even_is_num_classes(num_classes):
  labels = np.tile(np.arange(num_classes), 3)
  logits = 1000.0 * np.eye(num_classes)[labels]  # Softmax underflows to exact one-hots.
  # One split (3C <= 5000 samples), and three splits each holding every class once.
  assert fid_metrics.inception_score(logits) == pytest.approx(num_classes, rel=1e-9)
  assert fid_metrics.inception_score(logits, split_size=num_classes) == pytest.approx(
      num_classes, rel=1e-9)


def test_inception_score_matches_adm_formula_per_split():
  rng = np.random.RandomState(1)
  logits = 3.0 * rng.standard_normal((250, 20))
  # ADM: preds = softmax; per split kl = p (log p - log mean p), exp(mean sum kl); mean.
  preds = scipy.special.softmax(logits, axis=1)
  scores = []
  for start in range(0, 250, 100):  # Splits of 100, 100 and 50.
    part = preds[start:start + 100]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  assert fid_metrics.inception_score(logits, split_size=100) == pytest.approx(np.mean(scores),
                                                                               rel=1e-10)
  assert np.mean(scores) > 2.0  # A non-trivial value, not the uniform 1.


def test_manifold_radii_is_kth_neighbour_and_chunking_invariant():
  rng = np.random.RandomState(2)
  feats = rng.standard_normal((203, 8)).astype(np.float32)
  d2 = ((feats[:, None].astype(np.float64) - feats[None]) ** 2).sum(-1)
  expected = np.sort(d2, axis=1)[:, 3]  # Index 0 is the point itself.
  for chunk in (4096, 64, 50):  # One block; blocks with a padded tail.
    radii = fid_metrics.manifold_radii(feats, k=3, chunk_size=chunk)
    np.testing.assert_allclose(radii, expected, rtol=1e-4, atol=1e-5)


def test_precision_recall_matches_brute_force_adm():
  # ADM's ManifoldEstimator written out on full distance matrices (float64).
  rng = np.random.RandomState(7)
  ref = rng.standard_normal((300, 16)).astype(np.float32)
  samples = (rng.standard_normal((230, 16)) * 1.3 + 0.3).astype(np.float32)

  def sq_dists(a, b):
    return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)

  ref_radii = np.sort(sq_dists(ref, ref), axis=1)[:, 3]
  sample_radii = np.sort(sq_dists(samples, samples), axis=1)[:, 3]
  cross = sq_dists(ref, samples)
  precision = np.mean(np.any(cross <= ref_radii[:, None], axis=0))
  recall = np.mean(np.any(cross <= sample_radii[None], axis=1))
  assert 0.2 < precision < 0.9 and 0.2 < recall < 0.99  # Non-trivial values.
  for chunk in (4096, 64):
    assert fid_metrics.precision_recall(ref, samples, chunk_size=chunk) == pytest.approx(
        (precision, recall), abs=1.5 / 300)  # At most a borderline point may flip.


def test_precision_recall_identical_sets():
  rng = np.random.RandomState(3)
  feats = _clusters(rng, _far_centres(rng, 5, 32), 60)
  assert fid_metrics.precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clusters():
  rng = np.random.RandomState(4)
  centres = _far_centres(rng, 8, 32)
  ref = _clusters(rng, centres[:4], 50)
  samples = _clusters(rng, centres[4:], 50)
  assert fid_metrics.precision_recall(ref, samples) == (0.0, 0.0)


def test_precision_recall_half_of_the_modes_exact():
  # Samples are the real points of 5 of the 10 modes: each sample is a real point (distance 0
  # to itself), each real point of a covered mode is a sample, the others are far away.
  rng = np.random.RandomState(5)
  ref = _clusters(rng, _far_centres(rng, 10, 16), 50)
  samples = ref[:250]
  assert fid_metrics.precision_recall(ref, samples) == (1.0, 0.5)


def test_precision_recall_half_of_the_modes_drawn():
  # Independent draws: the k-NN balls of a finite set miss some of the other set's tail, so
  # the answers are ~1 and ~0.5, not exact (2-d keeps the balls covering well).
  rng = np.random.RandomState(6)
  centres = _far_centres(rng, 10, 2)
  ref = _clusters(rng, centres, 200)  # 10 modes.
  samples = _clusters(rng, centres[:5], 200)  # 5 of the modes.
  precision, recall = fid_metrics.precision_recall(ref, samples)
  assert precision > 0.95
  assert 0.45 < recall <= 0.5  # The uncovered modes' real points are never recalled.
  # Swapping the roles swaps the answers; small blocks (padded tails) change nothing.
  assert fid_metrics.precision_recall(samples, ref) == (recall, precision)
  assert fid_metrics.precision_recall(ref, samples, chunk_size=300) == (precision, recall)


def test_compute_metrics_collects_all():
  rng = np.random.RandomState(6)
  centres = _far_centres(rng, 4, 12, spread=10.0)
  ref = {"pool3": _clusters(rng, centres, 50), "spatial": rng.standard_normal((200, 6))}
  labels = np.arange(200) % 4
  samples = {"pool3": ref["pool3"][::-1].copy(), "spatial": ref["spatial"] + 2.0,
             "logits_unbiased": 1000.0 * np.eye(4)[labels]}
  metrics = fid_metrics.compute_metrics(ref, samples, split_size=100)
  assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)  # Same points, another order.
  assert metrics["sfid"] == pytest.approx(6 * 2.0 ** 2, rel=1e-6)  # Mean shift of 2 in 6-d.
  assert metrics["inception_score"] == pytest.approx(4.0, rel=1e-9)
  assert (metrics["precision"], metrics["recall"]) == (1.0, 1.0)


def test_rejects_malformed_features():
  with pytest.raises(ValueError, match="dimensions differ"):
    fid_metrics.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="more than k=3"):
    fid_metrics.manifold_radii(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="NaN"):
    fid_metrics.manifold_radii(np.full((10, 2), np.nan))
  with pytest.raises(ValueError, match="logits"):
    fid_metrics.inception_score(np.zeros(10))
