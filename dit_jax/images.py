"""Image conversion for saving samples: float [-1, 1] -> uint8, grids, and no-clobber PNG writes.

Everything here is host-side numpy, NHWC. The model's images live in [-1, 1]; what gets saved,
shown or graded is the uint8 quantisation `round((x + 1) * 127.5)`, so `to_uint8` is the one place
that mapping is defined.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from dit_jax import fs


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Quantises float images in [-1, 1] to uint8 in [0, 255], any shape.

  Values are clipped to [-1, 1] (so +-inf saturate), then mapped by `round((x + 1) * 127.5)`
  with numpy's round-half-to-even: -1 -> 0, 1 -> 255, and 0 -> 127.5 -> 128 (128 is the even
  neighbour). This is the inverse of `u8 / 127.5 - 1` for every uint8 value.

  Args:
    images: floating-point array of any shape, e.g. `[batch, height, width, channels]`.

  Returns:
    uint8 array of the same shape.

  Raises:
    ValueError: if `images` is not floating point or contains NaN.
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
  if np.any(np.isnan(images)):
    raise ValueError("images contains NaN")
  # float64 so that (x + 1) * 127.5 of a float32 u8/127.5 - 1 lands within round-off of u8.
  scaled = (np.clip(images.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5
  return np.round(scaled).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, pad: int = 1, upscale: int = 1, *,
              pad_value: int = 0) -> np.ndarray:
  """Tiles a batch of images into one uint8 image, row-major.

  Image k goes to grid row `k // cols`, column `k % cols`, with `cols = ceil(num_images / rows)`;
  cells past the last image stay filled with `pad_value`.

  Args:
    images: `[num_images, height, width, channels]`, float in [-1, 1] (quantised with
      `to_uint8`) or uint8. channels is 1 (grayscale), 3 (RGB) or 4 (RGBA).
    rows: number of grid rows, >= 1.
    pad: pixels of `pad_value` between cells and around the border, >= 0.
    upscale: integer nearest-neighbour magnification of each image, >= 1 (8x8 digits are
      unreadable at 1).
    pad_value: uint8 value of the padding.

  Returns:
    uint8 `[rows * (height * upscale + pad) + pad, cols * (width * upscale + pad) + pad,
    channels]`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be [num_images, height, width, channels] with "
                     f"num_images >= 1, got shape {images.shape}")
  if images.shape[-1] not in (1, 3, 4):
    raise ValueError(f"images must have 1, 3 or 4 channels, got shape {images.shape}")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if not isinstance(rows, (int, np.integer)) or rows < 1:
    raise ValueError(f"rows must be a positive integer, got {rows!r}")
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  if upscale < 1:
    raise ValueError(f"upscale must be >= 1, got {upscale}")
  if not 0 <= pad_value <= 255:
    raise ValueError(f"pad_value must be in [0, 255], got {pad_value}")

  num, height, width, channels = images.shape
  cols = math.ceil(num / rows)
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  cell_h, cell_w = height * upscale + pad, width * upscale + pad
  grid = np.full((rows * cell_h + pad, cols * cell_w + pad, channels), pad_value, np.uint8)
  for k, image in enumerate(images):
    top, left = pad + (k // cols) * cell_h, pad + (k % cols) * cell_w
    grid[top:top + height * upscale, left:left + width * upscale] = image
  return grid


def encode_png(image: np.ndarray) -> bytes:
  """A uint8 image as PNG bytes (what `save_png` writes and TensorBoard shows).

  Args:
    image: uint8 `[height, width, channels]` with channels 1, 3 or 4, or `[height, width]`.

  Raises:
    ValueError: on a wrong dtype or shape.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (see to_uint8), got dtype {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]  # PIL stores one channel as mode "L".
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    raise ValueError(f"image must be [height, width, channels] with 1, 3 or 4 channels, "
                     f"got shape {image.shape}")
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format="PNG")
  return encoded.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
  """Writes a uint8 image as PNG without ever replacing an existing file (`fs.write_bytes`: a
  local path or a `gs://` URL; never half a file under the name).

  Args:
    path: destination; missing parent directories are created.
    image: uint8 `[height, width, channels]` with channels 1, 3 or 4, or `[height, width]`.

  Returns:
    The path written, as a string.

  Raises:
    FileExistsError: if `path` already exists (its content is left untouched).
    ValueError: on a wrong dtype or shape.
  """
  path = os.fspath(path)
  encoded = encode_png(image)
  if fs.exists(path):
    raise FileExistsError(f"refusing to overwrite existing file {path}")
  fs.write_bytes(path, encoded, overwrite=False)
  return path
