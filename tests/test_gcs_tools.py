"""The tools on gs:// paths, against the local Cloud Storage emulator (tests/gcs_emulator.py):
the .npz writer, evaluate, VAE folders, latent directories, convert, data.prepare's checks,
sample.py, and extract with training on its latents.

Where a tool also runs on local paths, its gs:// result is compared with the local one."""
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import ROOT, fixture_path
from dit_jax import checkpoints, cli, convert, evaluate, fs, generate, npz_samples
from dit_jax.data import prepare
from dit_jax.latents import LatentSource, chunk_path
from dit_jax.latents.extraction import extract_latents
from dit_jax.models import create_model, init_params
from dit_jax.vae import load_diffusers_vae, save_diffusers_vae
from train_utils import env_with_devices, run_train

TINY_DIT = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "64", "--num-heads", "4",
            "--image-size", "64", "--num-classes", "10"]


def upload(local: str, url: str) -> None:
  """Copies local folder `local` to `url`, file by file."""
  for root, _, files in os.walk(local):
    for name in files:
      relative = os.path.relpath(os.path.join(root, name), local)
      fs.write_bytes(fs.join(url, relative), fs.read_bytes(os.path.join(root, name)))


def tiny_vae_dir() -> str:
  return str(fixture_path("vae_reference", "tiny_vae"))


def test_npz_writer_on_gcs_resumes_and_matches_local(gcs_bucket, tmp_path):
  model = create_model("S/2", input_size=8, in_channels=3, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        init_params(model, jax.random.key(0)))
  spec = generate.SamplingSpec(sampler="ddim", num_steps=3, cfg_scale=2.0, clip_denoised=True)

  def run(out: str, **kwargs) -> None:
    npz_samples.generate_npz(model, params, spec, 10, out, batch_size=4, progress=False, **kwargs)

  local, remote = str(tmp_path / "s.npz"), f"{gcs_bucket}/samples/s.npz"
  run(local)
  run(remote, keep_parts=True)
  assert fs.read_bytes(remote) == fs.read_bytes(local)  # byte for byte
  kept = fs.listdir(remote + ".parts")  # the parts, and the settings they were drawn with
  assert [n for n in kept if n.startswith("part_")] == [f"part_00000{i}.npz" for i in range(3)]
  assert npz_samples.SETTINGS_NAME in kept
  # An interruption: a part and the final file lost; the rerun redraws exactly that part.
  fs.remove(remote)
  fs.remove(fs.join(remote + ".parts", "part_000001.npz"))
  run(remote)
  assert fs.read_bytes(remote) == fs.read_bytes(local)
  assert not fs.exists(remote + ".parts") and fs.listdir(f"{gcs_bucket}/samples") == ["s.npz"]
  with pytest.raises(FileExistsError, match=f"--npz: {remote} already exists"):
    run(remote)


