"""ImageNet the paper's way, end to end, on a fake ImageNet in the real layout: the two ILSVRC2012
tars -> `python -m dit_jax.data.prepare` (tfds array_record) -> `python -m dit_jax.latents.extract`
-> `train.py --config configs/imagenet.py:...` -> `sample.py --vae`; and the preparation
command's user errors (one line, before anything is written or TensorFlow is imported)."""
import collections
import io
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import fixture_path
from dit_jax import cli
from dit_jax.data import prepare
from train_utils import ROOT, checkpoint_steps, env_with_devices, read_metrics

TFDS_IMAGENET = pathlib.Path(pytest.importorskip("tensorflow_datasets").__file__).parent / (
    "datasets/imagenet2012")
TRAIN_TAR, VAL_TAR = (name for name, _, _ in prepare.IMAGENET_TARS)
# Three real synsets (not the first three of labels.txt, so a label is not its position here),
# with images of different sizes and aspect ratios for the ADM crop.
SYNSETS = ("n01443537", "n01530575", "n02085620")
TRAIN_SIZES = ((20, 24), (24, 18), (17, 17))
NUM_VAL = 4
VAL_ORDER = (3, 1, 4, 2)  # tar order; tfds labels the *sorted* names by validation_labels.txt
IMAGE_SIZE = 16  # the tiny VAE downsamples 2x: 8x8x4 latents


