"""Input pipeline: sources, ADM center crop, flips, resumable order, process shards, globals."""
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import train_utils
from conftest import ROOT
from configs import digits as digits_config
from dit_jax.data import sources
from dit_jax.data import (DatasetNotFoundError, DigitsSource, FolderSource, InputPipeline,
                          TfdsSource, center_crop_arr, epoch_permutation, flip_mask,
                          global_batch_indices, make_source, process_slice, to_float,
                          to_global)
from dit_jax.models import build_model
from dit_jax.train.inputs import make_inputs


class ArraySource:
  """In-memory source: image `i` is an asymmetric 6x6 gradient plus `i`, label `i % 7`."""

  num_classes = 7
  image_shape = (6, 6, 1)

  def __init__(self, n: int):
    base = np.arange(36, dtype=np.uint8).reshape(6, 6, 1) * 3
    self.images = [(base + i).astype(np.uint8) for i in range(n)]

  def __len__(self):
    return len(self.images)

  def get(self, index):
    return self.images[index], index % 7


def pipeline_for(source, **kwargs):
  defaults = dict(image_size=6, global_batch_size=8, seed=3, random_flip=True,
                  process_index=0, process_count=1, num_threads=2, prefetch=2)
  return InputPipeline(source, **{**defaults, **kwargs})


def test_digits_source_matches_sklearn():
  source = DigitsSource()
  digits = load_digits()
  assert len(source) == 1797 and source.num_classes == 10 and source.image_shape == (8, 8, 1)
  image, label = source.get(0)
  assert image.dtype == np.uint8 and image.shape == (8, 8, 1)
  assert label == 0 == digits.target[0]
  np.testing.assert_array_equal(image[..., 0], np.round(digits.images[0] * 255 / 16))
  images = np.stack([source.get(i)[0] for i in range(len(source))])
  assert images.max() == 255 and images.min() == 0
  assert [source.get(i)[1] for i in (1, 5, 1796)] == list(digits.target[[1, 5, 1796]])
  np.testing.assert_array_equal(images[..., 0], np.round(digits.images * 255 / 16))
  np.testing.assert_array_equal([source.get(i)[1] for i in range(len(source))], digits.target)


def test_digits_without_the_shipped_file_come_from_sklearn(monkeypatch):
  """Where scikit-learn's data file is not found, `load_digits` is scikit-learn's own."""
  shipped = sources.load_digits()
  monkeypatch.setattr(sources.os.path, "isfile", lambda path: False)
  images, labels = sources.load_digits()
  digits = load_digits()
  for ours in (shipped, (images, labels)):
    np.testing.assert_array_equal(ours[0], digits.images)
    np.testing.assert_array_equal(ours[1], digits.target)
    assert ours[0].dtype == digits.images.dtype and ours[0].shape == (1797, 8, 8)


def test_a_digits_run_starts_without_the_libraries_it_does_not_use():
  """What train.py on digits imports before its first step leaves out scikit-learn (the digits
  are read from its file), diffrax (only ode-dopri5 solves with it) and TensorFlow (tfds and
  gs:// only): together about 2.5 s of every run's start-up on a 2-core machine."""
  with tempfile.TemporaryDirectory() as workdir:
    command = train_utils.train_command(workdir)
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=train_utils.env_with_devices(1))
  assert result.returncode == 0, result.stderr[-2000:]
  imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")}
  assert "dit_jax.train.loop" in imported and "dit_jax.samplers.flow_ode" in imported
  assert not {m for m in imported if m.split(".")[0] in ("sklearn", "diffrax", "tensorflow")}


def adm_reference(image: np.ndarray, image_size: int) -> np.ndarray:
  """guided-diffusion's center_crop_arr, on an RGB image."""
  pil = Image.fromarray(image)
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.array(pil)
  y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def pattern(height: int, width: int) -> np.ndarray:
  y, x = np.mgrid[:height, :width]
  return np.stack([(x * 7 + y * 3) % 256, (x * y) % 251, (y * 5) % 256], -1).astype(np.uint8)


def test_center_crop_is_identity_at_the_right_size():
  image = pattern(32, 32)
  np.testing.assert_array_equal(center_crop_arr(image, 32), image)
  np.testing.assert_array_equal(center_crop_arr(image[..., :1], 32), image[..., :1])


