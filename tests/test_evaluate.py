"""python -m dit_jax.evaluate: Inception metrics on random weights, the digits domain metrics,
and clear errors for bad inputs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, fixture_path
from dit_jax import images as image_io
from dit_jax.eval.digits import DigitsGrader
from test_inception import _rebuild_state_dict


def run_eval(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dit_jax.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def inception_setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  with np.load(fixture_path("inception_reference", "fid_inception_seed0.npz")) as data:
    ref = {k: data[k] for k in data.files}
  weights = tmp / "pt_inception-random.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in _rebuild_state_dict(ref).items()},
             weights)
  images = np.concatenate([ref["images"], ref["images"][:, :, ::-1]])  # 2x the fixture images
  return tmp, weights, images


@pytest.mark.slow  # an end-to-end run of the program
def test_inception_metrics(inception_setup, capsys):
  from dit_jax import evaluate
  tmp, weights, images = inception_setup
  samples = tmp / "samples.npz"
  np.savez(samples, arr_0=images, arr_1=np.zeros(len(images), np.int64))
  ref = tmp / "ref.npz"
  np.savez(ref, arr_0=images)
  out = tmp / "results.json"
  evaluate.main(["--samples", str(samples), "--ref", str(ref), "--inception", str(weights),
                 "--batch_size", "12", "--out", str(out)])
  metrics = json.loads(out.read_text())
  assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3  # a set against itself
  assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
  assert metrics["inception_score"] >= 1.0 and metrics["num_samples"] == len(images)
  assert "precision" in capsys.readouterr().out
  # Reference statistics in the .npz are used when present (here deliberately not those of
  # arr_0), while precision/recall still come from arr_0.
  with_stats = tmp / "ref_stats.npz"
  np.savez(with_stats, arr_0=images, mu=np.full(2048, 5.0), sigma=np.eye(2048),
           mu_s=np.full(2023, 5.0), sigma_s=np.eye(2023))
  out = tmp / "stats.json"
  evaluate.main(["--samples", str(samples), "--ref", str(with_stats), "--inception",
                 str(weights), "--batch_size", "12", "--out", str(out)])
  metrics = json.loads(out.read_text())
  assert metrics["fid"] > 2048 * 20 and metrics["sfid"] > 2023 * 20
  assert metrics["precision"] == 1.0


def test_folder_reference_is_center_cropped(tmp_path):
  from dit_jax.evaluate import reference_images
  rng = np.random.default_rng(0)
  (tmp_path / "a").mkdir()
  big = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
  Image.fromarray(big).save(tmp_path / "a" / "0.png")
  Image.fromarray(big[:16, :16]).save(tmp_path / "a" / "1.png")
  out = reference_images(str(tmp_path), 16)
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[1], big[:16, :16])


@pytest.mark.slow  # an end-to-end run of the program
def test_digits_domain_evaluation(tmp_path):
  grader = DigitsGrader()
  real, labels = grader.real_images()
  samples = tmp_path / "digits.npz"
  np.savez(samples, arr_0=np.repeat(image_io.to_uint8(real[:500]), 3, axis=-1),
           arr_1=labels[:500])
  out = tmp_path / "digits.json"
  result = run_eval("--samples", str(samples), "--ref", "digits", "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(out.read_text())
  assert metrics["accuracy"] > 0.97 and metrics["frechet_distance"] < 3.0
  shuffled = tmp_path / "shuffled.npz"
  np.savez(shuffled, arr_0=np.repeat(image_io.to_uint8(real[:500]), 3, axis=-1),
           arr_1=np.roll(labels[:500], 1))
  result = run_eval("--samples", str(shuffled), "--ref", "digits")
  assert result.returncode == 0
  assert float(result.stdout.split("accuracy")[1].split()[0]) < 0.3


@pytest.mark.slow
def test_bad_inputs_give_clear_errors(tmp_path):
  bad = tmp_path / "float.npz"
  np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), np.float32))
  result = run_eval("--samples", str(bad), "--ref", "digits")
  assert result.returncode != 0 and "--samples: arr_0 must be uint8" in result.stderr
  gray = tmp_path / "gray.npz"
  np.savez(gray, arr_0=np.zeros((2, 8, 8), np.uint8))
  assert "arr_0 must be uint8 [N, H, W, 3]" in run_eval("--samples", str(gray), "--ref",
                                                        "digits").stderr
  good = tmp_path / "good.npz"
  np.savez(good, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  result = run_eval("--samples", str(good), "--ref", str(good), "--inception",
                    str(tmp_path / "missing.pth"))
  assert result.returncode != 0 and "missing.pth" in result.stderr
  result = run_eval("--samples", str(good), "--ref", str(good))
  assert result.returncode != 0 and "--inception" in result.stderr
  result = run_eval("--samples", str(tmp_path / "nope.npz"), "--ref", "digits")
  assert result.returncode != 0 and "--samples: no such file" in result.stderr
  (tmp_path / "taken.json").write_text("{}")
  result = run_eval("--samples", str(good), "--ref", "digits", "--out",
                    str(tmp_path / "taken.json"))
  assert result.returncode != 0 and "refusing to overwrite" in result.stderr
  assert (tmp_path / "taken.json").read_text() == "{}"
