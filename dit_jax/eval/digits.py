"""Self-grading for the digits run: a classifier trained on scikit-learn's real 8x8 digits.

Generated samples are judged the way they would be seen: quantised as a saved PNG would be
(`dit_jax.images.to_uint8`), then fed to a small MLP trained on the real digits. Two numbers come
out: the accuracy of the classifier against the label each sample was conditioned on, and the
Fréchet distance between the MLP's hidden-layer features of the samples and of all 1797 real
digits (an FID analogue in a feature space that knows what digits look like).

The training pipeline maps a digit (values 0..16) to uint8 `round(x * 255 / 16)` and then to
`u8 / 127.5 - 1`; the classifier sees `u8 / 255`, the same [0, 1] scale as `x / 16`, so real
digits and generated samples go through exactly the same quantisation before classification.
"""
from __future__ import annotations

import warnings

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import sklearn.neural_network
import threadpoolctl

from dit_jax.eval.frechet import frechet_distance, gaussian_stats
from dit_jax.images import to_uint8

NUM_CLASSES = 10
IMAGE_SIZE = 8
# The classifier defines the metric, so its settings are fixed here rather than configurable:
# changing any of them changes what a logged Fréchet distance means.
_HIDDEN_SIZE = 128  # Width of the feature space the Fréchet distance is measured in.
_ALPHA = 1e-2  # L2 penalty; held-out accuracy ~0.98 on seeds 0..4 (1e-4: ~0.977).
_MAX_ITER = 1000  # Adam stops on its own tolerance after ~250-300 epochs.
_TEST_FRACTION = 0.2  # Stratified held-out split that `real_accuracy` is measured on.


class DigitsGrader:
  """Grades class-conditional samples of 8x8 digits with an MLP fitted on the real digits.

  Fitting takes about 1-2 s on a CPU and is deterministic for a given seed.

  Attributes:
    seed: seeds the stratified train/held-out split and the MLP initialisation.
    real_accuracy: accuracy of the classifier on the held-out real digits (about 0.98).
  """

  def __init__(self, seed: int = 0):
    self.seed = seed
    digits = sklearn.datasets.load_digits()
    # Real digits through the training pipeline's uint8 mapping: [1797, 8, 8], values 0..255.
    self._real_u8 = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    self._real_labels = digits.target.astype(np.int64)
    inputs = self._real_u8.reshape(len(self._real_u8), -1) / 255.0
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        inputs, self._real_labels, test_size=_TEST_FRACTION, stratify=self._real_labels,
        random_state=seed)
    self._mlp = sklearn.neural_network.MLPClassifier(
        hidden_layer_sizes=(_HIDDEN_SIZE,), activation="relu", alpha=_ALPHA,
        max_iter=_MAX_ITER, random_state=seed)
    # One BLAS thread: the MLP's matmuls are small, and on a busy 2-core machine OpenBLAS's
    # threads spin against the other jobs (a 3 s fit took 60 s). The weights are bitwise the same.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
      self._mlp.fit(x_train, y_train)
    self.real_accuracy = float(self._mlp.score(x_test, y_test))
    # Reference statistics: all real digits, train and held-out alike.
    self._real_mu, self._real_sigma = gaussian_stats(self._hidden(inputs))

  def real_images(self) -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the model sees them, for grading the data itself.

    Returns:
      `(images, labels)`: float32 `[1797, 8, 8, 1]` in [-1, 1] (`u8 / 127.5 - 1`) and int64
      `[1797]` class labels in 0..9.
    """
    images = (self._real_u8.astype(np.float32) / 127.5 - 1.0)[..., None]
    return images, self._real_labels.copy()

  def features(self, images: np.ndarray) -> np.ndarray:
    """Hidden-layer activations of the classifier, float64 `[num_images, 128]`.

    Args:
      images: `[num_images, 8, 8, 1]` or `[num_images, 8, 8]`, float in [-1, 1] (quantised to
        uint8 first, like a saved PNG) or uint8.
    """
    return self._hidden(self._inputs(images, "images"))

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Predicted classes, int64 `[num_images]`; `images` as for `features`."""
    return self._mlp.predict(self._inputs(images, "images")).astype(np.int64)

  def grade(self, images: np.ndarray, labels: np.ndarray) -> dict:
    """Scores samples against the labels they were conditioned on.

    Args:
      images: `[num_images, 8, 8, 1]` or `[num_images, 8, 8]`, float in [-1, 1] or uint8;
        num_images >= 2 (the Fréchet distance needs a covariance).
      labels: integer `[num_images]` in 0..9, the conditioning class of each image.

    Returns:
      A dict with `accuracy` (fraction classified as their conditioning label),
      `frechet_distance` (between the features of `images` and of all real digits),
      `num_samples`, `per_class_accuracy` (10 floats, NaN for a class with no samples) and
      `per_class_count` (10 ints).
    """
    inputs = self._inputs(images, "images")
    labels = np.asarray(labels)
    if labels.shape != (inputs.shape[0],):
      raise ValueError(f"labels must be [num_images] = [{inputs.shape[0]}], "
                       f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise ValueError(f"labels must be in [0, {NUM_CLASSES}), "
                       f"got range [{labels.min()}, {labels.max()}]")
    if inputs.shape[0] < 2:
      raise ValueError(f"images needs at least 2 samples to grade, got {inputs.shape[0]}")

    correct = self._mlp.predict(inputs) == labels
    per_class_count = np.bincount(labels, minlength=NUM_CLASSES)
    per_class_correct = np.bincount(labels, weights=correct, minlength=NUM_CLASSES)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 -> NaN for absent classes.
      per_class_accuracy = per_class_correct / per_class_count
    mu, sigma = gaussian_stats(self._hidden(inputs))
    return {
        "accuracy": float(np.mean(correct)),
        "frechet_distance": frechet_distance(mu, sigma, self._real_mu, self._real_sigma),
        "num_samples": int(inputs.shape[0]),
        "per_class_accuracy": [float(a) for a in per_class_accuracy],
        "per_class_count": [int(c) for c in per_class_count],
    }

  def _inputs(self, images: np.ndarray, name: str) -> np.ndarray:
    """Images -> classifier inputs `[num_images, 64]` in [0, 1], via the PNG quantisation."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not len(images):
      raise ValueError(f"{name} must be [num_images, 8, 8, 1] or [num_images, 8, 8] with "
                       f"num_images >= 1, got shape {np.shape(images)}")
    if images.dtype != np.uint8:
      if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be float in [-1, 1] or uint8, got dtype {images.dtype}")
      images = to_uint8(images)
    return images.reshape(len(images), -1) / 255.0

  def _hidden(self, inputs: np.ndarray) -> np.ndarray:
    """ReLU hidden layer of the MLP, recomputed from its weights: `[num_images, 128]`."""
    return np.maximum(inputs @ self._mlp.coefs_[0] + self._mlp.intercepts_[0], 0.0)