def test_evaluate_reads_and_writes_gcs(gcs_bucket, tmp_path, capsys):
  digits = load_digits()  # the real digits as the digits source maps them to uint8
  images = np.round(digits.images[:200] * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target
  samples = f"{gcs_bucket}/eval/digits.npz"
  with fs.path(samples).open("wb") as f:
    np.savez(f, arr_0=np.repeat(images[..., None], 3, axis=-1), arr_1=labels[:200])
  out = f"{gcs_bucket}/eval/results.json"
  evaluate._main(["--samples", samples, "--ref", "digits", "--out", out])
  metrics = json.loads(fs.read_text(out))
  assert metrics["num_samples"] == 200 and metrics["accuracy"] > 0.97
  assert capsys.readouterr().out.split()[3] == f"{metrics['accuracy']:.4f}"
  with pytest.raises(cli.UserError, match=f"--out: {out} already exists"):
    evaluate._main(["--samples", samples, "--ref", "digits", "--out", out])
  with pytest.raises(cli.UserError, match=f"^--samples: no such file {gcs_bucket}/eval/no.npz$"):
    evaluate._main(["--samples", f"{gcs_bucket}/eval/no.npz", "--ref", "digits"])
  fs.write_bytes(f"{gcs_bucket}/eval/cut.npz", fs.read_bytes(samples)[:1000])
  with pytest.raises(cli.UserError, match="cut.npz is not a readable .npz"):
    evaluate._main(["--samples", f"{gcs_bucket}/eval/cut.npz", "--ref", "digits"])
  with pytest.raises(cli.UserError, match="--out: no bucket gs://no-such-bucket"):
    evaluate._main(["--samples", samples, "--ref", "digits", "--out", "gs://no-such-bucket/r"])
  # A reference .npz on gs:// is opened lazily through the same function.
  with evaluate._open_npz(samples, "--ref") as data:
    np.testing.assert_array_equal(data["arr_1"], labels[:200])


def test_vae_folder_on_gcs_loads_the_same_params(gcs_bucket):
  local_config, local_params = load_diffusers_vae(tiny_vae_dir())
  upload(tiny_vae_dir(), f"{gcs_bucket}/pipeline/vae")  # a diffusers pipeline's vae/ subfolder
  config, params = load_diffusers_vae(f"{gcs_bucket}/pipeline")
  assert config == local_config
  jax.tree.map(np.testing.assert_array_equal, params, local_params)
  save_diffusers_vae(f"{gcs_bucket}/saved", config, params, dtype="F16")
  _, half = load_diffusers_vae(f"{gcs_bucket}/saved")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float16)), half,
               local_params)
  with pytest.raises(FileNotFoundError, match=f"{gcs_bucket}/none: no config.json"):
    load_diffusers_vae(f"{gcs_bucket}/none")


class RandomImages:
  """Ten 16x16 RGB images of two classes: a source for extract_latents."""
  num_classes, image_shape = 2, (16, 16, 3)

  def __init__(self):
    self.images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)

  def __len__(self) -> int:
    return len(self.images)

  def get(self, index: int):
    return self.images[index], index % 2


def extract(out: str):
  vae_config, vae_params = load_diffusers_vae(tiny_vae_dir())
  return extract_latents(RandomImages(), out, vae_config=vae_config, vae_params=vae_params,
                         image_size=16, batch_size=2, chunk_size=4, data_config={"name": "t"},
                         num_threads=1, progress=False)


def test_latent_directory_on_gcs_holds_and_reads_the_same_records(gcs_bucket, tmp_path, caplog):
  local, remote = str(tmp_path / "latents"), f"{gcs_bucket}/latents"
  extract(local)
  result = extract(remote)  # each chunk written locally, then uploaded
  assert result.complete and result.written == (0, 1, 2)
  assert fs.listdir(remote) == sorted(os.listdir(local))  # no temporary file left there
  for name in os.listdir(local):
    assert fs.read_bytes(fs.join(remote, name)) == fs.read_bytes(os.path.join(local, name)), name
  cache = str(tmp_path / "cache")
  caplog.set_level(logging.INFO, "dit_jax.latents.source")
  with LatentSource(local) as expected, LatentSource(remote, cache_dir=cache) as source:
    assert source.local_dir.startswith(cache) and source.directory == remote
    for i in range(len(expected)):
      for got, want in zip(source.read(i), expected.read(i)):
        np.testing.assert_array_equal(got, want)
  assert "copied 3 of the 3 chunk files" in caplog.text
  # A complete copy is reused; a damaged one (wrong size) is copied again, the rest kept.
  with open(chunk_path(source.local_dir, 1), "ab") as f:
    f.write(b"x")
  caplog.clear()
  LatentSource(remote, cache_dir=cache).close()
  assert "copied 1 of the 3 chunk files" in caplog.text
  caplog.clear()
  LatentSource(remote, cache_dir=cache).close()
  assert f"reusing the complete local copy of {remote}" in caplog.text
  assert fs.read_bytes(chunk_path(source.local_dir, 1)) == fs.read_bytes(chunk_path(local, 1))
  # Errors name the URL.
  fs.remove(chunk_path(remote, 2))
  with pytest.raises(FileNotFoundError, match=f"lacks 1 of its 3 chunk files .first: "
                                              f"{remote}/latents-000002"):
    LatentSource(remote, cache_dir=cache)
  with pytest.raises(FileNotFoundError, match=f"'{gcs_bucket}/none' does not exist"):
    LatentSource(f"{gcs_bucket}/none")


