"""FID, sFID, Inception Score and improved precision/recall from Inception features.

The metrics follow ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`), which
DiT reports, given the outputs of `dit_jax.eval.inception.FidInceptionV3`:

* FID: Fréchet distance between Gaussians fitted to the `pool3` features of the reference and
  sample sets; sFID: the same on the `spatial` features (`mixed_6/conv[..., :7]`, flattened).
* Inception Score: `exp(E_x KL(p(y|x) || p(y)))` from the softmax of the 1008-way logits,
  computed on consecutive splits of `split_size` (5000: 10 splits for 50K samples) and
  averaged. ADM feeds the softmax `pool3 @ W` without the classifier bias (it imports
  `softmax/logits/MatMul`), i.e. `logits_unbiased`.
* Improved precision/recall (Kynkäänniemi et al. 2019) on `pool3`: each set's manifold is the
  union of balls around its points with radius the distance to the k-th (k=3) nearest
  neighbour; precision is the fraction of samples inside the reference manifold, recall the
  fraction of references inside the sample manifold.

Differences from ADM, all in precision: pairwise distances are computed in float32 at full
matmul precision (ADM uses float16 when finite), and the IS softmax in float64 from logits (ADM
takes logs of float32 probabilities, which are -inf where a probability underflows).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from dit_jax.eval.frechet import frechet_distance, gaussian_stats

IS_SPLIT_SIZE = 5000  # ADM's `compute_inception_score(split_size=5000)`.
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator `nhood_sizes=(3,)`.
_CHUNK = 4096  # Rows/columns per distance block: [4096, 4096] float32 is 64 MiB.


def fid_from_features(ref_features: np.ndarray, sample_features: np.ndarray,
                      method: str = "eigh") -> float:
  """Fréchet distance between Gaussian fits of two feature sets: FID on `pool3`, sFID on
  `spatial`.

  Args:
    ref_features: `[num_ref, dim]`.
    sample_features: `[num_samples, dim]`.
    method: `frechet_distance`'s method; "sqrtm" is ADM's (and pytorch-fid's) algorithm,
      "eigh" the robust equivalent.

  Returns:
    The distance (a float >= 0).
  """
  mu1, sigma1 = gaussian_stats(ref_features)
  mu2, sigma2 = gaussian_stats(sample_features)
  return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """Inception Score from classifier logits, averaged over consecutive splits (as ADM does).

  Args:
    logits: `[num_samples, num_classes]`; for ADM's number, `logits_unbiased`.
    split_size: samples per split; the last split holds the remainder.

  Returns:
    The mean over splits of `exp(mean_x KL(p(y|x) || p(y)))`, `p(y)` the split's mean
    prediction. 1 for identical predictions, `C` for confident predictions spread evenly
    over `C` classes.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) == 0:
    raise ValueError(f"logits must be [num_samples, num_classes], got shape {logits.shape}")
  if split_size < 1:
    raise ValueError(f"split_size must be >= 1, got {split_size}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start:start + split_size]
    # log of the split's marginal p(y) = mean_x p(y|x), computed without leaving log space.
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    # Terms with p(y|x) == 0 contribute 0 (their log is finite, not -inf, in log space).
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


@jax.jit
def _squared_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`[r, d] x [c, d] -> [r, c]` squared Euclidean distances, clamped at 0 (as ADM)."""
  cross = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
  sq = (jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * cross + jnp.sum(cols * cols, axis=1)[None])
  return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _merge_nearest(nearest: jax.Array, rows: jax.Array, cols: jax.Array, num_cols: jax.Array,
                   k: int) -> jax.Array:
  """Keeps the k+1 smallest squared distances per row, sorted, over one more column block
  whose first `num_cols` columns are real (the rest is padding)."""
  col_valid = jnp.arange(cols.shape[0]) < num_cols
  dist = jnp.where(col_valid[None], _squared_distances(rows, cols), jnp.inf)
  merged = jnp.concatenate([nearest, dist], axis=1)
  return -jax.lax.top_k(-merged, k + 1)[0]


@jax.jit
def _within_block(ref: jax.Array, ref_radii: jax.Array, samples: jax.Array,
                  sample_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For one block pair: which refs lie in some sample ball, which samples in some ref ball."""
  dist = _squared_distances(ref, samples)
  ref_in = jnp.any(dist <= sample_radii[None], axis=1)
  sample_in = jnp.any(dist <= ref_radii[:, None], axis=0)
  return ref_in, sample_in


def _split(values: np.ndarray, chunk: int, fill: float) -> list[tuple[np.ndarray, int]]:
  """Cuts `values` along axis 0 into blocks of exactly `chunk` rows (the last one padded
  with `fill`), so that every block has one shape and compiles once; returns (block, count)."""
  blocks = []
  for start in range(0, len(values), chunk):
    block = values[start:start + chunk]
    count = len(block)
    if count < chunk:
      pad = np.full((chunk - count,) + block.shape[1:], fill, block.dtype)
      block = np.concatenate([block, pad])
    blocks.append((block, count))
  return blocks


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS,
                   chunk_size: int = _CHUNK) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour within the set.

  As in ADM, a point's own distance (0) is counted among the k+1 smallest, so the radius is
  the distance to the k-th nearest *other* point (when no points coincide). Memory is
  `O(chunk_size * (chunk_size + k))` whatever the number of points.

  Args:
    features: `[num_points, dim]`, num_points > k.
    k: neighbourhood size.
    chunk_size: rows and columns per distance block.

  Returns:
    `[num_points]` float32 squared radii.
  """
  features = _check_features(features, "features")
  if len(features) <= k:
    raise ValueError(f"need more than k={k} points for k-NN radii, got {len(features)}")
  blocks = _split(features, min(chunk_size, len(features)), 0.0)
  radii = []
  for rows, num_rows in blocks:
    nearest = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
    for cols, num_cols in blocks:
      nearest = _merge_nearest(nearest, rows, cols, num_cols, k)
    radii.append(np.asarray(nearest[:num_rows, k]))
  return np.concatenate(radii)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = PR_NEIGHBOURS, chunk_size: int = _CHUNK) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's ManifoldEstimator.

  A point is inside a manifold if its squared distance to some point of the other set is <=
  that point's squared k-NN radius. Distances are computed block by block, so 50K x 50K runs
  in bounded memory (on an accelerator when JAX has one).

  Args:
    ref_features: `[num_ref, dim]` (e.g. `pool3` of the reference batch).
    sample_features: `[num_samples, dim]`.
    k: neighbourhood size of the manifold estimate.
    chunk_size: rows and columns per distance block.

  Returns:
    `(precision, recall)`: the fraction of samples inside the reference manifold and the
    fraction of references inside the sample manifold.
  """
  ref_features = _check_features(ref_features, "ref_features")
  sample_features = _check_features(sample_features, "sample_features")
  if ref_features.shape[1] != sample_features.shape[1]:
    raise ValueError(f"feature dimensions differ: {ref_features.shape[1]} vs "
                     f"{sample_features.shape[1]}")
  ref_radii = manifold_radii(ref_features, k, chunk_size)
  sample_radii = manifold_radii(sample_features, k, chunk_size)
  chunk = min(chunk_size, max(len(ref_features), len(sample_features)))
  ref_blocks = _split(ref_features, chunk, 0.0)
  sample_blocks = _split(sample_features, chunk, 0.0)
  # Padding points get radius -1: no distance (>= 0) is within it, so they cover nothing;
  # their own flags are cut off below.
  ref_radii_blocks = _split(ref_radii, chunk, -1.0)
  sample_radii_blocks = _split(sample_radii, chunk, -1.0)
  ref_in = [np.zeros(chunk, bool) for _ in ref_blocks]
  sample_in = [np.zeros(chunk, bool) for _ in sample_blocks]
  for i, ((ref, _), (ref_r, _)) in enumerate(zip(ref_blocks, ref_radii_blocks)):
    for j, ((samples, _), (sample_r, _)) in enumerate(zip(sample_blocks, sample_radii_blocks)):
      block_ref_in, block_sample_in = _within_block(ref, ref_r, samples, sample_r)
      ref_in[i] |= np.asarray(block_ref_in)
      sample_in[j] |= np.asarray(block_sample_in)
  recall = np.concatenate([f[:n] for f, (_, n) in zip(ref_in, ref_blocks)]).mean()
  precision = np.concatenate([f[:n] for f, (_, n) in zip(sample_in, sample_blocks)]).mean()
  return float(precision), float(recall)


