"""The settings of diffusers' `AutoencoderKL`, read from its `config.json`."""
import dataclasses
import json
from typing import Any, Optional

from dit_jax import fs

# Block types this port implements; diffusers' AutoencoderKL uses only these two.
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
# diffusers' get_activation names for SiLU ("swish" is its alias).
SUPPORTED_ACT_FNS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an `AutoencoderKL`; defaults are diffusers' constructor defaults.

  The released Stable Diffusion VAEs used by DiT (sd-vae-ft-ema / sd-vae-ft-mse) have
  block_out_channels (128, 256, 512, 512), layers_per_block 2 and norm_num_groups 32: three
  downsamplings, so latents are [batch, height / 8, width / 8, 4].
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,)
  up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  # DiT multiplies latents by this before diffusion and divides by it before decoding, so
  # that the latents have roughly unit variance.
  scaling_factor: float = 0.18215
  # Subtracted before scaling by newer VAEs (SD3, Flux); None (no shift) for the SD VAE.
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    # Lists from JSON become tuples so that the config stays hashable (a static jit arg).
    object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
    object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    self._validate()

  def _validate(self) -> None:
    levels = len(self.block_out_channels)
    if levels == 0:
      raise ValueError("block_out_channels: must name at least one level")
    for field, expected in (("down_block_types", DOWN_BLOCK_TYPE),
                            ("up_block_types", UP_BLOCK_TYPE)):
      types = getattr(self, field)
      if len(types) != levels:
        raise ValueError(f"{field}: has {len(types)} entries but block_out_channels has "
                         f"{levels}")
      bad = sorted({t for t in types if t != expected})
      if bad:
        raise ValueError(f"{field}: unsupported block type(s) {bad}; only {expected!r} is "
                         "implemented")
    if self.act_fn not in SUPPORTED_ACT_FNS:
      raise ValueError(f"act_fn: unsupported activation {self.act_fn!r}; supported: "
                       f"{list(SUPPORTED_ACT_FNS)}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"norm_num_groups: {self.norm_num_groups} does not divide the "
                         f"block_out_channels entry {c}")
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block: must be >= 1, got {self.layers_per_block}")

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size: 2 ** (levels - 1), 8 for the released SD VAE."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
    """Builds a config from a diffusers config dict; keys that do not shape the network
    (`_class_name`, `force_upcast`, `latents_mean`, ...) are ignored, missing ones default."""
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      raise ValueError(f"_class_name: expected 'AutoencoderKL', got {class_name!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in names}
    if kwargs.get("mid_block_add_attention") is None:
      kwargs.pop("mid_block_add_attention", None)  # diffusers treats null as the default.
    for key, value in kwargs.items():
      _check_type(key, value)
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path: str) -> "VAEConfig":
    """Reads a diffusers `config.json` (a file, or a folder holding one; local or a URL)."""
    if fs.is_dir(path):
      path = fs.join(path, "config.json")
    try:  # json's own message says where in the file, but not which file
      raw = json.loads(fs.read_text(path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
      raise ValueError(f"{path}: expected a JSON object of AutoencoderKL settings, got a "
                       f"{type(raw).__name__}")
    try:
      return cls.from_dict(raw)
    except ValueError as e:  # a setting's own message: name the file too
      raise ValueError(f"{path}: {e}") from e

  def to_dict(self) -> dict[str, Any]:
    """The diffusers `config.json` contents (with `_class_name`)."""
    out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


# The JSON type each setting must have (what `from_dict` is given), by field.
_INT_FIELDS = ("in_channels", "out_channels", "layers_per_block", "latent_channels",
               "norm_num_groups", "sample_size")
_BOOL_FIELDS = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _check_type(key: str, value: Any) -> None:
  """A one-line ValueError naming setting `key` unless `value` has its JSON type."""
  def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

  if key in _INT_FIELDS:
    ok, expected = is_int(value) and value >= 1, "a positive integer"
  elif key in _BOOL_FIELDS:
    ok, expected = isinstance(value, bool), "true or false"
  elif key in ("scaling_factor", "shift_factor"):
    ok = (is_int(value) or isinstance(value, float)) or (key == "shift_factor" and value is None)
    expected = "a number" + (" or null" if key == "shift_factor" else "")
  elif key == "act_fn":
    ok, expected = isinstance(value, str), "a string"
  elif key == "block_out_channels":
    ok = isinstance(value, (list, tuple)) and all(is_int(c) and c >= 1 for c in value)
    expected = "a list of positive integers"
  else:  # the block type lists
    ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value)
    expected = "a list of strings"
  if not ok:
    raise ValueError(f"{key}: expected {expected}, got {json.dumps(value)}")
