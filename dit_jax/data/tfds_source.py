"""tfds datasets as random-access sources (array_record files, `tfds.data_source`).

tensorflow_datasets is imported inside `TfdsSource`, never at module level: `dit_jax.data` must
import on accelerator images that carry jax but not the TensorFlow stack. TensorFlow (if
installed) is imported first, quietly and with the GPUs hidden from it (`logs.import_tensorflow`):
tfds may reach for it on its own (it opens a `gs://` data_dir through epath, hence through
TensorFlow's GCS client), and by then it must be off the accelerators.
"""
import os
from typing import Any

import numpy as np

from dit_jax import cli, logs


class DatasetNotFoundError(FileNotFoundError):
  """A tfds dataset is not prepared (in a random-access format) where the config points."""


# The command that prepares a dataset (dit_jax/data/prepare.py; any tfds name, no apache_beam).
PREPARE_COMMAND = "{python} -m dit_jax.data.prepare {name} --data_dir {data_dir}"


def default_data_dir() -> str:
  """tfds's default data_dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")


def _preparation_help(name: str, data_dir: str, manual_instructions: str | None) -> str:
  lines = []
  if manual_instructions:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    lines.append(f"{name} needs a manual download: put its files in {manual_dir} "
                 f"(or pass --manual_dir DIR to the command below). tfds says:")
    lines.extend("    " + line.strip() for line in manual_instructions.strip().splitlines())
    lines.append("Then prepare it with:")
  else:
    lines.append("Prepare it (tfds downloads it) with:")
  lines.append("    " + PREPARE_COMMAND.format(python=cli.python_command(), name=name,
                                               data_dir=data_dir))
  lines.append("It writes array_record files: the pipeline reads examples by index, which the "
               "tfds default, tfrecord, cannot do.")
  return "\n".join(lines)


class TfdsSource:
  """A prepared tfds dataset read by index: records `{"image": uint8 [H, W, C], "label": int}`.

  Nothing is ever downloaded: a dataset that is not prepared under `data_dir` raises
  `DatasetNotFoundError` explaining where the files must be and how to prepare them.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               channels: int | None = None):
    """Opens `data_dir/name/<version>`.

    Args:
      name: tfds dataset name, optionally with config and version ("imagenet2012", "mnist:3.*.*").
      split: tfds split string ("train", "train[:10%]", ...).
      data_dir: the tfds data directory; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
      channels: None keeps the stored channels (grayscale stays `[H, W, 1]`); 3 repeats a single
        channel to RGB; 1 requires single-channel data.
    """
    if channels not in (None, 1, 3):
      raise ValueError(f"config.data.channels must be None, 1 or 3, got {channels!r}")
    logs.import_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    self.name, self.split, self.data_dir, self.channels = name, split, data_dir, channels
    # tfds warns of each version folder without its metadata, which the error below explains.
    with logs.without_warnings("absl"):
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"config.data.name={name!r} is neither 'digits', 'folder' nor a tfds dataset "
            f"(tfds has no builder of that name)") from e
      prepared = builder.is_prepared()
    dataset_dir = os.path.join(data_dir, name.split(":")[0])
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if not prepared:
      raise DatasetNotFoundError(
          f"tfds dataset {name!r} is not prepared in {dataset_dir} (expected "
          f"{builder.data_dir}, from config.data.data_dir={data_dir!r}).\n"
          + _preparation_help(name, data_dir, manual))
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in ("array_record", "parquet"):
      raise DatasetNotFoundError(
          f"tfds dataset {name!r} in {builder.data_dir} is stored as {file_format}, which cannot "
          f"be read by index. Prepare it again in another data_dir (or delete it first).\n"
          + _preparation_help(name, data_dir, manual))
    features = builder.info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"tfds dataset {name!r} has no 'image' and 'label' features: "
                       f"{list(features.keys())}")
    self.num_classes = int(features["label"].num_classes)
    shape = tuple(features["image"].shape)
    stored_shape = shape if all(isinstance(d, int) for d in shape) else None
    if stored_shape is not None and channels is not None:
      stored_shape = stored_shape[:2] + (channels,)
    self.image_shape: tuple[int, int, int] | None = stored_shape
    self._data = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._data)

  def get(self, index: int) -> tuple[np.ndarray, int]:
    """uint8 `[height, width, channels]` and the label of record `index`."""
    record: dict[str, Any] = self._data[int(index)]
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if self.channels == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif self.channels is not None and image.shape[-1] != self.channels:
      raise ValueError(f"{self.name} record {index} has {image.shape[-1]} channels, "
                       f"config.data.channels={self.channels}")
    return image, int(record["label"])
