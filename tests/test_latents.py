"""Pre-extracted latent datasets: extraction (CLI and library), resumption, reading, batches."""
import filecmp
import functools
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from conftest import ROOT, assert_rel_close, fixture_path
from train_utils import xla_flags_with_devices
from configs import folder as folder_config
from dit_jax.data import FolderSource, InputPipeline, center_crop_arr, flip_mask, to_float
from dit_jax.latents import (LatentPipeline, LatentSource, chunk_path, decode_record,
                             encode_record, extract_from_config, extract_latents,
                             latents_from_moments, record_bytes)
from dit_jax.models import build_model
from dit_jax.train.inputs import make_inputs
from dit_jax.vae import AutoencoderKL, VAEConfig, load_diffusers_vae

IMAGE_SIZE = 16  # tiny VAE: 2x downsampling -> latents 8x8x4, moments 8x8x8.
# (class, height, width): different sizes and aspect ratios exercise the ADM crop.
IMAGES = [("cat", 16, 16), ("cat", 20, 30), ("cat", 40, 24), ("cat", 33, 17), ("cat", 64, 48),
          ("cat", 18, 18), ("dog", 25, 40), ("dog", 16, 50), ("dog", 70, 20), ("dog", 32, 32)]
# The CLI run: 4 images per call over 2 devices, chunks of 3 rounded up to 4 -> 3 chunk files
# (4, 4, 2 examples; the last batch is padded).
CLI_FLAGS = ("--batch_size=4", "--chunk_size=3", "--config.data.num_threads=2")