def test_convert_to_and_from_gcs(gcs_bucket, tmp_path):
  pt = str(fixture_path("dit_reference", "tiny_dit.pt"))
  convert._main(["--torch", pt, *TINY_DIT, "--out", f"{gcs_bucket}/ckpt"])
  convert._main(["--torch", pt, *TINY_DIT, "--out", str(tmp_path / "ckpt")])
  model, params = checkpoints.load_params(f"{gcs_bucket}/ckpt")
  local_model, local_params = checkpoints.load_params(str(tmp_path / "ckpt"))
  assert model == local_model
  jax.tree.map(np.testing.assert_array_equal, params, local_params)
  with pytest.raises(cli.UserError, match="--out: .*ckpt already exists and is not empty"):
    convert._main(["--torch", pt, *TINY_DIT, "--out", f"{gcs_bucket}/ckpt"])
  out = f"{gcs_bucket}/exported/tiny.pt"
  convert._main(["--from-checkpoint", f"{gcs_bucket}/ckpt", "--torch-out", out])
  exported = torch.load(fs.path(out).open("rb"), map_location="cpu", weights_only=True)
  official = torch.load(pt, map_location="cpu", weights_only=True)
  assert set(exported) == set(official)
  np.testing.assert_array_equal(exported["blocks.0.attn.qkv.weight"].numpy(),
                                official["blocks.0.attn.qkv.weight"].numpy())
  with pytest.raises(cli.UserError, match=f"--torch-out: {out} already exists"):
    convert._main(["--from-checkpoint", f"{gcs_bucket}/ckpt", "--torch-out", out])


def tar_bytes(*members: str) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name in members:
      tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
  return buffer.getvalue()


def test_prepare_checks_a_gcs_data_dir(gcs_bucket):
  """tfds reads gs:// itself (through TensorFlow, which no emulator can stand in for); our own
  checks before it must work on a URL and name it."""
  data_dir = f"{gcs_bucket}/tfds"
  manual = prepare.manual_dir_of(data_dir)
  assert manual == f"{data_dir}/downloads/manual"
  with pytest.raises(cli.UserError, match=f"in {manual} .no such folder."):
    prepare.check_imagenet_tars(manual)
  (train, _, _), (val, _, _) = prepare.IMAGENET_TARS
  fs.write_bytes(f"{manual}/{train}", tar_bytes("n01440764.tar"))
  fs.write_bytes(f"{manual}/{val}", tar_bytes("n01440764.tar"))  # not validation images
  with pytest.raises(cli.UserError, match=f"{manual}/{val} is not ImageNet's {val}"):
    prepare.check_imagenet_tars(manual)
  fs.write_bytes(f"{manual}/{val}", tar_bytes("ILSVRC2012_val_00000001.JPEG"))
  prepare.check_imagenet_tars(manual)
  prepare.check_free_space(data_dir, manual)  # no disk to measure: returns (it used to loop)
  fs.write_text(f"{data_dir}/imagenet2012/incomplete.ab12_5.1.0/x", "partial")
  fs.write_text(f"{data_dir}/imagenet2012/5.1.0/keep", "built")
  assert prepare.remove_incomplete(f"{data_dir}/imagenet2012", "5.1.0") == [
      f"{data_dir}/imagenet2012/incomplete.ab12_5.1.0"]
  assert fs.listdir(f"{data_dir}/imagenet2012") == ["5.1.0"]


