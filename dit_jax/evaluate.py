r"""Scores a samples `.npz` (ADM evaluator layout) against a reference, all in JAX.

  python -m dit_jax.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
      --inception pt_inception-2015-12-05-6726825d.pth --out results.json
  python -m dit_jax.evaluate --samples digits.npz --ref digits      # the embedded default

References: an ADM reference batch `.npz` (its `mu`, `sigma`, `mu_s`, `sigma_s` when present,
else statistics computed from `arr_0`; precision/recall need `arr_0`), a folder of images
(center-cropped to the samples' size), or `tfds:NAME[:SPLIT]` (a prepared array_record dataset).
`digits` scores with a classifier of scikit-learn's real digits instead of Inception (accuracy
against `arr_1` and a Fréchet distance in the classifier's features).

--samples, --ref (an .npz), --inception and --out may be gs:// URLs.
"""
import contextlib
import json
import os
import zipfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import flags

from dit_jax import cli, fs
from dit_jax.eval.fid_metrics import inception_score, precision_recall
from dit_jax.eval.frechet import frechet_distance, gaussian_stats

BATCH = 250


def load_samples(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """`arr_0` uint8 [N, H, W, 3] and `arr_1` labels (or None), validated."""
  with _open_npz(path, "--samples") as data:
    if "arr_0" not in data:
      raise ValueError(f"--samples: {path} has no 'arr_0' (keys {sorted(data.files)})")
    images, labels = _read(data, "arr_0", path), _read(data, "arr_1", path)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"--samples: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} "
                     f"{list(images.shape)}")
  return images, labels