def compute_metrics(ref: Mapping[str, np.ndarray], samples: Mapping[str, np.ndarray],
                    method: str = "eigh", split_size: int = IS_SPLIT_SIZE,
                    chunk_size: int = _CHUNK) -> dict[str, float]:
  """ADM's evaluation table from the Inception outputs of a reference set and of samples.

  Args:
    ref: `{"pool3": [N_ref, 2048], "spatial": [N_ref, 2023]}` (e.g. `inception_features`).
    samples: the same for the samples, plus `"logits_unbiased"` `[N, 1008]` for the IS.
    method: `frechet_distance`'s method for FID and sFID.
    split_size: samples per Inception Score split.
    chunk_size: block size of the precision/recall distance computations.

  Returns:
    `{"fid", "sfid", "inception_score", "precision", "recall"}`.
  """
  precision, recall = precision_recall(ref["pool3"], samples["pool3"], chunk_size=chunk_size)
  return {
      "fid": fid_from_features(ref["pool3"], samples["pool3"], method),
      "sfid": fid_from_features(ref["spatial"], samples["spatial"], method),
      "inception_score": inception_score(samples["logits_unbiased"], split_size),
      "precision": precision,
      "recall": recall,
  }


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) == 0:
    raise ValueError(f"{name} must be [num_points, dim], got shape {features.shape}")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} contains NaN or inf")
  return features