def vae_dir() -> str:
  return str(fixture_path("vae_reference", "tiny_vae"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i, (name, height, width) in enumerate(IMAGES):
    os.makedirs(root / name, exist_ok=True)
    # A smooth gradient plus noise: mirrored images encode differently.
    ramp = np.linspace(0, 200, width)[None, :, None] * np.ones((height, 1, 3))
    pixels = np.clip(ramp + rng.integers(0, 55, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
  return str(root)


def make_config(folder: str):
  config = folder_config.get_config(f"{folder},{IMAGE_SIZE},2")
  config.data.num_threads = 2
  return config


@pytest.fixture(scope="module")
def vae():
  """(model, params, jitted encode): one compiled encoder per batch shape for the module."""
  config, params = load_diffusers_vae(vae_dir())
  model = AutoencoderKL(config)
  encode = jax.jit(functools.partial(model.apply, method=AutoencoderKL.encode))
  return model, params, encode


def encode_moments(vae, images_u8_or_float: np.ndarray) -> np.ndarray:
  """Direct encode: `[n, 16, 16, 3]` -> `concat([mean, logvar], -1)` `[n, 8, 8, 8]`."""
  _, params, encode = vae
  x = np.asarray(images_u8_or_float)
  x = to_float(x) if x.dtype == np.uint8 else x
  mean, logvar = encode({"params": params}, x)
  return np.concatenate([np.asarray(mean), np.asarray(logvar)], axis=-1)


@pytest.fixture(scope="module")
def reference(image_folder, vae):
  """Moments of every image and of its mirror, encoded directly: `[10, 2, 8, 8, 8]`; labels."""
  source = FolderSource(image_folder)
  crops = np.stack([center_crop_arr(source.get(i)[0], IMAGE_SIZE) for i in range(len(source))])
  pair = np.stack([encode_moments(vae, crops), encode_moments(vae, crops[:, :, ::-1])], axis=1)
  return pair, source.labels.astype(np.int32)


def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(2),
             JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dit_jax.latents.extract", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def extracted(image_folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("latents") / "tiny")
  result = run_cli(f"--config=configs/folder.py:{image_folder},{IMAGE_SIZE},2", "--vae",
                   vae_dir(), "--out", out, *CLI_FLAGS)
  assert result.returncode == 0, result.stderr
  assert "wrote 3 chunks, skipped 0; complete" in result.stderr
  return out


def read_chunk(path: str) -> list[bytes]:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return list(reader.read_all())
  finally:
    reader.close()


def test_cli_extracts_every_image_and_its_mirror(extracted, reference, image_folder):
  want_moments, want_labels = reference
  metadata = LatentSource(extracted).metadata
  assert metadata["num_examples"] == 10 and metadata["num_classes"] == 2
  assert metadata["latent_shape"] == [8, 8, 4] and metadata["dtype"] == "float32"
  assert metadata["image_size"] == IMAGE_SIZE and metadata["chunk_size"] == 4
  assert metadata["record_bytes"] == 2 * 8 * 8 * 8 * 4 + 4 == record_bytes((8, 8, 4), "float32")
  assert metadata["scaling_factor"] == pytest.approx(0.18215)
  assert metadata["vae_config"] == VAEConfig.from_json(vae_dir()).to_dict()
  assert metadata["data"]["name"] == "folder" and metadata["data"]["folder"] == image_folder
  assert sorted(os.listdir(extracted)) == [
      "latents-000000.array_record", "latents-000001.array_record",
      "latents-000002.array_record", "metadata.json", "plan.json"]
  stored = []
  for chunk, size in enumerate((4, 4, 2)):
    chunk_records = read_chunk(chunk_path(extracted, chunk))
    assert len(chunk_records) == size
    stored.extend(decode_record(r, (8, 8, 4), "float32") for r in chunk_records)
  moments = np.stack([m for m, _ in stored])
  assert moments.shape == (10, 2, 8, 8, 8) and moments.dtype == np.float32
  assert_rel_close(moments[:, 0], want_moments[:, 0], rtol=1e-5, name="original")
  assert_rel_close(moments[:, 1], want_moments[:, 1], rtol=1e-5, name="flipped")
  # The mirror really is another encoding, not a copy (nor the latent mirrored).
  assert np.abs(moments[:, 1] - moments[:, 0]).max() > 1e-2
  np.testing.assert_array_equal([label for _, label in stored], want_labels)
  assert list(want_labels) == [0] * 6 + [1] * 4


def test_complete_directory_is_never_overwritten(extracted, image_folder):
  before = {name: os.path.getmtime(os.path.join(extracted, name))
            for name in os.listdir(extracted)}
  result = run_cli(f"--config=configs/folder.py:{image_folder},{IMAGE_SIZE},2", "--vae",
                   vae_dir(), "--out", extracted, *CLI_FLAGS)
  assert result.returncode != 0
  assert "already holds a complete latent dataset" in result.stderr
  assert before == {name: os.path.getmtime(os.path.join(extracted, name))
                    for name in os.listdir(extracted)}


def test_rerun_after_interruption_rebuilds_identical_files(extracted, image_folder, tmp_path):
  out = str(tmp_path / "resumed")
  shutil.copytree(extracted, out)
  os.remove(chunk_path(out, 1))
  os.remove(os.path.join(out, "metadata.json"))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    LatentSource(out)
  # A half-written temporary file of the interrupted run is replaced, never read.
  with open(chunk_path(out, 1) + ".tmp", "wb") as f:
    f.write(b"garbage")
  # One device here (two in the CLI run): the files must not depend on it.
  result = extract_from_config(make_config(image_folder), vae_dir(), out, batch_size=4,
                               chunk_size=3, progress=False)
  assert (result.written, result.skipped, result.complete) == ((1,), (0, 2), True)
  match, mismatch, errors = filecmp.cmpfiles(extracted, out, sorted(os.listdir(extracted)),
                                             shallow=False)
  assert not mismatch and not errors and len(match) == 5
  assert sorted(os.listdir(out)) == sorted(os.listdir(extracted))


def test_resume_refuses_other_settings(extracted, image_folder, tmp_path):
  out = str(tmp_path / "other")
  shutil.copytree(extracted, out)
  os.remove(os.path.join(out, "metadata.json"))
  config = make_config(image_folder)
  with pytest.raises(ValueError, match="dtype: 'float32' then, 'float16' now"):
    extract_from_config(config, vae_dir(), out, batch_size=4, dtype="float16", progress=False)
  config.data.image_size = 32
  with pytest.raises(ValueError, match="image_size"):
    extract_from_config(config, vae_dir(), out, batch_size=4, progress=False)


def test_processes_split_chunks_and_only_the_last_writes_metadata(extracted, image_folder,
                                                                  tmp_path):
  out = str(tmp_path / "two_processes")
  config = make_config(image_folder)
  model_config, params = load_diffusers_vae(vae_dir())
  kwargs = dict(vae_config=model_config, vae_params=params, image_size=IMAGE_SIZE, batch_size=4,
                chunk_size=3, data_config=config.data.to_dict(), num_threads=2,
                process_count=2, progress=False)
  source = FolderSource(image_folder)
  one = extract_latents(source, out, process_index=1, **kwargs)
  assert (one.written, one.complete) == ((1,), False)
  assert not os.path.exists(os.path.join(out, "metadata.json"))
  zero = extract_latents(source, out, process_index=0, **kwargs)
  assert (zero.written, zero.complete) == ((0, 2), True)
  match, mismatch, errors = filecmp.cmpfiles(extracted, out, sorted(os.listdir(extracted)),
                                             shallow=False)
  assert not mismatch and not errors and len(match) == 5


def test_two_real_processes_without_tensorflow(extracted, image_folder, tmp_path):
  """The CLI under jax.distributed (2 processes x 2 CPU devices, TF unimportable): each process
  encodes its chunks on its own devices, and the files equal the single-process run's."""
  out = str(tmp_path / "distributed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = [f"--config=configs/folder.py:{image_folder},{IMAGE_SIZE},2", "--vae", vae_dir(),
          "--out", out, *CLI_FLAGS, f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"]
  script = ("import runpy, sys; "
            "sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None; "
            "sys.argv = ['extract'] + sys.argv[1:]; "
            "runpy.run_module('dit_jax.latents.extract', run_name='__main__')")
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, "-c", script, *args, f"--process_id={i}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "local devices [CpuDevice(id=0), CpuDevice(id=1)]" in outputs[0][1]
  assert "wrote 2 chunks, skipped 0; complete" in outputs[0][1]  # chunks 0 and 2
  match, mismatch, errors = filecmp.cmpfiles(extracted, out, sorted(os.listdir(extracted)),
                                             shallow=False)
  assert not mismatch and not errors and len(match) == 5


def test_latent_pipeline_follows_the_image_pipeline(extracted, image_folder, vae):
  kwargs = dict(global_batch_size=4, seed=3, random_flip=True, process_index=0,
                process_count=1)
  images = InputPipeline(FolderSource(image_folder), image_size=IMAGE_SIZE, num_threads=0,
                         prefetch=0, **kwargs)
  flips_seen = []
  with images, LatentPipeline(LatentSource(extracted), num_threads=2, prefetch=0,
                              **kwargs) as latents:
    assert latents.element_spec["moments"].shape == (4, 8, 8, 8)
    for step in range(6):  # 24 examples: crosses two epoch boundaries of the 10.
      np.testing.assert_array_equal(latents.global_indices(step), images.global_indices(step))
      image_batch, latent_batch = images.local_batch(step), latents.local_batch(step)
      np.testing.assert_array_equal(latent_batch["labels"], image_batch["labels"])
      assert latent_batch["moments"].dtype == np.float32
      # The image pipeline's (possibly mirrored) images encode to the latent batch.
      assert_rel_close(latent_batch["moments"], encode_moments(vae, image_batch["images"]),
                       rtol=1e-5, name=f"step {step}")
      flips_seen.extend(flip_mask(3, step * 4 + np.arange(4)))
  assert 0 < sum(flips_seen) < len(flips_seen)  # both branches were exercised.


def test_latent_pipeline_iterate_and_process_slices(extracted):
  def pipeline(**kwargs):
    defaults = dict(global_batch_size=4, seed=5, random_flip=True, process_index=0,
                    process_count=1, num_threads=0, prefetch=0)
    return LatentPipeline(LatentSource(extracted), **{**defaults, **kwargs})

  with pipeline() as whole, pipeline(prefetch=2, num_threads=2) as prefetched:
    expected = [whole.local_batch(step) for step in range(2, 6)]
    got = list(prefetched.iterate(start_step=2, num_steps=4))
    assert [step for step, _ in got] == [2, 3, 4, 5]
    for want, (_, batch) in zip(expected, got):
      np.testing.assert_array_equal(batch["moments"], want["moments"])
      np.testing.assert_array_equal(batch["labels"], want["labels"])
    halves = [pipeline(process_index=i, process_count=2).local_batch(4) for i in (0, 1)]
    np.testing.assert_array_equal(
        np.concatenate([h["moments"] for h in halves]), expected[2]["moments"])
    with pipeline(random_flip=False) as unflipped:
      indices, flips = unflipped.order.local_rows(4)
      assert not flips.any()
      source = LatentSource(extracted)
      np.testing.assert_array_equal(unflipped.local_batch(4)["moments"],
                                    np.stack([source.get(i)[0] for i in indices]))


def test_float16_stores_half_and_reads_back_close(image_folder, reference, tmp_path):
  out = str(tmp_path / "half")
  result = extract_from_config(make_config(image_folder), vae_dir(), out, batch_size=8,
                               dtype="float16", progress=False)
  assert result.complete and result.written == (0,)  # one chunk of 10 (1024 rounded to 8s)
  with LatentSource(out) as source:
    assert source.metadata["dtype"] == "float16" and source.metadata["chunk_size"] == 1024
    assert source.metadata["record_bytes"] == 2 * 8 * 8 * 8 * 2 + 4
    assert [len(r) for r in read_chunk(chunk_path(out, 0))] == [2052] * 10  # half width
    pair, label = source.read(7)
    assert pair.dtype == np.float16 and pair.shape == (2, 8, 8, 8) and label == 1
    for flip in (False, True):
      got = np.stack([source.get(i, flip=flip)[0] for i in range(10)])
      assert got.dtype == np.float32
      assert_rel_close(got, reference[0][:, int(flip)], rtol=1e-3, name=f"float16 flip={flip}")


def test_latent_source_errors_name_the_directory_and_command(extracted, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)does not exist.*python -m dit_jax.latents.extract"):
    LatentSource(missing)
  broken = str(tmp_path / "broken")
  shutil.copytree(extracted, broken)
  os.remove(chunk_path(broken, 2))
  with pytest.raises(FileNotFoundError, match="lacks 1 of its 3 chunk files"):
    LatentSource(broken)
  with LatentSource(extracted) as source, pytest.raises(IndexError):
    source.get(10)


@pytest.mark.parametrize("damage", ["truncated", "another chunk", "random bytes", "empty"])
def test_a_damaged_chunk_is_refused_at_open_naming_it(extracted, tmp_path, damage):
  """Before any batch is read (a training run would only meet it mid-run, in ArrayRecord's
  words, with no file named)."""
  broken = str(tmp_path / "broken")
  shutil.copytree(extracted, broken)
  path = chunk_path(broken, 1)
  if damage == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "another chunk":  # the last chunk holds fewer records
    shutil.copyfile(chunk_path(broken, 2), path)
  else:
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).bytes(5000) if damage == "random bytes" else b"")
  with pytest.raises(ValueError, match=rf"(?s)latent chunk {re.escape(path)} is damaged \(.*"
                                       r"Delete it and metadata.json.*dit_jax.latents.extract"):
    LatentSource(broken)


def test_a_run_reads_the_latents_its_model_takes(extracted, image_folder):
  config = make_config(image_folder)
  config.latents_dir = extracted
  config.model.input_size, config.model.in_channels = 8, 4  # the test VAE's 8x8x4 latents
  with make_inputs(config, build_model(config.model)) as pipeline:
    assert isinstance(pipeline, LatentPipeline)
    assert ((pipeline.order.global_batch_size, pipeline.order.seed)
            == (config.batch_size, config.seed))
    assert pipeline.element_spec["moments"].shape == (config.batch_size, 8, 8, 8)
  config.model.input_size = 16
  with pytest.raises(ValueError, match=r"holds latents of shape \[8, 8, 4\], the model takes "
                                       r"\[16, 16, 4\]"):
    make_inputs(config, build_model(config.model))


def test_latents_from_moments_matches_online_encoding(reference, vae, image_folder):
  model, params, _ = vae
  crop = center_crop_arr(FolderSource(image_folder).get(4)[0], IMAGE_SIZE)
  rng = jax.random.key(7)
  online = jax.jit(model.encode_to_latents)(params, to_float(crop[None]), rng)
  stored = latents_from_moments(reference[0][4:5, 0], rng, model.config.scaling_factor)
  assert_rel_close(stored, online, rtol=1e-5)


def test_record_round_trip_and_length_check():
  moments = np.random.default_rng(1).standard_normal((2, 3, 5, 4)).astype(np.float32)
  record = encode_record(moments, 42, "float16")
  assert len(record) == record_bytes((3, 5, 2), "float16") == 2 * 3 * 5 * 4 * 2 + 4
  decoded, label = decode_record(record, (3, 5, 2), "float16")
  assert label == 42 and decoded.dtype == np.float16
  np.testing.assert_array_equal(decoded, moments.astype(np.float16))
  with pytest.raises(ValueError, match="expected"):
    decode_record(record, (3, 5, 2), "float32")


def test_resume_keeps_the_stored_chunk_size_and_says_so(extracted, image_folder, tmp_path,
                                                         caplog):
  out = str(tmp_path / "rechunked")
  shutil.copytree(extracted, out)
  os.remove(chunk_path(out, 2))
  os.remove(os.path.join(out, "metadata.json"))
  with caplog.at_level("WARNING"):
    result = extract_from_config(make_config(image_folder), vae_dir(), out, batch_size=4,
                                 chunk_size=8, progress=False)
  assert (result.written, result.skipped, result.complete) == ((2,), (0, 1), True)
  assert f"--chunk_size: {out} was begun with chunks of 4 examples; resuming with them" in (
      caplog.text)
  assert LatentSource(out).metadata["chunk_size"] == 4


def test_out_that_is_a_file_and_damaged_json_name_the_file(extracted, image_folder, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("mine")
  result = run_cli(f"--config=configs/folder.py:{image_folder},{IMAGE_SIZE},2", "--vae",
                   vae_dir(), "--out", str(afile), *CLI_FLAGS)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1] == f"error: --out: {afile} is a file, not a directory", lines
  assert afile.read_text() == "mine"
  damaged = str(tmp_path / "damaged")
  shutil.copytree(extracted, damaged)
  with open(os.path.join(damaged, "metadata.json"), "w") as f:
    f.write("{'format': 1}")
  with pytest.raises(ValueError, match=r"damaged/metadata\.json: not valid JSON \(Expecting "):
    LatentSource(damaged)
  bad_vae = tmp_path / "bad_vae"
  shutil.copytree(vae_dir(), bad_vae)
  (bad_vae / "config.json").write_text("{'_class_name': 'AutoencoderKL'}")
  with pytest.raises(ValueError, match=r"bad_vae/config\.json: not valid JSON \(Expecting "):
    load_diffusers_vae(str(bad_vae))
  (bad_vae / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
    VAEConfig.from_json(str(bad_vae))
