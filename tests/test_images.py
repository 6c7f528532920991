"""Tests for dit_jax.images: uint8 quantisation, grid layout and no-clobber PNG writes."""
import os

import numpy as np
import pytest
from PIL import Image

from dit_jax.images import make_grid, save_png, to_uint8


def test_to_uint8_endpoints_and_midpoint():
  # 0 maps to 127.5, which numpy rounds half-to-even: 128.
  assert np.round(127.5) == 128
  out = to_uint8(np.array([-1.0, 0.0, 1.0], np.float32))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [0, 128, 255])


def test_to_uint8_clips_out_of_range():
  out = to_uint8(np.array([-3.0, -1.0001, 1.0001, 7.0, -np.inf, np.inf]))
  np.testing.assert_array_equal(out, [0, 0, 255, 255, 0, 255])


def test_to_uint8_inverts_the_pipeline_mapping():
  u8 = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  images = u8.astype(np.float32) / 127.5 - 1.0
  out = to_uint8(images)
  assert out.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(out, u8)


def test_to_uint8_rejects_nan_and_integers():
  with pytest.raises(ValueError, match="NaN"):
    to_uint8(np.array([0.0, np.nan]))
  with pytest.raises(ValueError, match="floating point"):
    to_uint8(np.array([0, 255], np.uint8))


def _constant_images(num, height, width, channels=1):
  """Image k is filled with the value 10 * (k + 1)."""
  values = (10 * (np.arange(num) + 1)).astype(np.uint8)
  return np.broadcast_to(values[:, None, None, None], (num, height, width, channels)).copy()


def test_make_grid_places_image_k_row_major():
  images = _constant_images(5, 2, 3)
  grid = make_grid(images, rows=2, pad=1)
  # cols = ceil(5 / 2) = 3; cells are (2 + 1) x (3 + 1) plus one border pixel.
  assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
  assert grid.dtype == np.uint8
  expected = np.zeros_like(grid)
  for k in range(5):
    r, c = k // 3, k % 3
    expected[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c] = 10 * (k + 1)
  np.testing.assert_array_equal(grid, expected)
  # The sixth cell (row 1, col 2) has no image and stays padding.
  assert np.all(grid[4:6, 9:12] == 0)


def test_make_grid_pad_value_and_zero_pad():
  images = _constant_images(4, 2, 2)
  grid = make_grid(images, rows=2, pad=2, pad_value=255)
  assert grid.shape == (2 * 4 + 2, 2 * 4 + 2, 1)
  assert np.all(grid[:2] == 255) and np.all(grid[:, :2] == 255)
  assert np.all(grid[4:6] == 255) and np.all(grid[:, 4:6] == 255)
  assert np.all(grid[2:4, 6:8] == 20)
  tight = make_grid(images, rows=1, pad=0)
  np.testing.assert_array_equal(tight[..., 0], np.repeat([10, 20, 30, 40], 2)[None].repeat(2, 0))


def test_make_grid_upscale_is_nearest_neighbour():
  image = np.array([[1, 2], [3, 4]], np.uint8)[None, :, :, None]
  grid = make_grid(image, rows=1, pad=1, upscale=3)
  assert grid.shape == (2 * 3 + 2, 2 * 3 + 2, 1)
  expected = np.array([[1] * 3 + [2] * 3] * 3 + [[3] * 3 + [4] * 3] * 3, np.uint8)
  np.testing.assert_array_equal(grid[1:-1, 1:-1, 0], expected)
  assert np.all(grid[0] == 0) and np.all(grid[-1] == 0)


def test_make_grid_quantises_floats_and_keeps_channels():
  images = np.stack([np.full((2, 2, 3), -1.0), np.full((2, 2, 3), 1.0)]).astype(np.float32)
  grid = make_grid(images, rows=2, pad=1, pad_value=7)
  assert grid.shape == (7, 4, 3)
  assert np.all(grid[1:3, 1:3] == 0) and np.all(grid[4:6, 1:3] == 255)
  assert np.all(grid[0] == 7) and np.all(grid[3] == 7)


def test_make_grid_rejects_bad_arguments():
  with pytest.raises(ValueError, match="images"):
    make_grid(np.zeros((2, 8, 8), np.uint8), rows=1)
  with pytest.raises(ValueError, match="channels"):
    make_grid(np.zeros((2, 8, 8, 2), np.uint8), rows=1)
  with pytest.raises(ValueError, match="rows"):
    make_grid(np.zeros((2, 8, 8, 1), np.uint8), rows=0)
  with pytest.raises(ValueError, match="upscale"):
    make_grid(np.zeros((2, 8, 8, 1), np.uint8), rows=1, upscale=0)


def test_save_png_round_trips_grayscale_and_rgb(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, size=(9, 13, 1), dtype=np.uint8)
  path = save_png(tmp_path / "nested" / "dir" / "gray.png", gray)
  assert path == str(tmp_path / "nested" / "dir" / "gray.png")
  with Image.open(path) as im:
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), gray[..., 0])
  rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  with Image.open(save_png(str(tmp_path / "rgb.png"), rgb)) as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
  # Only the two PNGs: no temporary files are left behind.
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["gray.png", "rgb.png"]


def test_save_png_never_overwrites(tmp_path):
  path = tmp_path / "grid.png"
  first = np.full((4, 4, 1), 17, np.uint8)
  save_png(path, first)
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match="grid.png"):
    save_png(path, np.full((4, 4, 1), 200, np.uint8))
  assert path.read_bytes() == before
  with Image.open(path) as im:
    np.testing.assert_array_equal(np.asarray(im), first[..., 0])
  assert os.listdir(tmp_path) == ["grid.png"]


def test_save_png_failure_leaves_no_file(tmp_path, monkeypatch):
  def broken_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG partial")
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    save_png(tmp_path / "out.png", np.zeros((4, 4, 1), np.uint8))
  assert os.listdir(tmp_path) == []


def test_save_png_rejects_float_and_bad_shape(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    save_png(tmp_path / "a.png", np.zeros((4, 4, 1), np.float32))
  with pytest.raises(ValueError, match="channels"):
    save_png(tmp_path / "b.png", np.zeros((4, 4, 2), np.uint8))
  assert not list(tmp_path.iterdir())