@contextlib.contextmanager
def _open_npz(path: str, flag: str) -> Iterator[Any]:
  """np.load of an .npz (a local path or a URL, its members read as they are asked for), with
  one-line errors for a missing, truncated or foreign file."""
  if not fs.exists(path) or fs.is_dir(path):
    raise FileNotFoundError(f"{flag}: no such file {path}")
  with fs.path(path).open("rb") as f:
    try:
      data = np.load(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      # numpy's own message would advise allow_pickle, unsafe for a file of unknown origin.
      raise ValueError(f"{flag}: {path} is not a readable .npz file (truncated, damaged or "
                       "another format)") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError(f"{flag}: {path} is a single .npy array, not an .npz")
    with data:
      yield data


def _read(data: Any, key: str, path: str) -> Optional[np.ndarray]:
  """`data[key]` (None when absent); a damaged member is the file's fault, not a bug."""
  if key not in data:
    return None
  try:
    return data[key]
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: cannot read {key!r}: the file is truncated or damaged") from e


def _chunks(images: np.ndarray, size: int = BATCH) -> Iterator[np.ndarray]:
  for start in range(0, len(images), size):
    yield images[start:start + size]


def reference_images(ref: str, image_size: int) -> np.ndarray:
  """uint8 [N, S, S, 3] from a folder or `tfds:NAME[:SPLIT]`, ADM center-cropped."""
  from dit_jax.data import make_source
  from dit_jax.data.preprocess import center_crop_arr

  if ref.startswith("tfds:"):
    name, _, split = ref[len("tfds:"):].partition(":")
    source = make_source(name, split=split or "train", channels=3)
  elif fs.is_local(ref) and os.path.isdir(ref):
    source = make_source("folder", folder=ref)
  else:  # image folders are read locally only (the folder source lists them with os.walk)
    raise FileNotFoundError(f"--ref: {ref} is neither a .npz, a local folder nor tfds:NAME")
  return np.stack([center_crop_arr(source.get(i)[0], image_size) for i in range(len(source))])


def evaluate_inception(samples: np.ndarray, ref: str, inception_path: str,
                       batch_size: int = BATCH) -> dict[str, Any]:
  """FID, sFID, Inception Score, precision and recall (ADM evaluator conventions)."""
  from dit_jax.eval import inception
  from dit_jax.eval.inception_convert import load_fid_inception

  variables = load_fid_inception(inception_path)

  def features(images: np.ndarray) -> dict[str, np.ndarray]:
    return inception.inception_features(variables, _chunks(images, batch_size), batch_size)

  ref_images, ref_stats = None, {}  # read (and checked) before the expensive features
  if ref.endswith(".npz"):
    with _open_npz(ref, "--ref") as data:
      ref_stats = {k: _read(data, k, ref) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data}
      ref_images = _read(data, "arr_0", ref)
  else:
    ref_images = reference_images(ref, samples.shape[1])
  sample_feats = features(samples)
  ref_feats = features(ref_images) if ref_images is not None else {}
  if "mu" not in ref_stats:
    ref_stats["mu"], ref_stats["sigma"] = gaussian_stats(ref_feats["pool3"])
  if "mu_s" not in ref_stats and ref_feats:
    ref_stats["mu_s"], ref_stats["sigma_s"] = gaussian_stats(ref_feats["spatial"])
  mu, sigma = gaussian_stats(sample_feats["pool3"])
  results = {"num_samples": int(len(samples)),
             "fid": frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
             "inception_score": inception_score(sample_feats["logits_unbiased"])}
  if "mu_s" in ref_stats:
    mu_s, sigma_s = gaussian_stats(sample_feats["spatial"])
    results["sfid"] = frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"])
  if ref_feats:  # precision/recall need the reference features themselves
    results["precision"], results["recall"] = precision_recall(ref_feats["pool3"],
                                                               sample_feats["pool3"])
  return results


def evaluate_digits(samples: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
  """The digits default's domain metrics: classifier accuracy and Fréchet distance."""
  from dit_jax.eval.digits import DigitsGrader

  if samples.shape[1:3] != (8, 8):
    raise ValueError(f"--samples: digits samples must be 8x8, got {list(samples.shape[1:3])}")
  if labels is None:
    raise ValueError("--samples: digits evaluation needs the conditioning labels in arr_1")
  grade = DigitsGrader().grade(samples[..., :1], labels)
  return {"num_samples": int(grade["num_samples"]), "accuracy": float(grade["accuracy"]),
          "frechet_distance": float(grade["frechet_distance"])}


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined in `values` (the program's own, see `cli.parse_flags`)."""
  flags.DEFINE_string("samples", None, "samples .npz (arr_0 uint8 NHWC)", flag_values=values)
  flags.DEFINE_string("ref", None, "reference .npz, folder, tfds:NAME, digits", flag_values=values)
  flags.DEFINE_string("inception", None, "pytorch-fid weights pt_inception-2015-12-05-*.pth",
                      flag_values=values)
  flags.DEFINE_string("out", None, "JSON file for the results (must not exist)",
                      flag_values=values)
  flags.DEFINE_integer("batch_size", BATCH, "Inception batch size", flag_values=values)
  flags.mark_flags_as_required(["samples", "ref"], flag_values=values)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line from Python: `argv` (default: sys.argv[1:]), errors as one line."""
  cli.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> None:
  _evaluate(*cli.parse_flags(define_flags, argv, "dit_jax.evaluate"))


def _evaluate(values: flags.FlagValues, argv: Sequence[str]) -> None:
  from dit_jax import logs  # pylint: disable=import-outside-toplevel
  logs.setup()  # first: the libraries' INFO lines stay out
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {list(argv[1:])}")
  with cli.user_errors(ValueError, OSError):
    if values.out:
      cli.check_new_output("--out", values.out)
    samples, labels = load_samples(values.samples)
    if values.ref == "digits":
      results = evaluate_digits(samples, labels)
    else:
      if not values.inception:
        raise ValueError("--inception: Inception metrics need the pytorch-fid weights file "
                         "(pt_inception-2015-12-05-6726825d.pth)")
      results = evaluate_inception(samples, values.ref, values.inception, values.batch_size)
  width = max(map(len, results))
  for name, value in results.items():
    print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else
          f"{name:<{width}}  {value}")
  if values.out:
    with cli.user_errors(FileExistsError), cli.write_errors():  # a file that appeared meanwhile
      fs.write_text(values.out, json.dumps(results, indent=2), overwrite=False)


if __name__ == "__main__":
  define_flags()
  cli.run_absl(lambda argv: _evaluate(flags.FLAGS, argv))