def sample_py(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env_with_devices(1))


@pytest.mark.slow  # two end-to-end runs of sample.py
def test_sample_py_on_gcs_writes_what_it_writes_locally(gcs_bucket, tmp_path):
  pt = str(fixture_path("dit_reference", "tiny_dit.pt"))
  convert._main(["--torch", pt, *TINY_DIT, "--out", str(tmp_path / "ckpt")])
  upload(str(tmp_path / "ckpt"), f"{gcs_bucket}/ckpt")
  shutil.copytree(tiny_vae_dir(), tmp_path / "vae")
  upload(tiny_vae_dir(), f"{gcs_bucket}/vae")
  common = ["--sampler=ddim", "--num_steps=3", "--classes=1,2", "--per_class=2", "--seed=5",
            "--num_samples=3", "--batch_size=2"]
  outputs = {}
  for where, base in (("local", str(tmp_path)), ("gcs", gcs_bucket)):
    result = sample_py(f"--checkpoint={base}/ckpt", f"--vae={base}/vae", f"--out={base}/g.png",
                       f"--singles_dir={base}/singles", f"--npz={base}/s.npz", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[where] = {name: fs.read_bytes(fs.join(base, name))
                      for name in ["g.png", "s.npz"] + [f"singles/{i:05d}.png" for i in range(4)]}
  assert outputs["gcs"] == outputs["local"]  # byte for byte, the same seed
  again = sample_py(f"--checkpoint={gcs_bucket}/ckpt", f"--vae={gcs_bucket}/vae",
                    f"--out={gcs_bucket}/g.png", *common)
  assert again.stderr.strip().splitlines()[-1] == (
      f"error: --out: {gcs_bucket}/g.png already exists; refusing to overwrite it")
  missing = sample_py(f"--checkpoint={gcs_bucket}/nothing", f"--out={gcs_bucket}/h.png")
  assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith(
      f"error: checkpoint: no directory {gcs_bucket}/nothing")


@pytest.mark.slow  # end-to-end runs of extract and train.py
def test_extract_cli_and_training_on_gcs_latents(gcs_bucket, tmp_path, monkeypatch):
  from test_train import write_folder
  folder = tmp_path / "images"
  write_folder(folder, sizes=((20, 18), (16, 24), (32, 32)))
  upload(tiny_vae_dir(), f"{gcs_bucket}/vae")
  latents = f"{gcs_bucket}/latents"
  config = f"--config={ROOT / 'configs/folder.py'}:{folder},16,2"
  extracted = subprocess.run(
      [sys.executable, "-m", "dit_jax.latents.extract", config, f"--vae={gcs_bucket}/vae",
       f"--out={latents}", "--batch_size=4"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=env_with_devices(1))
  assert extracted.returncode == 0, extracted.stderr[-3000:]
  assert fs.listdir(latents) == ["latents-000000.array_record", "metadata.json", "plan.json"]
  # config.latents_cache_dir is where train.py copies it; it wins over $DIT_LATENTS_CACHE.
  monkeypatch.setenv("DIT_LATENTS_CACHE", str(tmp_path / "env_cache"))
  trained = run_train(tmp_path / "run", config=f"configs/folder.py:{folder},16,2",
                      model__in_channels=4, model__input_size=8, model__dtype="float32",
                      batch_size=4, latents_dir=latents, sample__every_steps=0,
                      latents_cache_dir=str(tmp_path / "cache"))
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "copied 1 of the 1 chunk files" in trained.stderr
  assert not (tmp_path / "env_cache").exists()
  (copy,) = os.listdir(tmp_path / "cache")
  assert fs.read_bytes(tmp_path / "cache" / copy / "latents-000000.array_record") == (
      fs.read_bytes(f"{latents}/latents-000000.array_record"))
