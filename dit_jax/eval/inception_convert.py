"""Import of pytorch-fid's FID Inception weights (a PyTorch state_dict) into `FidInceptionV3`.

The weights file is `pt_inception-2015-12-05-6726825d.pth` from pytorch-fid's GitHub release
(`FID_WEIGHTS_URL`). Nothing is downloaded here: the user fetches the file once and passes its
path (local, or a gs:// URL). torch is imported only to read the file.

Key mapping (module paths are the same on both sides, `.` in torch, nesting in Flax):

    <path>.conv.weight [out, in, kh, kw]  -> params/<path>/conv/kernel [kh, kw, in, out]
    <path>.bn.weight / .bn.bias           -> params/<path>/bn/scale / bias
    <path>.bn.running_mean / running_var  -> batch_stats/<path>/bn/mean / var
    <path>.bn.num_batches_tracked         -> (ignored: a training counter, absent in old files)
    fc.weight [1008, 2048] / fc.bias      -> params/fc/kernel [2048, 1008] / bias
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import cli, fs
from dit_jax.eval.inception import FidInceptionV3

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
_IGNORED_SUFFIX = ".num_batches_tracked"
# Flax leaf name -> (torch leaf name, collection).
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax variable path (collection first) -> torch state_dict key."""
  *modules, leaf = path[1:]
  if modules[-1] == "bn":
    leaf = _BN_LEAVES[leaf]
  elif leaf == "kernel":
    leaf = "weight"
  return ".".join(modules + [leaf])


def _to_torch_layout(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a Flax variable: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
  if len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def _variable_paths() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (Flax variable path, Flax shape), from the model's abstract variables."""
  abstract = jax.eval_shape(FidInceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(abstract)
  return {_torch_key(path): (path, leaf.shape) for path, leaf in flat.items()}


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every state_dict key `FidInceptionV3` needs, with its torch shape (num_batches_tracked
  excluded). Derived from the Flax model itself, so the two cannot drift apart."""
  return {key: _to_torch_layout(shape) for key, (_, shape) in _variable_paths().items()}


def convert_state_dict(state_dict: Mapping[str, object]) -> dict:
  """Converts pytorch-fid's FID Inception state_dict to `FidInceptionV3` variables.

  Args:
    state_dict: key -> tensor or array (torch tensors are converted with `.numpy()`).

  Returns:
    `{"params": ..., "batch_stats": ...}` of float32 jax arrays, for `FidInceptionV3().apply`.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch, by key.
  """
  wanted = _variable_paths()
  problems = []
  for key in state_dict:
    if key not in wanted and not key.endswith(_IGNORED_SUFFIX):
      problems.append(f"unexpected key {key!r}")
  converted = {}
  for key, (path, flax_shape) in wanted.items():
    if key not in state_dict:
      problems.append(f"missing key {key!r}")
      continue
    value = _as_numpy(state_dict[key])
    expected = _to_torch_layout(flax_shape)
    if value.shape != expected:
      problems.append(f"key {key!r} has shape {value.shape}, expected {expected}")
      continue
    converted[path] = jnp.asarray(_from_torch_layout(value).astype(np.float32))
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError("state_dict does not match pytorch-fid's FID InceptionV3 "
                     f"({len(problems)} problem(s)):\n  {shown}{more}")
  return flax.traverse_util.unflatten_dict(converted)


def check_weights_file(path: str) -> None:
  """FileNotFoundError unless `path` is a file (the weights are never downloaded automatically).
  """
  if not fs.exists(path) or fs.is_dir(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path!r}. Download {FID_WEIGHTS_FILE} "
        f"(pytorch-fid's FID weights) from {FID_WEIGHTS_URL} and pass its path (local or "
        "gs://); nothing is downloaded automatically.")


def load_fid_inception(path: str | os.PathLike) -> dict:
  """Reads `pt_inception-2015-12-05-6726825d.pth` and converts it (see `convert_state_dict`).

  Args:
    path: the pytorch-fid weights file, a local path or a URL.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `FidInceptionV3().apply`.

  Raises:
    FileNotFoundError: the file does not exist (it is never downloaded automatically).
    ValueError: the file is not a readable state_dict of the FID InceptionV3.
  """
  path = os.fspath(path)
  check_weights_file(path)
  torch = cli.import_torch(f"{path}: reading the .pth weights")  # only this needs torch.
  data = fs.read_bytes(path)
  try:
    state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  # torch reports a foreign or damaged file with many types (UnpicklingError, EOFError,
  # RuntimeError, ...), and advises weights_only=False: unsafe for a file of unknown origin.
  except Exception as e:  # pylint: disable=broad-except
    empty = " (it is empty)" if not data else ""
    raise ValueError(f"{path} is not a PyTorch weights file{empty}: expected pytorch-fid's "
                     f"{FID_WEIGHTS_FILE} (truncated, damaged or another format?)") from e
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
  return convert_state_dict(state_dict)


def _as_numpy(value: object) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; avoids importing torch for numpy inputs.
    value = value.detach().cpu().numpy()
  return np.asarray(value)
