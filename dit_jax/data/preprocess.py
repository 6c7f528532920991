"""Per-example preprocessing: ADM's center crop, a deterministic horizontal flip, [-1, 1] pixels."""
import numpy as np
from PIL import Image

# A mask so that flips are not the same bit stream as any other use of the seed.
_FLIP_SALT = np.uint64(0x5DEECE66D2B1F1A3)
_UINT64 = 2**64


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], mode="L")
  if image.shape[-1] == 3:
    return Image.fromarray(image, mode="RGB")
  raise ValueError(f"expected 1 or 3 channels, got image of shape {image.shape}")


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM's (guided-diffusion's, and so DiT's) resize-and-center-crop, step for step.

  Halve the image with a box filter while its short side is at least twice `image_size` (cheap,
  alias-free downsampling), resize bicubically so that the short side is `image_size`, then crop
  the center. An image already `image_size` square comes back unchanged.

  Args:
    image: uint8 `[height, width, channels]`, channels 1 (PIL mode "L") or 3 (RGB).
    image_size: side of the output.

  Returns:
    uint8 `[image_size, image_size, channels]`.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected uint8 [H, W, C], got {image.dtype} {image.shape}")
  if image.shape[:2] == (image_size, image_size):
    return image  # what PIL would return too (a same-size resize is a copy), without the copy.
  channels = image.shape[-1]
  pil_image = _to_pil(image)
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.asarray(pil_image).reshape(pil_image.size[1], pil_image.size[0], channels)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32 in [-1, 1]: `x / 127.5 - 1`, i.e. DiT's `Normalize(0.5, 0.5)`.

  Args:
    images: uint8, any shape (e.g. `[batch, height, width, channels]`).

  Returns:
    float32, same shape.
  """
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective mix of uint64 arrays (wraps modulo 2**64)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, positions: np.ndarray) -> np.ndarray:
  """Whether each example is mirrored: probability 1/2, a pure function of (seed, position).

  A hash instead of a stateful RNG, so a resumed run (or another process, or another thread
  order) flips exactly the examples an uninterrupted run would have.

  Args:
    seed: the data seed.
    positions: int `[n]`, global example positions (`step * global_batch_size + row`).

  Returns:
    bool `[n]`.
  """
  positions = np.atleast_1d(np.asarray(positions, np.int64)).astype(np.uint64)
  key = _splitmix64(np.array([seed % _UINT64], np.uint64) ^ _FLIP_SALT)
  return (_splitmix64(key ^ _splitmix64(positions)) >> np.uint64(63)).astype(bool)


def horizontal_flip(image: np.ndarray) -> np.ndarray:
  """Mirror `[height, width, channels]` left-right."""
  return image[:, ::-1]
