r"""Import and export of official PyTorch DiT weights (facebookresearch/DiT).

Accepted inputs: a released plain `state_dict` (e.g. `DiT-XL-2-256x256.pt`) and checkpoints of
the official `train.py` (`{"model", "ema", "opt", "args"}`). torch is needed only here (and
imported lazily), so the rest of dit-jax runs without it.

Command line (writes an orbax checkpoint with the params and the model config):
  python -m dit_jax.convert --torch DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \
      --out checkpoints/dit_xl2_256
and the reverse:
  python -m dit_jax.convert --from-checkpoint checkpoints/dit_xl2_256 --torch-out out.pt
Every path (--torch, --out, --from-checkpoint, --torch-out) may be a gs:// URL.
"""
import io
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import flags

from dit_jax import cli, fs, param_tree
from dit_jax.models import (DiT, abstract_params, create_model, stack_block_params,
                            unstack_block_params)
from dit_jax.models.layers import pos_embed_2d

POS_EMBED_KEY = "pos_embed"

# Flax module names that differ from the official torch module names.
_RENAMES = (
    (re.compile(r"^blocks_(\d+)$"), r"blocks.\1"),
    (re.compile(r"^mlp_(\d+)$"), r"mlp.\1"),
    (re.compile(r"^adaLN_modulation$"), "adaLN_modulation.1"),  # torch: Sequential(SiLU, Linear)
    (re.compile(r"^x_embedder$"), "x_embedder.proj"),
    (re.compile(r"^(kernel|embedding)$"), "weight"),
)


def torch_key(path: tuple[str, ...]) -> str:
  """Flax parameter path (unscanned layout) -> official state_dict key."""
  parts = []
  for name in path:
    for pattern, replacement in _RENAMES:
      if pattern.match(name):
        name = pattern.sub(replacement, name)
        break
    parts.append(name)
  return ".".join(parts)


def _layout(path: tuple[str, ...], shape: tuple[int, ...],
            model: DiT) -> tuple[tuple[int, ...], Callable, Callable]:
  """(torch shape, torch->flax, flax->torch) for one parameter of the given flax shape."""
  identity = lambda a: a  # noqa: E731
  if path[-1] == "kernel" and path[0] == "x_embedder":
    # torch Conv2d weight [D, C, p, p]; ours the same kernel as a [p*p*C, D] Dense.
    p, c, d = model.patch_size, model.in_channels, shape[1]
    return ((d, c, p, p), lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * c, d),
            lambda a: a.reshape(p, p, c, d).transpose(3, 2, 0, 1))
  if path[-1] == "kernel":  # torch Linear weight is [out, in].
    return shape[::-1], lambda a: a.T, lambda a: a.T
  return shape, identity, identity


def _unscanned_model(model: DiT) -> DiT:
  return model.clone(scan_blocks=False, remat_policy=None)


def read_torch_file(path: str, use_ema: bool = True) -> dict[str, np.ndarray]:
  """Reads a released state_dict or an official train.py checkpoint into numpy arrays."""
  import argparse as _argparse  # the train.py checkpoints pickle an argparse.Namespace.
  torch = cli.import_torch("--torch: reading a PyTorch checkpoint")

  if not fs.exists(path) or fs.is_dir(path):
    raise FileNotFoundError(f"--torch: no such file {path}")
  data = fs.read_bytes(path)
  try:
    with torch.serialization.safe_globals([_argparse.Namespace]):
      checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  # torch reports a foreign or damaged file with many types (UnpicklingError, EOFError, KeyError,
  # RuntimeError, ...), and its message advises weights_only=False: unsafe for a file of unknown
  # origin, and never needed for weights. Say what the file is not instead.
  except Exception as e:  # pylint: disable=broad-except
    empty = " (it is empty)" if not data else ""
    raise ValueError(f"--torch: {path} is not a PyTorch checkpoint{empty}: expected a "
                     "state_dict or an official train.py checkpoint saved with torch.save") from e
  if not isinstance(checkpoint, dict):
    raise ValueError(f"{path}: expected a state_dict or a train.py checkpoint dict, got "
                     f"{type(checkpoint).__name__}")
  if "model" in checkpoint and isinstance(checkpoint["model"], dict):  # official train.py
    which = "ema" if use_ema else "model"
    if which not in checkpoint:
      raise ValueError(f"{path}: training checkpoint has no '{which}' entry "
                     f"(has {sorted(checkpoint)})")
    if not isinstance(checkpoint[which], dict):  # a train.py checkpoint holds state_dicts
      raise ValueError(f"--torch: {path}: entry '{which}' is a "
                       f"{type(checkpoint[which]).__name__}, not a state_dict")
    checkpoint = checkpoint[which]
  state = {}
  for key, value in checkpoint.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    state[key] = value.detach().to(torch.float32).numpy()
  # Tolerate wrappers that prefix every key (DistributedDataParallel, torch.compile).
  for prefix in ("module.", "_orig_mod."):
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def from_torch_state_dict(state: dict[str, np.ndarray], model: DiT,
                          source: str = "state_dict") -> dict[str, Any]:
  """Official state_dict (numpy) -> Flax params for `model`; checks every key and shape."""
  expected = param_tree.flatten(abstract_params(_unscanned_model(model)))
  flat, seen = {}, {POS_EMBED_KEY}
  for path, leaf in expected.items():
    key = torch_key(path)
    torch_shape, to_flax, _ = _layout(path, tuple(leaf.shape), model)
    if key not in state:
      raise ValueError(f"{source}: missing key '{key}' (shape {torch_shape}) required by "
                       f"{_name(model)}")
    if tuple(state[key].shape) != torch_shape:
      raise ValueError(f"{source}: key '{key}' has shape {tuple(state[key].shape)} but "
                       f"{_name(model)} expects {torch_shape}")
    flat[path] = np.asarray(to_flax(state[key]), dtype=model.param_dtype)
    seen.add(key)
  extra = sorted(set(state) - seen)
  if extra:
    raise ValueError(f"{source}: unexpected key(s) {extra[:5]} for {_name(model)} "
                     f"({len(extra)} in all)")
  _check_pos_embed(state.get(POS_EMBED_KEY), model, source)
  params = param_tree.unflatten(flat)
  return stack_block_params(params, model.depth) if model.scan_blocks else params


