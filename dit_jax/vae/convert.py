"""Import (and export) of diffusers `AutoencoderKL` weights: a folder with `config.json` and
`diffusion_pytorch_model.safetensors` (read with numpy, no torch) or `.bin` (torch pickle; torch
is imported only for that).

diffusers -> Flax: conv weight [out, in, kh, kw] -> kernel [kh, kw, in, out]; linear weight
[out, in] -> kernel [in, out]; GroupNorm weight -> scale; `name.N` -> `name_N`. Released files
name the attention projections either `to_q/to_k/to_v/to_out.0` (diffusers >= 0.14) or
`query/key/value/proj_attn` (older), the latter sometimes stored as 1x1 conv weights
[out, in, 1, 1]; all are accepted.
"""
import io
import json
import re
from typing import Any, Callable, Optional

import jax
import numpy as np

from dit_jax import cli, fs, param_tree
from dit_jax.vae.config import VAEConfig
from dit_jax.vae.model import AutoencoderKL
from dit_jax.vae.safetensors import read_safetensors, write_safetensors

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
# Current attention module name -> the name in files saved by diffusers < 0.14.
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                          "to_out.0": "proj_attn"}

Path = param_tree.Path


def torch_key(path: Path) -> str:
  """Flax param path -> diffusers key, e.g. (encoder, down_blocks_0_resnets_1, norm1, scale)
  -> encoder.down_blocks.0.resnets.1.norm1.weight."""
  parts = [re.sub(r"_(\d+)(_|$)", lambda m: "." + m[1] + ("." if m[2] else ""), name)
           for name in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


def _legacy_key(key: str) -> Optional[str]:
  """The pre-0.14 name of an attention projection key, or None for other keys."""
  module, leaf = key.rsplit(".", 1)
  for new, old in LEGACY_ATTENTION_NAMES.items():
    if module.endswith(".attentions.0." + new):
      return f"{module[:-len(new)]}{old}.{leaf}"
  return None


def _layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], Callable, Callable]:
  """(diffusers shape, diffusers->flax, flax->diffusers) for a flax leaf of this shape."""
  if len(shape) == 4:  # conv kernel [kh, kw, in, out] <-> weight [out, in, kh, kw]
    return ((shape[3], shape[2], shape[0], shape[1]),
            lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
  if len(shape) == 2:  # dense kernel [in, out] <-> linear weight [out, in]
    return shape[::-1], lambda a: a.T, lambda a: a.T
  return shape, lambda a: a, lambda a: a


def expected_shapes(config: VAEConfig) -> dict[Path, tuple[int, ...]]:
  """Flax param path -> shape for `config`, from an abstract init (allocates nothing)."""
  model = AutoencoderKL(config)
  size = 2 * config.downsample_factor
  tree = jax.eval_shape(lambda: model.init_params(jax.random.key(0), image_size=size))
  return {path: tuple(leaf.shape) for path, leaf in param_tree.flatten(tree).items()}


def from_diffusers_state_dict(state: dict[str, np.ndarray], config: VAEConfig,
                              source: str = "state_dict") -> dict[str, Any]:
  """diffusers state dict (numpy) -> Flax params (float32 numpy) of `AutoencoderKL(config)`.

  Raises:
    ValueError: one error listing every missing, unexpected and mis-shaped key.
  """
  flat, used = {}, set()
  missing, misshaped = [], []
  for path, shape in expected_shapes(config).items():
    key = torch_key(path)
    torch_shape, to_flax, _ = _layout(shape)
    legacy = _legacy_key(key)
    found = key if key in state else legacy if legacy in state else None
    if found is None:
      missing.append(f"{key} {torch_shape}")
      continue
    used.add(found)
    value = np.asarray(state[found])
    if found == legacy and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # old files kept the attention projections as 1x1 convs.
    if tuple(value.shape) != torch_shape:
      misshaped.append(f"{found}: file has {tuple(state[found].shape)}, model expects "
                       f"{torch_shape}")
      continue
    flat[path] = np.ascontiguousarray(to_flax(value), dtype=np.float32)
  extra = [f"{k} {tuple(np.shape(state[k]))}" for k in sorted(set(state) - used)]
  if missing or extra or misshaped:
    lines = [f"{source}: weights do not match the AutoencoderKL config "
             f"(block_out_channels={list(config.block_out_channels)}, "
             f"layers_per_block={config.layers_per_block})"]
    for title, items in (("missing", missing), ("unexpected", extra),
                         ("wrong shape", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))
  return param_tree.unflatten(flat)


def to_diffusers_state_dict(params: dict[str, Any], config: VAEConfig) -> dict[str, np.ndarray]:
  """Flax params -> a diffusers state dict (current naming, float32 numpy)."""
  expected = expected_shapes(config)
  flat = param_tree.flatten(params)
  if set(flat) != set(expected):
    diff = sorted(set(flat) ^ set(expected))[:5]
    raise ValueError(f"params: tree does not match the config; differing paths {diff}")
  state = {}
  for path, value in flat.items():
    _, _, to_torch = _layout(expected[path])
    state[torch_key(path)] = np.ascontiguousarray(to_torch(np.asarray(value, np.float32)))
  return state


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
  """A torch-pickled state dict (`diffusion_pytorch_model.bin`) -> float32 numpy arrays."""
  # Only .bin files need torch; the released .safetensors files don't.
  torch = cli.import_torch(f"{path}: reading a .bin (torch pickle) file, unlike "
                           f"{SAFETENSORS_NAME},")
  state = torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    out[key] = value.detach().to(torch.float32).numpy()
  return out


def _resolve_folder(folder: str) -> str:
  """The folder holding config.json: `folder` itself or, for a whole pipeline, `folder/vae`."""
  if not fs.exists(fs.join(folder, "config.json")) and fs.exists(
      fs.join(folder, "vae", "config.json")):
    return fs.join(folder, "vae")
  return folder


def load_diffusers_vae(folder: str,
                       variant: Optional[str] = None) -> tuple[VAEConfig, dict[str, Any]]:
  """Reads a diffusers AutoencoderKL folder (as written by `save_pretrained`).

  Args:
    folder: holds `config.json` and `diffusion_pytorch_model[.variant].safetensors` (preferred)
      or `.bin`; a pipeline folder with a `vae/` subfolder works too. A local path or a URL
      (`gs://...`, read through `dit_jax.fs`).
    variant: diffusers' file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.*`.
  Returns:
    (config, params): params are float32 numpy arrays for `AutoencoderKL(config)`.
  """
  folder = _resolve_folder(folder)
  config_path = fs.join(folder, "config.json")
  if not fs.exists(config_path):
    raise FileNotFoundError(f"{folder}: no config.json (not a diffusers model folder)")
  config = VAEConfig.from_json(config_path)
  infix = f".{variant}" if variant else ""
  names = [n.replace(".", f"{infix}.", 1) for n in (SAFETENSORS_NAME, BIN_NAME)]
  for name, reader in zip(names, (read_safetensors, read_torch_bin)):
    path = fs.join(folder, name)
    if fs.exists(path):
      return config, from_diffusers_state_dict(reader(path), config, source=path)
  raise FileNotFoundError(f"{folder}: has neither {names[0]} nor {names[1]}")


def save_diffusers_vae(folder: str, config: VAEConfig, params: dict[str, Any],
                       dtype: str = "F32") -> None:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` that diffusers loads (into a
  local folder or a URL)."""
  fs.write_text(fs.join(folder, "config.json"), json.dumps(config.to_dict(), indent=2))
  write_safetensors(fs.join(folder, SAFETENSORS_NAME),
                    to_diffusers_state_dict(params, config), dtype=dtype)
