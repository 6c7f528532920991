"""Random-access image sources: `len(source)`, `source.get(index) -> (uint8 [H, W, C], label)`.

A source only knows how to read example `index`; the order, sharding and preprocessing live
elsewhere (`sampler`, `pipeline`), so every source resumes to the example for free.
"""
import importlib.util
import logging
import os
import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dit_jax.data.tfds_source import TfdsSource

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"))


@runtime_checkable
class Source(Protocol):
  """What the input pipeline reads from."""

  num_classes: int
  # (height, width, channels) of every stored image, or None when sizes vary.
  image_shape: tuple[int, int, int] | None

  def __len__(self) -> int:
    ...

  def get(self, index: int) -> tuple[np.ndarray, int]:
    """Example `index`: uint8 `[height, width, channels]` and its integer label."""
    ...


class DigitsSource:
  """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; ships with sklearn, no download).

  Pixel values 0..16 are scaled to uint8 `round(x * 255 / 16)`, so 16 -> 255.
  """

  num_classes = 10
  image_shape = (8, 8, 1)

  def __init__(self):
    images, labels = load_digits()
    self._images = np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    self._labels = labels.astype(np.int64)

  def __len__(self) -> int:
    return len(self._labels)

  def get(self, index: int) -> tuple[np.ndarray, int]:
    """uint8 `[8, 8, 1]` and the digit."""
    return self._images[index], int(self._labels[index])


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: float64 images `[1797, 8, 8]` (values 0..16) and int labels, as
  `sklearn.datasets.load_digits()` returns them.

  Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixels and the
  label per row, which `load_digits` parses the same way) without importing scikit-learn, which
  costs a training process about 1.7 s of start-up; through `load_digits` where the file is not
  there.
  """
  spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
  locations = (spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      data = np.loadtxt(path, delimiter=",")
      return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  return digits.images, digits.target


class FolderSource:
  """A user's image folder: `root/<class name>/**/<image>`, one sub-folder per class.

  Classes are the sorted sub-folder names (label = position in that list); files are those with
  an image extension, sorted by path, so every process and every run sees the same indices.
  Images are decoded with PIL and converted to RGB: `[height, width, 3]`.

  An unreadable file never stops training: reading it logs one warning naming the file, and
  `get` deterministically returns the next readable index instead (`(i + 1) % n`, ...), so the
  substitute is the same in every run and every thread. `num_skipped` / `skipped_files` count
  the bad files found so far (they are discovered lazily, when first read). A class folder
  without images, or a folder where no file decodes, is refused when the source is made.
  """

  image_shape = None  # sizes vary.

  def __init__(self, root: str | os.PathLike[str]):
    root = os.fspath(root)
    if not os.path.exists(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (config.data.folder)")
    if not os.path.isdir(root):
      raise ValueError(f"image folder {root!r} is not a directory (config.data.folder)")
    self.root = root
    self.class_names = sorted(
        entry.name for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith("."))
    if not self.class_names:
      raise ValueError(
          f"image folder {root!r} has no class sub-folders: expected {root}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(self.class_names):
      class_files = []
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        class_files.extend(
            os.path.join(dirpath, f) for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
      if not class_files:  # an empty class would be trained on without a single example
        raise ValueError(
            f"image folder {root!r}: class folder {os.path.join(root, name)!r} holds no images "
            f"(extensions {sorted(IMAGE_EXTENSIONS)}); add images or remove it")
      class_files.sort()
      files.extend(class_files)
      labels.extend([label] * len(class_files))
    self.files = files
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = len(self.class_names)
    self._bad: set[int] = set()
    self._lock = threading.Lock()  # `get` runs in the prefetch threads.
    self._check_readable()

  def _check_readable(self) -> None:
    """Fails now, not in a training thread, when no file decodes (reads up to the first good)."""
    for path in self.files:
      try:
        _read_rgb(path)
        return
      except Exception:  # pylint: disable=broad-except  (any PIL failure: see _decode)
        continue
    raise ValueError(f"image folder {self.root!r}: none of its {len(self.files)} image files "
                     f"could be decoded (e.g. {self.files[0]!r})")

  def __len__(self) -> int:
    return len(self.files)

  @property
  def num_skipped(self) -> int:
    """Unreadable files found so far."""
    with self._lock:
      return len(self._bad)

  @property
  def skipped_files(self) -> list[str]:
    """Paths of the unreadable files found so far, sorted."""
    with self._lock:
      return sorted(self.files[i] for i in self._bad)

  def _decode(self, index: int) -> np.ndarray | None:
    path = self.files[index]
    try:
      return _read_rgb(path)
    # PIL reports corrupt data with many exception types (OSError, SyntaxError, ValueError,
    # DecompressionBombError, struct.error, ...): any of them means "skip this file".
    except Exception as e:  # pylint: disable=broad-except
      with self._lock:
        first_time = index not in self._bad
        self._bad.add(index)
      if first_time:
        logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
      return None

  def get(self, index: int) -> tuple[np.ndarray, int]:
    """uint8 `[height, width, 3]` and the class index of file `index` (or of the next readable)."""
    n = len(self.files)
    for offset in range(n):
      j = (index + offset) % n
      with self._lock:
        known_bad = j in self._bad
      if known_bad:
        continue
      image = self._decode(j)
      if image is not None:
        return image, int(self.labels[j])
    raise RuntimeError(f"none of the {n} image files under {self.root!r} could be decoded")


def _read_rgb(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def make_source(name: str, *, folder: str = "", split: str = "train",
                data_dir: str | None = None, channels: int | None = None) -> Source:
  """A source by name.

  Args:
    name: "digits" | "folder" | a tfds dataset name (e.g. "imagenet2012").
    folder: the image folder, for "folder".
    split: the tfds split.
    data_dir: the tfds data directory (None: tfds' default, `~/tensorflow_datasets`).
    channels: tfds only: None keeps the stored channels; 3 makes grayscale images RGB.

  Returns:
    A `Source`.
  """
  if not name:
    raise ValueError("config.data.name is not set: 'digits', 'folder' or a tfds dataset name")
  if name == "digits":
    return DigitsSource()
  if name == "folder":
    if not folder:
      raise ValueError("config.data.name='folder' needs config.data.folder (the image folder)")
    return FolderSource(folder)
  return TfdsSource(name, split=split, data_dir=data_dir, channels=channels)


def source_from_config(data: Any) -> Source:
  """The source `config.data` describes (its `name`, `folder`, `split`, `data_dir`, `channels`)."""
  return make_source(data.name, folder=data.folder, split=data.split, data_dir=data.data_dir,
                     channels=data.channels)
