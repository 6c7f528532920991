"""The DiT model (Peebles & Xie), its twelve named variants and parameter-layout helpers."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import layers

Dtype = Any

# The paper's model table, defined once: name -> (depth, hidden_size, patch_size, num_heads).
VARIANTS: dict[str, dict[str, int]] = {}
for _size, (_depth, _hidden, _heads) in {
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
  for _patch in (2, 4, 8):
    VARIANTS[f"DiT-{_size}/{_patch}"] = dict(
        depth=_depth, hidden_size=_hidden, patch_size=_patch, num_heads=_heads)

# Logical axis names used by the kernels and (with "batch", and "tokens" for the sequence) by
# the activations' sharding constraints; a config maps each to a mesh axis (or None).
LOGICAL_AXES = ("layers", "embed", "mlp", "qkv", "heads", "adaln", "patch", "out_patch",
                "time_freq", "time_embed", "classes", "bias", "tokens")

# The fields that define a model's parameters and outputs (saved with checkpoints). The
# remaining fields (dtype, scan_blocks, scan_unroll, remat_policy, attention_impl) only change how
# it runs.
ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
               "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma")


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


class DiT(nn.Module):
  """Diffusion Transformer with adaLN-Zero conditioning, NHWC.

  Attributes mirror the official `models.DiT`; in addition:
    dtype: computation dtype (bfloat16 for speed); params stay `param_dtype`. The output is
      always float32 because the diffusion arithmetic that consumes it is.
    scan_blocks: run the blocks under `nn.scan` (one compiled block, compile time independent
      of depth); parameters are then stacked with a leading `depth` axis under `blocks`
      (see `stack_block_params` / `unstack_block_params`).
    scan_unroll: blocks run per iteration of that scan (`nn.scan(unroll=...)`; the parameters
      stay stacked whatever it is). None: `default_scan_unroll` (all of them on CPU, 1
      elsewhere).
    remat_policy: None (no rematerialization) or the name of a `jax.checkpoint_policies`
      entry (e.g. "nothing_saveable" for full remat, "dots_saveable").
    attention_impl: None or "xla" (XLA's fusions, `layers.heads_major_attention`) or "cudnn"
      (`jax.nn.dot_product_attention`'s cuDNN kernel, GPUs only).
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  scan_unroll: Optional[int] = None
  remat_policy: Optional[str] = None
  attention_impl: Optional[str] = None

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def blocks_per_scan_iteration(self) -> int:
    """Blocks run per iteration of the block scan: `scan_unroll`, else `default_scan_unroll`;
    0 when the blocks are not scanned."""
    if not self.scan_blocks:
      return 0
    return self.scan_unroll or default_scan_unroll(self.depth)

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  def arch_config(self) -> dict[str, Any]:
    """The architecture as a JSON-able dict; `DiT(**arch_config())` rebuilds the same model."""
    return {f: getattr(self, f) for f in ARCH_FIELDS}

  def _check_labels(self, y: jax.Array) -> None:
    if _is_concrete(y):
      y = np.asarray(y)
      if y.size and (y.min() < 0 or y.max() > self.num_classes):
        raise ValueError(f"y: labels must lie in [0, num_classes={self.num_classes}] "
                         f"(num_classes is the null class), got range [{y.min()}, {y.max()}]")

  def _check_input(self, x: jax.Array) -> None:
    expected = (self.input_size, self.input_size, self.in_channels)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"x: expected shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                       f"for this DiT, got {list(x.shape)}")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    """Predicts noise (and variance values when learn_sigma).

    Args:
      x: [batch, input_size, input_size, in_channels] noisy latents.
      t: [batch] timesteps (integer or float; the original 0..999 numbers).
      y: [batch] integer class labels in [0, num_classes]; num_classes is the null class.
      train: drop labels to the null class with probability class_dropout_prob (uses the
        `label_dropout` rng stream).
      force_drop_ids: optional [batch] array; 1 forces the null class (as upstream).
    Returns:
      [batch, input_size, input_size, out_channels] float32; the first in_channels channels
      are the noise prediction, the rest (learn_sigma) the variance values in [-1, 1].
    """
    self._check_input(x)
    self._check_labels(y)
    p, hidden = self.patch_size, self.hidden_size
    x = patchify(x.astype(self.dtype), p)
    x = layers.dense(hidden, ("patch", "embed"), "x_embedder", self.dtype, self.param_dtype)(x)
    pos = layers.pos_embed_2d(hidden, self.input_size // p)
    x = x + jnp.asarray(pos, jnp.float32).astype(self.dtype)[None]
    # No-ops outside the train step; there, activations stay sharded over the batch.
    x = nn.with_logical_constraint(x, layers.TOKENS)

    t_emb = layers.TimestepEmbedder(hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="t_embedder")(t)
    y_emb = layers.LabelEmbedder(self.num_classes, hidden, self.class_dropout_prob,
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="y_embedder")(y, train, force_drop_ids)
    c = nn.with_logical_constraint(t_emb + y_emb, ("batch", "embed"))

    x = self._blocks(x, c)
    x = layers.FinalLayer(hidden, p, self.out_channels, self.dtype, self.param_dtype,
                          name="final_layer")(x, c)
    x = nn.with_logical_constraint(x, ("batch", "tokens", "out_patch"))
    return unpatchify(x.astype(jnp.float32), p, self.out_channels)

  def _blocks(self, x: jax.Array, c: jax.Array) -> jax.Array:
    unroll = self.blocks_per_scan_iteration
    block_cls = layers.DiTBlock
    if self.remat_policy is not None:
      policy = getattr(jax.checkpoint_policies, self.remat_policy)
      # A rolled loop's body already keeps XLA from merging the recomputation with the forward.
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=unroll != 1)
    kwargs = dict(hidden_size=self.hidden_size, num_heads=self.num_heads,
                  mlp_ratio=self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype,
                  attention_impl=self.attention_impl)
    # XLA on CPU would recompute the backward's residual chain across straight-line blocks
    # (see `layers.cotangent_fence`); accelerators' fusion heuristics do not, and a conditional
    # on a GPU waits for its predicate on the host.
    cpu = jax.default_backend() == "cpu"
    if self.scan_blocks:
      # Unrolled iterations are straight-line code as well: fenced inside the scanned body.
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,), length=self.depth, unroll=unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      # Explicit names keep parameter paths independent of the remat switch.
      x, _ = scanned(**kwargs, fence=cpu and unroll > 1, name="blocks")(x, c)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**kwargs, name=f"blocks_{i}")(x, c)
        x = layers.cotangent_fence(x) if cpu else x
    return x

  def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float,
                       guidance_channels: Optional[int] = 3) -> jax.Array:
    """Classifier-free guidance on a doubled batch, as the official `forward_with_cfg`.

    The batch holds [conditional; null-label] halves; only the first half of `x` is used and
    fed to both. The guided eps = uncond + scale * (cond - uncond) replaces both halves.
    Args:
      x: [2 * n, H, W, C]; t: [2 * n]; y: [2 * n] (second half usually the null class).
      cfg_scale: guidance scale (1 = no guidance).
      guidance_channels: how many leading channels are guided. 3 reproduces the official
        code exactly (it guides only the first 3 of the 4 latent channels, a quirk kept for the
        published numbers); None guides all in_channels (the standard choice).
    Returns:
      [2 * n, H, W, out_channels] float32; the variance channels come from each half unguided.
    """
    if self.class_dropout_prob <= 0:
      raise ValueError("class_dropout_prob: guidance needs the null class, which a model "
                       "trained with class_dropout_prob=0 does not have")
    if x.shape[0] % 2:
      raise ValueError(f"x: guidance needs an even batch ([cond; uncond]), got {x.shape[0]}")
    channels = self.in_channels if guidance_channels is None else guidance_channels
    if not 0 < channels <= self.in_channels:
      raise ValueError(f"guidance_channels: must be in [1, {self.in_channels}] or None, "
                       f"got {guidance_channels}")
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    eps, rest = out[..., :channels], out[..., channels:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)


def _validate(model: DiT) -> None:
  """Raises ValueError naming the field for configurations that cannot work."""
  for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                "num_heads", "num_classes"):
    value = getattr(model, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{field}: must be a positive integer, got {value!r}")
  if model.hidden_size % model.num_heads:
    raise ValueError(f"hidden_size: {model.hidden_size} is not divisible by num_heads="
                     f"{model.num_heads}")
  if model.hidden_size % 4:
    raise ValueError(f"hidden_size: {model.hidden_size} must be divisible by 4 for the 2-D "
                     "sin-cos position embedding")
  if model.input_size % model.patch_size:
    raise ValueError(f"input_size: {model.input_size} is not divisible by patch_size="
                     f"{model.patch_size}")
  if not 0.0 <= model.class_dropout_prob < 1.0:
    raise ValueError(f"class_dropout_prob: must be in [0, 1), got {model.class_dropout_prob}")
  if model.mlp_ratio <= 0:
    raise ValueError(f"mlp_ratio: must be positive, got {model.mlp_ratio}")
  if model.attention_impl not in (None, "xla", "cudnn"):
    raise ValueError(f"attention_impl: expected None, 'xla' or 'cudnn', got "
                     f"{model.attention_impl!r}")
  if model.scan_unroll is not None and (
      not isinstance(model.scan_unroll, (int, np.integer)) or isinstance(model.scan_unroll, bool)
      or model.scan_unroll <= 0):
    raise ValueError(f"scan_unroll: must be None or a positive integer, got "
                     f"{model.scan_unroll!r}")
  if model.remat_policy is not None and not hasattr(jax.checkpoint_policies,
                                                    model.remat_policy):
    raise ValueError(f"remat_policy: unknown jax.checkpoint_policies entry "
                     f"{model.remat_policy!r}")


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C], tokens row-major, features (row, col, channel).

  Equivalent to the official stride-p conv: its kernel flattened in that feature order.
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, channels: int) -> jax.Array:
  """[N, T, p*p*C] -> [N, H, W, C]; each token's features ordered (row, col, channel)."""
  n, tokens, _ = x.shape
  side = int(round(tokens ** 0.5))
  x = x.reshape(n, side, side, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, side * p, side * p, channels)


def create_model(variant: str, **overrides: Any) -> DiT:
  """Builds a named variant ("DiT-XL/2" or "XL/2"), e.g. create_model("XL/2", input_size=64)."""
  name = variant if variant.startswith("DiT-") else f"DiT-{variant}"
  if name not in VARIANTS:
    raise ValueError(f"variant: unknown DiT variant {variant!r}; known: "
                     f"{', '.join(VARIANTS)}")
  return DiT(**{**VARIANTS[name], **overrides})


def model_from_config(config: dict[str, Any], **runtime: Any) -> DiT:
  """Rebuilds a model from `arch_config()` output (e.g. read back from a checkpoint)."""
  unknown = sorted(set(config) - set(ARCH_FIELDS))
  if unknown:
    raise ValueError(f"model config: unknown key(s) {unknown}; known: {list(ARCH_FIELDS)}")
  return DiT(**config, **runtime)


def stack_block_params(params: dict[str, Any], depth: int) -> dict[str, Any]:
  """Unscanned layout (`blocks_0` ... `blocks_{depth-1}`) -> scanned (`blocks`, leading depth)."""
  params = dict(params)
  blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_block_params(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned layout (`blocks` with a leading depth axis) -> `blocks_0` ... `blocks_{depth-1}`."""
  params = dict(params)
  stacked = params.pop("blocks")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def init_params(model: DiT, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
  """Initial parameters with their logical-axis boxes removed ({"params": ...} contents)."""
  x, t, y = dummy_inputs(model, batch)
  return nn.unbox(model.init(rng, x, t, y))["params"]


def dummy_inputs(model: DiT, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero inputs of the right shapes: x [batch, S, S, C], t [batch], y [batch]."""
  x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
  return x, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32)


_RUNTIME_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config: Any) -> DiT:
  """DiT from a config's `model` section (a ConfigDict or mapping; see configs/imagenet.py).

  Keys: `variant` ("XL/2"), `input_size`, `in_channels`, `num_classes`, `learn_sigma`,
  `class_dropout_prob`, optional architecture overrides (`depth`, `hidden_size`, `num_heads`,
  `patch_size`, `mlp_ratio`; None keeps the variant's value) and the runtime settings `dtype`
  ("float32" / "bfloat16"), `param_dtype`, `scan_blocks` (None: `default_scan_blocks()`),
  `scan_unroll` (None: `default_scan_unroll`), `remat_policy`, `attention_impl`.
  """
  config = dict(config)
  known = set(ARCH_FIELDS) | {"variant", "dtype", "param_dtype", "scan_blocks", "scan_unroll",
                              "remat_policy", "attention_impl"}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"config.model: unknown key(s) {unknown}")
  for key in ("dtype", "param_dtype"):
    if key in config:
      if config[key] not in _RUNTIME_DTYPES:
        raise ValueError(f"config.model.{key}: expected one of {list(_RUNTIME_DTYPES)}, got "
                         f"{config[key]!r}")
      config[key] = _RUNTIME_DTYPES[config[key]]
  if config.get("scan_blocks") is None:
    config["scan_blocks"] = default_scan_blocks()
  variant = config.pop("variant")
  return create_model(variant, **{k: v for k, v in config.items() if v is not None})