def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A smooth ramp plus noise (its mirror encodes differently), as JPEG bytes."""
  ramp = np.linspace(0, 200, width)[None, :, None] * np.ones((height, 1, 3))
  pixels = np.clip(ramp + rng.integers(0, 55, (height, width, 3)), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(manual_dir: pathlib.Path) -> dict[str, dict[str, tuple[int, bytes]]]:
  """Writes both tars as image-net.org ships them; returns {split: {file_name: (label, jpeg)}}.

  `ILSVRC2012_img_train.tar` holds one tar per class (`n01443537.tar`), each with the class's
  JPEGs (`n01443537_0.JPEG`); `ILSVRC2012_img_val.tar` holds the JPEGs directly. Labels are
  positions in the label file tfds ships; validation labels come from its validation file.
  """
  names = (TFDS_IMAGENET / "labels.txt").read_text().split()
  val_synsets = (TFDS_IMAGENET / "validation_labels.txt").read_text().split()
  rng = np.random.default_rng(0)
  expected = {"train": {}, "validation": {}}
  manual_dir.mkdir(parents=True)
  with tarfile.open(manual_dir / TRAIN_TAR, "w") as train:
    for synset in SYNSETS:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i, (height, width) in enumerate(TRAIN_SIZES):
          data = jpeg(rng, height, width)
          add(inner, f"{synset}_{i}.JPEG", data)
          expected["train"][f"{synset}_{i}.JPEG"] = (names.index(synset), data)
      add(train, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(manual_dir / VAL_TAR, "w") as val:
    for number in VAL_ORDER:
      name, data = f"ILSVRC2012_val_{number:08d}.JPEG", jpeg(rng, 18, 22)
      add(val, name, data)
      expected["validation"][name] = (names.index(val_synsets[number - 1]), data)
  return expected


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  # The session's compilation cache: the tiny VAE's encoder at this batch shape is test_train's.
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env_with_devices(1))


def assert_ok(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


# --- the preparation command's errors (fast: no TensorFlow) -------------------------------------

def test_missing_tars_are_one_line_naming_the_folder_and_both_files(tmp_path):
  result = run("-m", "dit_jax.data.prepare", "imagenet2012", "--data_dir", str(tmp_path))
  assert result.returncode == 1 and "Traceback" not in result.stderr
  manual = tmp_path / "downloads" / "manual"
  assert result.stderr.splitlines() == [
      f"error: imagenet2012 needs {TRAIN_TAR} and {VAL_TAR} in {manual} (no such folder): "
      f"download them from {prepare.IMAGENET_URL} (registration needed) and put them there, "
      f"or pass --manual_dir DIR"]
  assert not any(tmp_path.iterdir())  # nothing written


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
  data_dir = tmp_path / "a_file"
  data_dir.write_text("not a folder")
  result = run("-m", "dit_jax.data.prepare", "imagenet2012", "--data_dir", str(data_dir))
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.splitlines() == [f"error: --data_dir: {data_dir} is a file, not a directory"]
  assert data_dir.read_text() == "not a folder"


@pytest.mark.parametrize("present, missing", [((), "both are missing"),
                                              ((TRAIN_TAR,), f"{VAL_TAR} is missing"),
                                              ((VAL_TAR,), f"{TRAIN_TAR} is missing")])
def test_each_missing_tar_is_named(tmp_path, present, missing):
  for name in present:
    with tarfile.open(tmp_path / name, "w"):
      pass
  with pytest.raises(cli.UserError, match=f"in {tmp_path} \\({missing}\\)"):
    prepare.check_imagenet_tars(str(tmp_path))


def test_a_tar_that_is_not_what_its_name_says_is_refused(tmp_path):
  with tarfile.open(tmp_path / TRAIN_TAR, "w") as tar:  # the validation images, misnamed
    add(tar, "ILSVRC2012_val_00000001.JPEG", b"x")
  with tarfile.open(tmp_path / VAL_TAR, "w") as tar:
    add(tar, "ILSVRC2012_val_00000001.JPEG", b"x")
  with pytest.raises(cli.UserError, match=(
      f"{TRAIN_TAR} is not ImageNet's {TRAIN_TAR}: its first member is "
      "'ILSVRC2012_val_00000001.JPEG', expected names like n01440764.tar")):
    prepare.check_imagenet_tars(str(tmp_path))
  (tmp_path / TRAIN_TAR).write_bytes(b"half a download")
  with pytest.raises(cli.UserError, match="is not a readable tar file"):
    prepare.check_imagenet_tars(str(tmp_path))


def test_too_little_disk_space_is_refused_before_the_build(tmp_path, monkeypatch):
  for name, size in ((TRAIN_TAR, 3 * 10**9), (VAL_TAR, 10**9)):
    with open(tmp_path / name, "wb") as f:
      f.truncate(size)  # sparse: only the size counts
  data_dir = tmp_path / "not" / "yet"  # measured on its nearest existing parent
  for free in (2.5e9, 4.5e9):
    monkeypatch.setattr(prepare.shutil, "disk_usage",
                        lambda path, free=free: collections.namedtuple("Usage", "free")(free))
    if free < 4e9:
      with pytest.raises(cli.UserError, match=(
          f"imagenet2012 needs about 4.0 GB free in {data_dir} .* which has 2.5 GB")):
        prepare.check_free_space(str(data_dir), str(tmp_path))
    else:
      prepare.check_free_space(str(data_dir), str(tmp_path))


def test_unknown_dataset_names_the_closest(tmp_path):
  result = run("-m", "dit_jax.data.prepare", "imagenet2013", "--data_dir", str(tmp_path))
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      "error: no tfds dataset named 'imagenet2013'; did you mean 'imagenet2012'?"]
  assert not any(tmp_path.iterdir())


def test_offline_download_is_refused_at_once_writing_nothing(tmp_path, monkeypatch):
  """Offline, tfds retried for about 200 s, then failed with a traceback and left temporary
  files behind."""
  def no_dns(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  for variable in prepare._PROXY_VARIABLES:
    monkeypatch.delenv(variable, raising=False)
  data_dir = tmp_path / "data"
  start = time.monotonic()
  with pytest.raises(cli.UserError, match=r"tfds must download mnist, but this machine cannot "
                                          r"reach its servers \(.*storage.googleapis.com: "
                                          r"Name or service not known\): it looks offline"):
    prepare.prepare("mnist", str(data_dir))
  assert time.monotonic() - start < 60
  assert not data_dir.exists() or not any(data_dir.rglob("*"))
  # Names that resolve, connections that do not (a firewall): refused too, each host named.
  def unreachable(address, timeout=None, *args, **kwargs):
    raise TimeoutError("timed out")
  monkeypatch.setattr(socket, "create_connection", unreachable)
  with pytest.raises(cli.UserError, match=r"\(yann.lecun.com: timed out; storage.googleapis.com: "
                                          r"timed out\)"):
    prepare.check_online("mnist", "http://yann.lecun.com/exdb/mnist/", str(data_dir))
  # Behind a proxy the names are the proxy's to resolve: no refusal.
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
  prepare.check_online("mnist", "http://yann.lecun.com/exdb/mnist/", str(data_dir))
  # Online: no refusal.
  monkeypatch.delenv("HTTPS_PROXY")
  monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: io.BytesIO())
  prepare.check_online("mnist", "http://yann.lecun.com/exdb/mnist/", str(data_dir))


def test_stale_incomplete_folders_of_this_version_only_are_removed(tmp_path):
  for name in ("incomplete.AB12CD_5.1.0", "incomplete.ZZ99ZZ_5.0.0", "5.1.0"):
    (tmp_path / name).mkdir()
  assert prepare.remove_incomplete(str(tmp_path), "5.1.0") == [
      str(tmp_path / "incomplete.AB12CD_5.1.0")]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5.1.0", "incomplete.ZZ99ZZ_5.0.0"]


def test_a_second_preparation_of_the_same_dataset_is_refused(tmp_path):
  with prepare.exclusive_lock(str(tmp_path)):
    with pytest.raises(cli.UserError, match="another preparation is running"):
      with prepare.exclusive_lock(str(tmp_path)):
        pass
  with prepare.exclusive_lock(str(tmp_path)):  # released
    pass


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_imagenet_tars_to_latents_to_training_to_samples(tmp_path):
  data_dir = tmp_path / "tfds"
  expected = write_fake_imagenet(data_dir / "downloads" / "manual")
  stale = data_dir / "imagenet2012" / "incomplete.AB12CD_5.1.0"  # an interrupted earlier run
  stale.mkdir(parents=True)

  # 1. The tars -> tfds array_record, with tfds's own imagenet2012 builder.
  result = run("-m", "dit_jax.data.prepare", "imagenet2012", "--data_dir", str(data_dir))
  log, version_dir = assert_ok(result), data_dir / "imagenet2012" / "5.1.0"
  assert not result.stdout  # tfds's "Downloading and preparing dataset Unknown size" is ours
  assert f"removed {stale}, left by an interrupted run" in log and not stale.exists()
  assert "no ILSVRC2012_img_test.tar there: no test split" in log
  assert "WARNING" not in log  # tfds's absent-test-split warning is replaced by that line
  assert f"ready in {version_dir} (array_record" in log and "train 9, validation 4" in log
  files = sorted(p.name for p in version_dir.iterdir())
  assert "imagenet2012-train.array_record-00000-of-00001" in files, files
  assert not [p for p in (data_dir / "imagenet2012").iterdir() if "incomplete" in p.name]
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  for split, want in expected.items():
    records = builder.as_data_source(split=split)
    assert len(records) == len(want)
    for record in records:  # every image, its label, its pixels (the JPEG stored as it was)
      label, data = want[record["file_name"].decode()]
      assert record["label"] == label
      np.testing.assert_array_equal(record["image"], np.asarray(Image.open(io.BytesIO(data))))
  # A rerun finds it prepared and leaves it alone.
  before = {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  rerun = assert_ok(run("-m", "dit_jax.data.prepare", "imagenet2012", "--data_dir",
                        str(data_dir)))
  assert "already prepared" in rerun and "train 9, validation 4; nothing to do" in rerun
  assert before == {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}

  # 2. Latents of every training image and its mirror, with the tiny VAE fixture.
  vae = str(fixture_path("vae_reference", "tiny_vae"))
  config = f"--config=configs/imagenet.py:S/2,{IMAGE_SIZE}"
  latents = tmp_path / "latents"
  assert_ok(run("-m", "dit_jax.latents.extract", config, f"--config.data.data_dir={data_dir}",
                "--config.data.num_threads=1", f"--vae={vae}", f"--out={latents}",
                "--batch_size=4"))
  from dit_jax.data import TfdsSource  # pylint: disable=import-outside-toplevel
  from dit_jax.latents import LatentSource  # pylint: disable=import-outside-toplevel
  source = TfdsSource("imagenet2012", data_dir=str(data_dir))
  assert len(source) == 9 and source.num_classes == 1000
  with LatentSource(str(latents)) as stored:
    meta = stored.metadata
    assert (meta["num_examples"], meta["latent_shape"], meta["image_size"]) == (9, [8, 8, 4], 16)
    assert meta["data"]["name"] == "imagenet2012" and meta["num_classes"] == 1000
    pairs = [stored.read(i) for i in range(9)]
  assert [label for _, label in pairs] == [source.get(i)[1] for i in range(9)]
  assert sorted(label for _, label in pairs) == sorted(l for l, _ in expected["train"].values())
  for moments, _ in pairs:  # [original, mirror] moments: the flip is its own encoding
    assert moments.shape == (2, 8, 8, 8) and np.all(np.isfinite(moments))
    assert np.abs(moments[1] - moments[0]).max() > 1e-2

  # 3. A few training steps of a tiny DiT from the latents (the ImageNet config, 1000 classes).
  workdir = tmp_path / "run"
  overrides = {"latents_dir": latents, "vae.path": vae, "model.input_size": 8,
               "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
               "model.dtype": "float32", "batch_size": 4, "num_steps": 3, "log_every_steps": 1,
               "checkpoint.every_steps": 3, "checkpoint.async_save": False,
               "sample.every_steps": 0, "data.num_threads": 1}
  assert_ok(run("train.py", config, f"--workdir={workdir}",
                *(f"--config.{k}={v}" for k, v in overrides.items())))
  losses = [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  assert checkpoint_steps(workdir) == [3]

  # 4. Samples decoded to pictures by the VAE.
  grid, singles = tmp_path / "grid.png", tmp_path / "singles"
  assert_ok(run("sample.py", f"--checkpoint={workdir}", f"--vae={vae}", f"--out={grid}",
                f"--singles_dir={singles}", "--classes=1,151", "--per_class=2",
                "--sampler=ddim", "--num_steps=2"))
  assert Image.open(grid).mode == "RGB"
  pictures = [np.asarray(Image.open(p)) for p in sorted(singles.iterdir())]
  assert len(pictures) == 4 and all(p.shape == (16, 16, 3) for p in pictures)
  assert all(p.std() > 0 for p in pictures)  # decoded pictures, not a constant fill