def test_center_crop_spelled_out_with_pil():
  image = pattern(300, 200)  # PIL size (200, 300): one BOX halving to (100, 150), then bicubic.
  half = Image.fromarray(image).resize((100, 150), resample=Image.BOX)
  scaled = np.array(half.resize((64, 96), resample=Image.BICUBIC))
  expected = scaled[16:80, 0:64]
  out = center_crop_arr(image, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  # Without the BOX step the result differs: the halving loop really ran.
  direct = np.array(Image.fromarray(image).resize((64, 96), resample=Image.BICUBIC))[16:80]
  assert np.abs(direct.astype(int) - out).max() > 10


def test_center_crop_halves_repeatedly_for_big_images():
  image = pattern(700, 1000)  # PIL size (1000, 700) -> (500, 350) -> (250, 175) -> (125, 87).
  pil = Image.fromarray(image)
  for size in ((500, 350), (250, 175), (125, 87)):
    pil = pil.resize(size, resample=Image.BOX)
  scaled = np.array(pil.resize((round(125 * 64 / 87), 64), resample=Image.BICUBIC))
  assert scaled.shape == (64, 92, 3)
  np.testing.assert_array_equal(center_crop_arr(image, 64), scaled[:, 14:78])
  np.testing.assert_array_equal(center_crop_arr(image, 64), adm_reference(image, 64))
  np.testing.assert_array_equal(center_crop_arr(pattern(40, 90), 64), adm_reference(
      pattern(40, 90), 64))  # upsampling


def test_center_crop_properties():
  constant = np.full((123, 77, 3), 77, np.uint8)
  np.testing.assert_array_equal(center_crop_arr(constant, 32), np.full((32, 32, 3), 77))
  half = pattern(300, 100)
  symmetric = np.concatenate([half, half[:, ::-1]], axis=1)  # left-right mirror symmetric.
  out = center_crop_arr(symmetric, 64)
  np.testing.assert_array_equal(out, out[:, ::-1])
  # One channel ("L") resamples like each band of an RGB image.
  gray = symmetric[..., :1]
  out_gray = center_crop_arr(gray, 64)
  assert out_gray.shape == (64, 64, 1)
  rgb_out = center_crop_arr(np.repeat(gray, 3, -1), 64)
  np.testing.assert_array_equal(out_gray[..., 0], rgb_out[..., 1])


def test_to_float_range():
  x = np.array([0, 127, 128, 255], np.uint8)
  y = to_float(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, (x / 255 - 0.5) / 0.5, atol=1e-6)
  assert y[0] == -1.0 and y[-1] == 1.0


def test_flip_mask_is_a_deterministic_fair_coin():
  positions = np.arange(20_000)
  mask = flip_mask(5, positions)
  assert mask.dtype == bool and 0.48 < mask.mean() < 0.52
  np.testing.assert_array_equal(mask, flip_mask(5, positions))
  np.testing.assert_array_equal(mask[[17, 4242]], flip_mask(5, [17, 4242]))  # per position.
  assert 0.4 < (mask != flip_mask(6, positions)).mean() < 0.6  # seeds are independent.


def test_pipeline_flips_exactly_the_masked_examples():
  source = ArraySource(50)
  with pipeline_for(source, random_flip=True) as flipped, \
      pipeline_for(source, random_flip=False) as plain:
    num_flipped = 0
    for step in (0, 9):
      a, b = flipped.local_batch(step), plain.local_batch(step)
      mask = flip_mask(3, step * 8 + np.arange(8))
      num_flipped += mask.sum()
      np.testing.assert_array_equal(a["images"][mask], b["images"][mask][:, :, ::-1])
      np.testing.assert_array_equal(a["images"][~mask], b["images"][~mask])
      # random_flip=False: the images are the source's, unmirrored.
      indices = plain.global_indices(step)
      np.testing.assert_array_equal(
          b["images"], to_float(np.stack([source.images[i] for i in indices])))
      np.testing.assert_array_equal(b["labels"], indices % 7)
      assert b["labels"].dtype == np.int32 and b["images"].dtype == np.float32
  assert 0 < num_flipped < 16  # both kinds were compared.


def test_every_example_once_per_epoch_across_batch_boundaries():
  n, batch = 103, 10
  order = np.concatenate([global_batch_indices(s, batch, n, seed=1) for s in range(21)])
  epoch0, epoch1 = order[:n], order[n:2 * n]
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  np.testing.assert_array_equal(epoch0, epoch_permutation(1, 0, n))
  np.testing.assert_array_equal(epoch1, epoch_permutation(1, 1, n))
  assert (epoch0 != epoch1).any()
  # Step 10 holds positions 100..109: 3 from the end of epoch 0, 7 from the start of epoch 1.
  np.testing.assert_array_equal(global_batch_indices(10, batch, n, seed=1),
                                np.concatenate([epoch0[100:], epoch1[:7]]))


def test_order_depends_on_seed_only():
  a = global_batch_indices(4, 16, 1000, seed=0)
  assert a.dtype == np.int64 and a.shape == (16,)
  np.testing.assert_array_equal(a, global_batch_indices(4, 16, 1000, seed=0))
  assert (a != global_batch_indices(4, 16, 1000, seed=1)).any()


def test_resume_replays_the_uninterrupted_batches():
  source = DigitsSource()
  with pipeline_for(source, image_size=8, global_batch_size=64, seed=7) as pipeline:
    uninterrupted = list(pipeline.iterate(0, num_steps=33))  # 33 * 64 > 1797: two epochs.
  assert [step for step, _ in uninterrupted] == list(range(33))
  with pipeline_for(source, image_size=8, global_batch_size=64, seed=7,
                     num_threads=0, prefetch=0) as resumed:
    for step, batch in resumed.iterate(27, num_steps=6):
      for key in ("images", "labels"):
        np.testing.assert_array_equal(batch[key], uninterrupted[step][1][key])
    np.testing.assert_array_equal(resumed.local_batch(30)["images"],
                                  uninterrupted[30][1]["images"])
  labels = np.concatenate([b["labels"] for _, b in uninterrupted])
  np.testing.assert_array_equal(np.sort(labels[:1797]), np.sort(load_digits().target))


def test_process_slices_concatenate_to_the_global_batch():
  source = ArraySource(37)
  global_indices = global_batch_indices(5, 8, 37, seed=3)
  np.testing.assert_array_equal(
      np.concatenate([process_slice(global_indices, i, 2) for i in range(2)]), global_indices)
  with pipeline_for(source, process_count=1) as whole, \
      pipeline_for(source, process_index=0, process_count=2) as p0, \
      pipeline_for(source, process_index=1, process_count=2) as p1:
    parts = [p0.local_batch(5), p1.local_batch(5)]
    full = whole.local_batch(5)
    assert parts[0]["images"].shape == (4, 6, 6, 1)
    for key in ("images", "labels"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_a_run_reads_the_pixels_its_config_names():
  config = digits_config.get_config()
  config.batch_size, config.seed, config.data.num_threads = 16, 2, 0
  with make_inputs(config, build_model(config.model)) as pipeline:
    batch = pipeline.local_batch(1)
  assert isinstance(pipeline.source, DigitsSource) and not pipeline.order.random_flip
  assert batch["images"].shape == (16, 8, 8, 1)
  assert pipeline.element_spec["images"].shape == (16, 8, 8, 1)
  rows = global_batch_indices(1, 16, 1797, seed=2)
  np.testing.assert_array_equal(batch["labels"], load_digits().target[rows])


def test_indivisible_batch_raises():
  with pytest.raises(ValueError, match="config.batch_size"):
    process_slice(np.arange(10), 0, 4)
  with pytest.raises(ValueError, match="config.batch_size"):
    pipeline_for(ArraySource(10), global_batch_size=10, process_count=4)


def test_close_stops_the_threads_and_abandoned_iterators_are_harmless():
  def data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("dit_jax_data")]

  before = len(data_threads())
  pipeline = pipeline_for(ArraySource(30), num_threads=3, prefetch=2)
  steps = []
  for step, batch in pipeline.iterate(4):  # endless; prefetched steps 5.. are abandoned.
    steps.append(step)
    assert batch["images"].shape == (8, 6, 6, 1)
    if step == 5:
      break
  assert steps == [4, 5] and len(data_threads()) > before
  pipeline.close()
  pipeline.close()  # idempotent.
  assert len(data_threads()) == before
  with pytest.raises(RuntimeError, match="closed"):
    pipeline.local_batch(0)


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / "images"
  (root / "b_zebra" / "nested").mkdir(parents=True)
  (root / "a_ant").mkdir()
  Image.new("RGB", (30, 20), (255, 0, 0)).save(root / "a_ant" / "a0.png")
  Image.fromarray(pattern(40, 24)).save(root / "a_ant" / "a1.jpg", quality=95)
  (root / "a_ant" / "bad.jpg").write_bytes(b"\x00garbage, not a JPEG" * 10)
  (root / "a_ant" / "notes.txt").write_text("not an image")
  Image.new("L", (16, 50), 0).save(root / "b_zebra" / "b0.png")  # grayscale -> RGB.
  Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "b_zebra" / "nested" / "b1.bmp")
  return root


