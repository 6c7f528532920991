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
  assert result.returncode != 0 and f"--samples: {bad}: arr_0 must be uint8" in result.stderr
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


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line of stderr, `error: ...`, of a refused run (no traceback, nothing else)."""
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def refused(capsys, *args: str) -> str:
  """The one `error:` line of `evaluate.main(args)` run in this process (faster than a
  subprocess: every case here is refused before JAX or Inception work)."""
  from dit_jax import evaluate
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(list(args))
  assert exit_info.value.code == 1
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.fixture(name="inputs")
def _inputs(tmp_path):
  """A valid samples/reference .npz, an unreadable weights file, and an --out path."""
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.arange(4))
  junk = tmp_path / "junk.pth"
  junk.write_bytes(np.random.default_rng(0).bytes(1000))
  return tmp_path, str(samples), str(junk), str(tmp_path / "out.json")


def test_unreadable_inception_file_is_one_line(inputs):
  tmp, samples, junk, out = inputs
  line = error_line(run_eval("--samples", samples, "--ref", samples, "--inception", junk,
                             "--out", out))
  assert line.startswith(f"error: --inception: {junk} is not a PyTorch weights file"), line
  assert not (tmp / "out.json").exists()


def test_reference_is_checked_before_inception(inputs, capsys):
  tmp, samples, junk, out = inputs
  common = ("--samples", samples, "--inception", junk, "--out", out)
  line = refused(capsys, *common, "--ref", str(tmp / "nonexist.npz"))
  assert line == f"error: --ref: no such file {tmp / 'nonexist.npz'}"
  wrong_key = tmp / "wrongkey.npz"
  np.savez(wrong_key, images=np.zeros((4, 8, 8, 3), np.uint8))
  line = refused(capsys, *common, "--ref", str(wrong_key))
  assert line.startswith(f"error: --ref: {wrong_key} has neither 'arr_0'"), line
  assert "keys found: ['images']" in line
  wrong_mu = tmp / "wrongmu.npz"
  np.savez(wrong_mu, mu=np.zeros(64), sigma=np.eye(64))
  line = refused(capsys, *common, "--ref", str(wrong_mu))
  assert line.startswith(f"error: --ref: {wrong_mu}: 'mu' and 'sigma' must have shapes [2048]")
  half = tmp / "half.npz"
  np.savez(half, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu_s=np.zeros(2023))
  assert "has 'mu_s' but not 'sigma_s'" in refused(capsys, *common, "--ref", str(half))
  assert "--ref: " in refused(capsys, *common, "--ref", str(tmp / "no_folder"))
  assert not (tmp / "out.json").exists()


def test_unknown_tfds_reference_names_ref(inputs, capsys):
  _, samples, junk, _ = inputs
  line = refused(capsys, "--samples", samples, "--inception", junk, "--ref", "tfds:bogusds")
  assert line == "error: --ref: tfds:bogusds: tfds has no dataset 'bogusds'", line


def test_batch_size_and_samples_are_checked(inputs, capsys):
  tmp, samples, junk, out = inputs
  for ref in ("digits", samples):
    for size in ("0", "-1"):
      line = refused(capsys, "--samples", samples, "--ref", ref, "--inception", junk,
                     "--batch_size", size, "--out", out)
      assert line == f"error: --batch_size: must be positive, got {size}"
  bad_labels = tmp / "labels.npz"
  np.savez(bad_labels, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.array([0, 1, 2, 10]))
  line = refused(capsys, "--samples", str(bad_labels), "--ref", "digits", "--out", out)
  assert line == ("error: --samples: arr_1 labels must be digit classes in [0, 10), got range "
                  "[0, 10]")
  empty = tmp / "empty.npz"
  np.savez(empty, arr_0=np.zeros((0, 8, 8, 3), np.uint8), arr_1=np.zeros(0, np.int64))
  for ref in ("digits", samples):
    line = refused(capsys, "--samples", str(empty), "--ref", ref, "--inception", junk)
    assert line.startswith(f"error: --samples: {empty}: arr_0 holds 0 image(s)"), line
  assert not (tmp / "out.json").exists()