def _check_pos_embed(table: Any, model: DiT, source: str) -> None:
  expected = pos_embed_2d(model.hidden_size, model.input_size // model.patch_size)[None]
  if table is None:
    raise ValueError(f"{source}: missing key '{POS_EMBED_KEY}' (shape {expected.shape})")
  if table.shape != expected.shape:
    raise ValueError(f"{source}: key '{POS_EMBED_KEY}' has shape {table.shape} but "
                     f"{_name(model)} expects {expected.shape} (wrong image size?)")
  if not np.allclose(table, expected, atol=1e-5):
    raise ValueError(f"{source}: '{POS_EMBED_KEY}' is not the fixed 2-D sin-cos table")


def _name(model: DiT) -> str:
  return (f"DiT(depth={model.depth}, hidden={model.hidden_size}, patch={model.patch_size}, "
          f"input={model.input_size})")


def load_torch_checkpoint(path: str, model: DiT, use_ema: bool = True) -> dict[str, Any]:
  """Official PyTorch DiT file -> Flax params for `model` (in its block layout).

  Args:
    path: a released state_dict (`DiT-XL-2-256x256.pt`) or an official train.py checkpoint.
    model: the DiT the weights are for; every key and shape is checked against it.
    use_ema: for train.py checkpoints, take the EMA weights (default) or the raw `model` ones.
  """
  return from_torch_state_dict(read_torch_file(path, use_ema), model, source=path)


def to_torch_state_dict(params: dict[str, Any], model: DiT) -> dict[str, np.ndarray]:
  """Flax params -> the official state_dict layout (numpy float32), including `pos_embed`."""
  if model.scan_blocks or "blocks" in params:
    params = unstack_block_params(params)
  state = {POS_EMBED_KEY: pos_embed_2d(
      model.hidden_size, model.input_size // model.patch_size)[None].astype(np.float32)}
  expected = param_tree.flatten(abstract_params(_unscanned_model(model)))
  flat = param_tree.flatten(params)
  if set(flat) != set(expected):
    diff = sorted(set(flat) ^ set(expected))[:5]
    raise ValueError(f"params: tree does not match {_name(model)}; differing paths {diff}")
  for path, value in flat.items():
    _, _, to_torch = _layout(path, tuple(expected[path].shape), model)
    state[torch_key(path)] = np.ascontiguousarray(to_torch(np.asarray(value, np.float32)))
  return state


def save_torch_checkpoint(params: dict[str, Any], model: DiT, path: str) -> None:
  """Writes a state_dict that the official `DiT.load_state_dict(strict=True)` accepts (to a local
  path or a URL; `fs.write_bytes`: whole or not at all, never over an existing file)."""
  torch = cli.import_torch("--torch-out: writing a PyTorch checkpoint")

  if fs.exists(path):
    raise FileExistsError(f"--torch-out: {path} already exists; refusing to overwrite it")
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params, model).items()}
  buffer = io.BytesIO()
  torch.save(state, buffer)
  fs.write_bytes(path, buffer.getbuffer(), overwrite=False)


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined in `values` (the program's own, see `cli.parse_flags`).

  Their names keep the dashes of the official scripts' flags (`--image-size`); read them as
  `values["image-size"].value`.
  """
  flags.DEFINE_string("torch", None, "official .pt file to import", flag_values=values)
  flags.DEFINE_string("model", None, "variant, e.g. DiT-XL/2", flag_values=values)
  flags.DEFINE_integer("image-size", 256, "pixels (latent = size / 8)", flag_values=values)
  flags.DEFINE_integer("num-classes", 1000, "classes of the class embedding", flag_values=values)
  flags.DEFINE_integer("in-channels", 4, "input channels (4: VAE latents)", flag_values=values)
  flags.DEFINE_bool("no-learn-sigma", False, "the model predicts the noise only (no variance)",
                    flag_values=values)
  for field in ("depth", "hidden-size", "num-heads"):
    flags.DEFINE_integer(field, None, f"override the variant's {field} (custom-size models)",
                         flag_values=values)
  flags.DEFINE_bool("use-model-weights", False,
                    "train.py checkpoints: take 'model' instead of 'ema'", flag_values=values)
  flags.DEFINE_string("out", None, "orbax checkpoint directory to create (must not exist)",
                      flag_values=values)
  flags.DEFINE_string("from-checkpoint", None, "orbax checkpoint directory to export",
                      flag_values=values)
  flags.DEFINE_string("torch-out", None, "state_dict .pt to write (must not exist)",
                      flag_values=values)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line from Python: `argv` (default: sys.argv[1:]), errors as one line."""
  cli.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> None:
  _run(*cli.parse_flags(define_flags, argv, "dit_jax.convert"))


def _run(values: flags.FlagValues, argv: Sequence[str]) -> None:
  from dit_jax import logs  # pylint: disable=import-outside-toplevel
  logs.setup()  # first: orbax's INFO lines stay out
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {list(argv[1:])}")
  flag = {name: values[name].value for name in values}  # by the names typed ("torch-out")
  with cli.user_errors(ValueError, OSError):  # a wrong file, model or path
    _convert(flag)


def _check_direction(flag: dict[str, Any]) -> None:
  """Refuses flags of both directions at once: running only one of them would silently skip
  what the other flags asked for."""
  exporting = [f"--{name}" for name in ("from-checkpoint", "torch-out") if flag[name]]
  importing = [f"--{name}" for name in ("torch", "out") if flag[name]]
  if exporting and importing:
    raise cli.UserError(f"{' '.join(importing)} (import) and {' '.join(exporting)} (export) "
                        "cannot be given together: run the import and the export separately")


def _convert(flag: dict[str, Any]) -> None:
  from dit_jax import checkpoints  # orbax only when writing or reading checkpoints.
  _check_direction(flag)
  if flag["from-checkpoint"]:
    if not flag["torch-out"]:
      raise cli.UserError("--from-checkpoint needs --torch-out")
    cli.check_new_output("--torch-out", flag["torch-out"])
    model, params = checkpoints.load_params(flag["from-checkpoint"])
    save_torch_checkpoint(params, model, flag["torch-out"])
    print(f"wrote {flag['torch-out']}")
    return
  if not (flag["torch"] and flag["model"] and flag["out"]):
    raise cli.UserError("import needs --torch, --model and --out")
  image_size = flag["image-size"]
  if image_size % 8:
    raise cli.UserError(f"--image-size: {image_size} is not a multiple of 8 (the VAE factor)")
  out = fs.absolute(flag["out"])
  if fs.exists(out) and (not fs.is_dir(out) or fs.listdir(out)):
    raise cli.UserError(f"--out: {out} already exists and is not empty; refusing to overwrite it")
  sizes = {name.replace("-", "_"): flag[name] for name in ("depth", "hidden-size", "num-heads")
           if flag[name] is not None}
  model = create_model(flag["model"], input_size=image_size // 8,
                       num_classes=flag["num-classes"], in_channels=flag["in-channels"],
                       learn_sigma=not flag["no-learn-sigma"], **sizes)
  params = load_torch_checkpoint(flag["torch"], model, use_ema=not flag["use-model-weights"])
  checkpoints.save_params(out, params, model, extra_config={
      "source": fs.absolute(flag["torch"]), "variant": flag["model"], "image_size": image_size})
  print(f"wrote {out} ({flag['model']}, {image_size} px)")


if __name__ == "__main__":
  define_flags()
  cli.run_absl(lambda argv: _run(flags.FLAGS, argv))
