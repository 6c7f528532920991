"""On-disk format of a pre-extracted latent dataset: file names, metadata, the record layout.

A latent directory (a local folder or a `gs://` URL: `LatentSource` says how one is read) holds

  latents-000000.array_record, latents-000001.array_record, ...
      chunk `k` holds examples `[k * chunk_size, min((k + 1) * chunk_size, num_examples))`,
      one ArrayRecord record per example (group_size 1, uncompressed), in index order;
  plan.json
      the settings of the extraction (written first, so a rerun can refuse to mix settings);
  metadata.json
      written last, only once every chunk exists: a directory without it is incomplete.

Record layout (little-endian, C order, no header; `record_bytes` bytes in all):

  moments  dtype [2, h, w, 2 * c]   float16 or float32 (metadata "dtype")
  label    int32 []                 4 bytes

`moments[0]` belongs to the center-cropped image and `moments[1]` to its horizontal mirror; the
last axis is the VAE posterior `concat([mean, logvar], -1)` (diffusers' moments order, logvar
already clamped to [-30, 20]). `h, w, c` are metadata "latent_shape". Any reader (grain, tfds'
ArrayRecordDataSource, numpy) parses a record with two `np.frombuffer` calls.
"""
import json
from typing import Any

import numpy as np

from dit_jax import fs

FORMAT = "dit_jax.latents/v1"
METADATA_NAME = "metadata.json"
PLAN_NAME = "plan.json"
# Uncompressed: reading a record is then one pread plus a memcpy (about 4x faster random access
# than the zstd default, measured), while float latents compress by under 10%.
WRITER_OPTIONS = "group_size:1,uncompressed"
# Optimised for random access (as grain's ArrayRecordDataSource opens its readers).
READER_OPTIONS = "readahead_buffer_size:0"
DTYPES = ("float32", "float16")
LABEL_DTYPE = np.dtype("<i4")

EXTRACT_COMMAND = ("{python} -m dit_jax.latents.extract --config CONFIG "
                   "--config.data.data_dir=DATA_DIR --vae VAE_DIR --out {directory}")


def storage_dtype(name: str) -> np.dtype:
  """The little-endian numpy dtype of the stored moments ("float32" or "float16")."""
  if name not in DTYPES:
    raise ValueError(f"latent dtype must be one of {DTYPES}, got {name!r}")
  return np.dtype(name).newbyteorder("<")


def record_bytes(latent_shape: tuple[int, int, int], dtype: str) -> int:
  """Size of one record for latents `[h, w, c]`: the pair of moments plus the label."""
  h, w, c = latent_shape
  return 2 * h * w * 2 * c * storage_dtype(dtype).itemsize + LABEL_DTYPE.itemsize


def encode_record(moments: np.ndarray, label: int, dtype: str) -> bytes:
  """Serializes one example.

  Args:
    moments: `[2, h, w, 2c]` (original, flipped), any float dtype; cast to `dtype`.
    label: the class index.
    dtype: "float32" or "float16".

  Returns:
    `record_bytes((h, w, c), dtype)` bytes.
  """
  moments = np.asarray(moments)
  if moments.ndim != 4 or moments.shape[0] != 2 or moments.shape[-1] % 2:
    raise ValueError(f"moments must be [2, h, w, 2c], got {moments.shape}")
  data = np.ascontiguousarray(moments, storage_dtype(dtype)).tobytes()
  return data + np.asarray(label, LABEL_DTYPE).tobytes()


def decode_record(record: bytes, latent_shape: tuple[int, int, int],
                  dtype: str) -> tuple[np.ndarray, int]:
  """Parses one record (the inverse of `encode_record`).

  Args:
    record: the bytes of one record.
    latent_shape: `(h, w, c)`, metadata "latent_shape".
    dtype: the stored dtype, metadata "dtype".

  Returns:
    (moments, label): a read-only `[2, h, w, 2c]` view in the stored dtype, and the label.
  """
  expected = record_bytes(latent_shape, dtype)
  if len(record) != expected:
    raise ValueError(f"a latent record has {len(record)} bytes, expected {expected} for "
                     f"latent shape {tuple(latent_shape)} and dtype {dtype}")
  h, w, c = latent_shape
  count = 2 * h * w * 2 * c
  moments = np.frombuffer(record, storage_dtype(dtype), count).reshape(2, h, w, 2 * c)
  label = np.frombuffer(record, LABEL_DTYPE, 1, offset=len(record) - LABEL_DTYPE.itemsize)
  return moments, int(label[0])


def num_chunks(num_examples: int, chunk_size: int) -> int:
  """Number of chunk files: `ceil(num_examples / chunk_size)`."""
  return -(-num_examples // chunk_size)


def chunk_name(chunk: int) -> str:
  """The file name of chunk `chunk`: `latents-{chunk:06d}.array_record`."""
  return f"latents-{chunk:06d}.array_record"


def chunk_path(directory: str, chunk: int) -> str:
  """The file of chunk `chunk`: `directory/latents-{chunk:06d}.array_record`."""
  return fs.join(directory, chunk_name(chunk))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON through `fs.write_text`: readers never see half a file (locally or on GCS)."""
  fs.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path`; a damaged file is a ValueError naming it (json's own message
  says where in the file, but not which file)."""
  try:
    obj = json.loads(fs.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
  return obj