def test_folder_source_labels_and_skips_corrupt_files(image_folder, caplog):
  source = FolderSource(image_folder)
  assert source.class_names == ["a_ant", "b_zebra"] and source.num_classes == 2
  names = [os.path.relpath(f, image_folder) for f in source.files]
  assert names == ["a_ant/a0.png", "a_ant/a1.jpg", "a_ant/bad.jpg", "b_zebra/b0.png",
                   "b_zebra/nested/b1.bmp"]
  image, label = source.get(0)
  assert label == 0 and image.shape == (20, 30, 3) and (image == [255, 0, 0]).all()
  assert source.num_skipped == 0
  with caplog.at_level(logging.WARNING):
    image, label = source.get(2)  # bad.jpg: the next readable file (b0.png) stands in.
    again, _ = source.get(2)
  assert label == 1 and image.shape == (50, 16, 3) and (image == 0).all()
  np.testing.assert_array_equal(again, image)
  assert source.num_skipped == 1 and source.skipped_files == [str(image_folder / "a_ant" /
                                                                  "bad.jpg")]
  warnings = [r for r in caplog.records if "bad.jpg" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per file.


def test_folder_pipeline_shapes_and_values(image_folder):
  source = make_source("folder", folder=str(image_folder))
  with pipeline_for(source, image_size=16, global_batch_size=10) as pipeline:
    batch = pipeline.local_batch(0)
    assert batch["images"].shape == (10, 16, 16, 3) and batch["images"].dtype == np.float32
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert pipeline.num_skipped == 1  # 10 draws from 5 files: bad.jpg was hit.
    # Solid colours survive crop and flip exactly: red (label 0, a0) and blue (b1).
    red = [img for img, idx in zip(batch["images"], pipeline.global_indices(0)) if idx == 0]
    assert red and np.array_equal(red[0], np.broadcast_to([1.0, -1.0, -1.0], (16, 16, 3)))
    np.testing.assert_array_equal(batch["labels"], source.labels[
        [i if i != 2 else 3 for i in pipeline.global_indices(0)]])


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing_dir"):
    FolderSource(tmp_path / "missing_dir")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty"):
    FolderSource(tmp_path / "empty")
  (tmp_path / "no_images" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no_images"):
    FolderSource(tmp_path / "no_images")
  # Refused when made, not in a training thread: a folder where no image decodes...
  (tmp_path / "all_bad" / "cls").mkdir(parents=True)
  (tmp_path / "all_bad" / "cls" / "x.png").write_bytes(b"junk")
  with pytest.raises(ValueError, match=r"all_bad.*none of its 1 image files could be decoded"):
    FolderSource(tmp_path / "all_bad")
  # ... and a class folder without images (it would be a class with no example).
  (tmp_path / "one_empty" / "cat").mkdir(parents=True)
  (tmp_path / "one_empty" / "dog" / "puppies").mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "one_empty" / "cat" / "a.png")
  with pytest.raises(ValueError) as info:
    FolderSource(tmp_path / "one_empty")
  assert f"class folder '{tmp_path / 'one_empty' / 'dog'}' holds no images" in str(info.value)
  with pytest.raises(ValueError, match="config.data.folder"):
    make_source("folder")


def test_tfds_missing_dataset_explains_how_to_prepare(tmp_path, caplog):
  import logging
  from dit_jax import logs
  logs.setup()
  # TensorFlow and tfds are imported before the clock starts: a first import of TensorFlow took
  # 20 s on a busy 2-core machine, and the bound below is about download attempts.
  logs.import_tensorflow()
  import tensorflow_datasets  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  start = time.monotonic()
  (tmp_path / "imagenet2012" / "5.1.0").mkdir(parents=True)  # a version folder, no metadata
  with pytest.raises(DatasetNotFoundError) as info, caplog.at_level(logging.WARNING, "absl"):
    make_source("imagenet2012", data_dir=str(tmp_path))
  # tfds's warning about the folder is dropped: the error says what is missing.
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert str(tmp_path / "imagenet2012") in message
  assert str(tmp_path / "downloads" / "manual") in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"python -m dit_jax.data.prepare imagenet2012 --data_dir {tmp_path}" in message
  with pytest.raises(DatasetNotFoundError, match="python -m dit_jax.data.prepare mnist"):
    TfdsSource("mnist", data_dir=str(tmp_path))
  assert time.monotonic() - start < 15  # no download attempt (offline retries take minutes).
  assert not (tmp_path / "downloads").exists()
  with pytest.raises(ValueError, match="config.data.name"):
    make_source("no_such_dataset_xyz", data_dir=str(tmp_path))


TINY_SIZES = [(6, 4), (7, 5), (8, 6), (9, 7), (10, 8)]


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """A 5-example grayscale tfds dataset in array_record files (about 4 s, mostly TF import)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class DitJaxTestTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 1)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (h, w) in enumerate(TINY_SIZES):  # the pixel value 40 * i identifies the example.
        yield i, {"image": np.full((h, w, 1), 40 * i, np.uint8), "label": i % 3}

  data_dir = tmp_path_factory.mktemp("tfds")
  DitJaxTestTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_array_record(tiny_tfds_dir):
  source = make_source("dit_jax_test_tiny", data_dir=str(tiny_tfds_dir))
  assert isinstance(source, TfdsSource)
  assert len(source) == 5 and source.num_classes == 3 and source.image_shape is None
  seen = {}
  for index in range(5):
    image, label = source.get(index)
    i = int(image[0, 0, 0]) // 40
    assert image.dtype == np.uint8 and image.shape == (*TINY_SIZES[i], 1)  # stays 1-channel.
    assert (image == 40 * i).all() and label == i % 3
    seen[i] = index
  assert sorted(seen) == list(range(5))
  rgb = TfdsSource("dit_jax_test_tiny", data_dir=str(tiny_tfds_dir), channels=3)
  image, _ = rgb.get(seen[2])
  assert image.shape == (8, 6, 3) and (image == 80).all()
  with pipeline_for(source, image_size=4, global_batch_size=5, random_flip=False) as pipeline:
    batch = pipeline.local_batch(0)  # one epoch: each constant image once.
  assert batch["images"].shape == (5, 4, 4, 1)
  np.testing.assert_allclose(sorted(batch["images"][:, 0, 0, 0]),
                             to_float(np.arange(5) * 40), atol=1e-6)


def test_to_global_on_one_device():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with pipeline_for(ArraySource(20)) as pipeline:
    local = pipeline.local_batch(2)
  batch = to_global(local, sharding)
  assert batch["images"].shape == (8, 6, 6, 1) and batch["labels"].dtype == np.int32
  assert batch["images"].sharding == sharding
  for key in local:
    np.testing.assert_array_equal(np.asarray(batch[key]), local[key])


def test_to_global_on_8_devices_without_tensorflow():
  """Eight fake CPU devices need a fresh process; TF and tfds are made unimportable there."""
  script = textwrap.dedent("""
      import sys
      sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from dit_jax.data import DigitsSource, InputPipeline, to_global
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
      sharding = NamedSharding(mesh, P("data"))
      with InputPipeline(DigitsSource(), image_size=8, global_batch_size=16, seed=0,
                         random_flip=False, num_threads=0, prefetch=0) as pipeline:
        local = pipeline.local_batch(3)
      batch = to_global(local, sharding)
      assert batch["images"].shape == (16, 8, 8, 1), batch["images"].shape
      for shard in batch["labels"].addressable_shards:  # 4 rows per data shard, 2 replicas.
        rows = shard.index[0]
        assert shard.data.shape == (4,) and (np.asarray(shard.data) == local["labels"][rows]).all()
      print("devices", jax.device_count())
  """)
  env = dict(os.environ, XLA_FLAGS=train_utils.xla_flags_with_devices(8),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "devices 8" in result.stdout
