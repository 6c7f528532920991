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
  """`arr_0` uint8 [N, H, W, 3] (N >= 2: the metrics need a covariance) and `arr_1` labels (or
  None), validated."""
  with _open_npz(path, "--samples") as data:
    if "arr_0" not in data:
      raise ValueError(f"--samples: {path} has no 'arr_0' (keys {sorted(data.files)})")
    images, labels = _read(data, "arr_0", path), _read(data, "arr_1", path)
  _check_images(images, "--samples", path)
  return images, labels


def _check_images(images: np.ndarray, flag: str, path: str) -> None:
  """`arr_0` of a samples or reference batch: uint8 [N, H, W, 3] with N >= 2 (a covariance)."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{flag}: {path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} "
                     f"{list(images.shape)}")
  if len(images) < 2:
    raise ValueError(f"{flag}: {path}: arr_0 holds {len(images)} image(s); the metrics need at "
                     "least 2 (a covariance)")


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


def _reference_source(ref: str) -> Any:
  """The data source of a folder or `tfds:NAME[:SPLIT]` reference, opened (which checks it)
  without reading its images: a wrong --ref is reported before the Inception work."""
  from dit_jax.data import DatasetNotFoundError, make_source

  if ref.startswith("tfds:"):
    name, _, split = ref[len("tfds:"):].partition(":")
    if not name:
      raise ValueError("--ref: tfds: needs a dataset name (tfds:NAME[:SPLIT])")
    try:
      return make_source(name, split=split or "train", channels=3)
    except DatasetNotFoundError as e:  # not prepared; evaluate has no data_dir of its own
      message = str(e).replace("config.data.data_dir", "$TFDS_DATA_DIR")
      raise ValueError(f"--ref: {message}") from e
    except (ValueError, KeyError) as e:  # the messages name the training config's keys
      cause = e.__cause__ or e
      if type(cause).__name__ == "DatasetNotFoundError":  # tfds's own: no builder of that name
        raise ValueError(f"--ref: {ref}: tfds has no dataset {name!r}") from e
      raise ValueError(f"--ref: {ref}: {e}") from e
  if fs.is_local(ref) and os.path.isdir(ref):
    source = make_source("folder", folder=ref)
    if len(source) < 2:
      raise ValueError(f"--ref: {ref} holds {len(source)} image(s); the metrics need at least 2")
    return source
  # image folders are read locally only (the folder source lists them with os.walk)
  raise FileNotFoundError(f"--ref: {ref} is neither a .npz, a local folder nor tfds:NAME")


def reference_images(ref: str, image_size: int, source: Any = None) -> np.ndarray:
  """uint8 [N, S, S, 3] from a folder or `tfds:NAME[:SPLIT]` (`source`: already opened by
  `_reference_source`), ADM center-cropped."""
  from dit_jax.data.preprocess import center_crop_arr

  source = source if source is not None else _reference_source(ref)
  return np.stack([center_crop_arr(source.get(i)[0], image_size) for i in range(len(source))])


def _check_stats(ref: str, stats: dict[str, np.ndarray], mu_key: str, sigma_key: str,
                 dim: int) -> None:
  """Reference statistics must be a pair of the features' size: a wrong one would otherwise be
  found only after all the Inception work, by a message that does not name --ref."""
  if (mu_key in stats) != (sigma_key in stats):
    have, lack = (mu_key, sigma_key) if mu_key in stats else (sigma_key, mu_key)
    raise ValueError(f"--ref: {ref} has {have!r} but not {lack!r}")
  if mu_key not in stats:
    return
  mu, sigma = stats[mu_key], stats[sigma_key]
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"--ref: {ref}: {mu_key!r} and {sigma_key!r} must have shapes [{dim}] and "
                     f"[{dim}, {dim}] (Inception features), got {list(mu.shape)} and "
                     f"{list(sigma.shape)}")


def read_reference_npz(ref: str) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
  """(`arr_0` images or None, the statistics `mu`, `sigma`, `mu_s`, `sigma_s` present) of an ADM
  reference batch, checked before any Inception work."""
  from dit_jax.eval.inception import POOL3_DIM, SPATIAL_DIM

  with _open_npz(ref, "--ref") as data:
    if "arr_0" not in data and not ("mu" in data and "sigma" in data):
      raise ValueError(f"--ref: {ref} has neither 'arr_0' (reference images) nor 'mu' and "
                       f"'sigma' (reference statistics); keys found: {sorted(data.files)}")
    stats = {k: _read(data, k, ref) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data}
    images = _read(data, "arr_0", ref)
  _check_stats(ref, stats, "mu", "sigma", POOL3_DIM)
  _check_stats(ref, stats, "mu_s", "sigma_s", SPATIAL_DIM)
  if images is not None:
    _check_images(images, "--ref", ref)
  return images, stats


def load_inception(path: str) -> dict:
  """The FID Inception variables, every failure to read them a ValueError naming --inception."""
  from dit_jax.eval.inception_convert import load_fid_inception
  try:
    return load_fid_inception(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"--inception: {e}") from e


def check_inception_file(path: str) -> None:
  """The weights file exists: checked with the other inputs, before anything is read."""
  from dit_jax.eval.inception_convert import check_weights_file
  try:
    check_weights_file(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--inception: {e}") from e


def evaluate_inception(samples: np.ndarray, ref: str, inception_path: str,
                       batch_size: int = BATCH) -> dict[str, Any]:
  """FID, sFID, Inception Score, precision and recall (ADM evaluator conventions).

  Every input is checked (the reference's keys and shapes, the weights file) before the
  expensive features are computed.
  """
  from dit_jax.eval import inception

  if batch_size <= 0:
    raise ValueError(f"--batch_size: must be positive, got {batch_size}")
  check_inception_file(inception_path)
  ref_images, ref_stats, source = None, {}, None
  if ref.endswith(".npz"):
    ref_images, ref_stats = read_reference_npz(ref)
  else:
    source = _reference_source(ref)
  variables = load_inception(inception_path)
  if source is not None:
    ref_images = reference_images(ref, samples.shape[1], source)

  def features(images: np.ndarray) -> dict[str, np.ndarray]:
    return inception.inception_features(variables, _chunks(images, batch_size), batch_size)

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
  from dit_jax.eval.digits import NUM_CLASSES, DigitsGrader

  if samples.shape[1:3] != (8, 8):
    raise ValueError(f"--samples: digits samples must be 8x8, got {list(samples.shape[1:3])}")
  if labels is None:
    raise ValueError("--samples: digits evaluation needs the conditioning labels in arr_1")
  if labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"--samples: arr_1 must be integer labels [{len(samples)}] (one per image), "
                     f"got {labels.dtype} {list(labels.shape)}")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"--samples: arr_1 labels must be digit classes in [0, {NUM_CLASSES}), got "
                     f"range [{labels.min()}, {labels.max()}]")
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
    if values.batch_size <= 0:
      raise ValueError(f"--batch_size: must be positive, got {values.batch_size}")
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