def default_scan_blocks(backend: Optional[str] = None) -> bool:
  """The block layout of a config that leaves `model.scan_blocks` None, for `backend` (default:
  JAX's). Unrolled on GPUs: under `nn.scan` every residual the backward needs is written into a
  `[depth, ...]` stack, a third of DiT-XL/2's step on an H100 (unrolled: 1.48x faster, two
  thirds of the memory; benchmarks/README.md). Scanned elsewhere: one compiled block, so compile
  time does not grow with depth (TPUs were not measured)."""
  return (backend or jax.default_backend()) != "gpu"


def default_scan_unroll(depth: int, backend: Optional[str] = None) -> int:
  """Blocks per iteration of the block scan when `model.scan_unroll` is None, for `backend`
  (default: JAX's). All `depth` of them on CPU: XLA's CPU loop writes every residual the
  backward needs into a zero-filled `[depth, ...]` stack and copies each slice out again;
  unrolled, the scan is straight-line code with only the weights sliced out of their stacks
  (DiT-S/2's step: 4.6 img/s against 4.1 rolled and 5.0 for the unrolled layout; compile time
  grows with depth; benchmarks/README.md). 1 elsewhere: one compiled block, compile time
  independent of depth."""
  return depth if (backend or jax.default_backend()) == "cpu" else 1
