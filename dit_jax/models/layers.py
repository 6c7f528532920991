"""Building blocks of DiT: embedders, the adaLN-Zero transformer block and the final layer.

Every kernel carries logical axis names (see `LOGICAL_AXES` in `dit.py`) so that a config can
map them to mesh axes for data-parallel, FSDP or tensor sharding. Parameter names follow the
official PyTorch module names (`attn.qkv`, `mlp.fc1`, `adaLN_modulation`, ...) so that weight
conversion is a rename plus a transpose.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The official code initializes every Linear with xavier-uniform and a zero bias; flax's
# xavier_uniform on a [fan_in, fan_out] kernel is the same distribution as torch's on [out, in].
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
normal_002 = nn.initializers.normal(stddev=0.02)

# Rng stream used by classifier-free-guidance label dropout during training.
LABEL_DROPOUT_RNG = "label_dropout"

# Logical axes of the residual stream [batch, tokens, hidden]: `nn.with_logical_constraint`
# keeps it sharded by the config's rules inside the train step (dit_jax/train/sharding.py);
# anywhere else (no rules in context) the constraints do nothing.
TOKENS = ("batch", "tokens", "embed")


class Dense(nn.Dense):
  """`nn.Dense` that multiplies a 2-D `[rows, in]` matrix, whatever the input's rank.

  Same parameters and numbers as `nn.Dense`. Folding the leading axes before the matmul keeps
  the backward's weight gradient a plain 2-D matmul: with a 3-D input, XLA on CPU contracts two
  axes and first copies a transposed activation (the unrolled DiT-S/2 train step ran 1.8x
  slower; benchmarks/README.md). On accelerators the reshape is free.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Output axes that the `tensor` mesh axis splits. Their layers' biases are named "bias" instead:
# too small to gain from being split like the output, they are sharded over `fsdp` (a multiple
# of the hidden size divides wherever `embed` does), so no parameter is whole on every device.
TENSOR_SPLIT = ("mlp", "qkv", "adaln")


def dense(features: int, axes: tuple[str, str], name: str, dtype: Dtype, param_dtype: Dtype,
          kernel_init=xavier_uniform) -> nn.Dense:
  """A Dense whose kernel `[in, out]` carries logical axis names `axes`, its bias `[out]` the
  output's name (or "bias", see TENSOR_SPLIT)."""
  bias_axes = ("bias",) if axes[1] in TENSOR_SPLIT else axes[1:]
  return Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(zeros, bias_axes))


def layer_norm(dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm without scale/bias, eps 1e-6; exact two-pass variance like torch."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, use_fast_variance=False,
                      dtype=dtype, name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation. x: [batch, tokens, hidden]; shift, scale: [batch, hidden]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of (possibly fractional) timesteps, ordered [cos, sin] as upstream.

  Args:
    t: [batch] raw timestep numbers (0..999 for the 1000-step process).
  Returns:
    [batch, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table [grid_size**2, embed_dim], computed in float64.

  Tokens are row-major. The first half of the channels encodes the column (x) index and the
  second half the row (y) index, as in the official table (MAE's get_2d_sincos_pos_embed).
  """
  coords = np.arange(grid_size, dtype=np.float64)
  cols, rows = np.meshgrid(coords, coords)  # cols varies along a row: row-major tokens.

  def encode_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([encode_1d(cols, embed_dim // 2), encode_1d(rows, embed_dim // 2)], axis=1)


class TimestepEmbedder(nn.Module):
  """Timestep t -> [batch, hidden]: sinusoid(256) -> Linear -> SiLU -> Linear."""
  hidden_size: int
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    x = timestep_features(t, self.frequency_embedding_size).astype(self.dtype)
    x = dense(self.hidden_size, ("time_freq", "time_embed"), "mlp_0", self.dtype,
              self.param_dtype, kernel_init=normal_002)(x)
    x = nn.silu(x)
    return dense(self.hidden_size, ("time_embed", "embed"), "mlp_2", self.dtype,
                 self.param_dtype, kernel_init=normal_002)(x)


class LabelEmbedder(nn.Module):
  """Class labels -> [batch, hidden], with label dropout for classifier-free guidance.

  The table has num_classes + 1 rows when dropout is enabled; row num_classes is the null
  class. In training each label becomes the null class with probability `dropout_prob`.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array, train: bool,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    use_cfg_embedding = int(self.dropout_prob > 0)
    table = nn.Embed(self.num_classes + use_cfg_embedding, self.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embedding_table",
                     embedding_init=nn.with_logical_partitioning(normal_002, ("classes", "embed")))
    if (train and self.dropout_prob > 0) or force_drop_ids is not None:
      if force_drop_ids is None:
        rng = self.make_rng(LABEL_DROPOUT_RNG)
        drop = jax.random.uniform(rng, labels.shape) < self.dropout_prob
      else:
        drop = force_drop_ids == 1
      labels = jnp.where(drop, self.num_classes, labels)
    return table(labels)


@jax.custom_vjp
def cotangent_fence(x: jax.Array) -> jax.Array:
  """The identity, whose backward hands the cotangent on as a buffer of its own.

  Between unrolled blocks: the residual stream's cotangent is a chain of elementwise sums
  across all the blocks, and XLA on CPU fused that chain into each consumer, recomputing it
  from the last block every time (fusions of 100+ operands, work quadratic in depth). A
  conditional's result is a buffer that no fusion crosses. Used on CPU only (see `DiT`).
  """
  return x


def _fence_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return x, jnp.isfinite(x.reshape(-1)[0])  # a predicate XLA cannot fold away


def _fence_bwd(predicate: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (jax.lax.cond(predicate, lambda g: g, lambda g: g * 1, g),)


cotangent_fence.defvjp(_fence_fwd, _fence_bwd)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """`jax.nn.softmax` over the last axis (the same forward), whose backward keeps only the
  probabilities: d logits = p * (g - sum(g * p)).

  Differentiated as is, jax's softmax kept more of its forward for the backward, which XLA on
  CPU read back in wide fusions of several [batch, heads, tokens, tokens] arrays per block;
  this backward reads the probabilities and the cotangent. DiT-S/2's train step on CPU: 4%
  faster unrolled, 2% scanned (benchmarks/README.md).
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  probs = jax.nn.softmax(x, axis=-1)
  return probs, probs


def _softmax_bwd(probs: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v over float32 [batch, heads, tokens, head_dim] operands (q pre-scaled):
  the forward of `heads_major_attention` (the same bits), with a backward shaped for XLA on CPU.

  Differentiated as written, the gradients of k and v are products that contract the query
  axis, the leading axis of both their operands; XLA's CPU dot runs that form at half the rate
  of the others. This backward computes their transposes instead, [..., head_dim, tokens],
  whose first operand (q or the output's cotangent) contracts its leading axis and the second
  (the probabilities or their cotangent) its rows: a form XLA's own dot runs on every core. A
  barrier keeps them so: transposed back, XLA would fold the transpose into the dot and restore
  the slow form. DiT-S/2's train step on CPU: 2% faster (benchmarks/README.md).
  """
  return jnp.einsum("bnqk,bnkh->bnqh", softmax(jnp.einsum("bnqh,bnkh->bnqk", q, k)), v)


def _cpu_attention_fwd(q, k, v):
  probs = jax.nn.softmax(jnp.einsum("bnqh,bnkh->bnqk", q, k), axis=-1)
  return jnp.einsum("bnqk,bnkh->bnqh", probs, v), (q, k, v, probs)


def _cpu_attention_bwd(residuals, g):
  q, k, v, probs = residuals
  dprobs = jnp.einsum("bnqh,bnkh->bnqk", g, v)
  dlogits = _softmax_bwd(probs, dprobs)[0]
  dq = jnp.einsum("bnqk,bnkh->bnqh", dlogits, k)
  dk_t = jnp.einsum("bnqh,bnqk->bnhk", q, dlogits)
  dv_t = jnp.einsum("bnqh,bnqk->bnhk", g, probs)
  dk_t, dv_t = jax.lax.optimization_barrier((dk_t, dv_t))
  return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


def heads_major_attention(qkv: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v from qkv [batch, tokens, 3, heads, head_dim] -> [batch, tokens,
  heads, head_dim].

  The arithmetic of `jax.nn.dot_product_attention`'s XLA path (logits and softmax in float32,
  probabilities cast back to the value dtype; the same numbers up to the summation order of the
  CPU's kernels: bit-identical on one x86 CPU, float32 roundings apart on another, equally
  accurate against float64, tested), with q, k and v moved heads-major
  first so that both products are plain batched matmuls over (batch, heads): its token-major
  einsums made XLA on CPU run them 1.9x slower forward, 1.5x with the backward
  (benchmarks/README.md). The softmax's backward keeps only the probabilities (`softmax`); on
  CPU, float32 with a power-of-two scale, the backward is `cpu_attention`'s.
  """
  q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # each [batch, heads, tokens, head_dim]
  # A power-of-two scale (head_dim 64: S, B and L) multiplies q exactly, so q is scaled, not
  # the logits: the same numbers from tokens/head_dim times fewer multiplications, and on CPU
  # no [batch, heads, tokens, tokens] broadcast of the scale materialized for YNNPACK's fusion
  # (attention forward+backward of S/2 at batch 8: 8% faster). Any other scale is applied to
  # the logits, as jax does.
  scale_q = math.frexp(scale)[0] == 0.5
  if scale_q:
    q = q * jnp.array(scale, q.dtype)
    if q.dtype == jnp.float32 and jax.default_backend() == "cpu":
      return jnp.moveaxis(cpu_attention(q, k, v), 1, 2)
  # As jax: with bf16/f16 inputs the logits are accumulated in float32.
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(q.dtype)
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, precision=precision,
                      preferred_element_type=logits_dtype)
  if not scale_q:
    logits = logits * jnp.array(scale, logits_dtype)
  probs = softmax(logits.astype(jnp.float32)).astype(k.dtype)
  return jnp.moveaxis(jnp.einsum("bnqk,bnkh->bnqh", probs, v), 1, 2)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection split as (3, heads, head_dim).

  `implementation`: None or "xla" computes it with `heads_major_attention` (XLA's own fusions);
  "cudnn" calls `jax.nn.dot_product_attention`'s cuDNN kernel (GPUs only).
  """
  hidden_size: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, tokens, hidden] -> [batch, tokens, hidden]."""
    batch, tokens, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    qkv = dense(3 * self.hidden_size, ("embed", "qkv"), "qkv", self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    if self.implementation == "cudnn":
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
      out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, implementation="cudnn")
    else:
      out = heads_major_attention(qkv, head_dim ** -0.5)
    out = out.reshape(batch, tokens, self.hidden_size)
    return dense(self.hidden_size, ("heads", "embed"), "proj", self.dtype, self.param_dtype)(out)


class Mlp(nn.Module):
  """Linear(D -> mlp_dim) -> GELU(tanh) -> Linear(mlp_dim -> D)."""
  hidden_size: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.mlp_dim, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
    x = nn.gelu(nn.with_logical_constraint(x, ("batch", "tokens", "mlp")), approximate=True)
    return dense(self.hidden_size, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(x)


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning.

  The modulation Linear is zero-initialized (the "Zero" of adaLN-Zero): every gate starts at
  zero, so each block starts as the identity and the network as a whole outputs zeros.
  The signature (carry, c) -> (carry, None) lets the same module run under `nn.scan`;
  `fence` passes the output through `cotangent_fence` (unrolled scans on CPU).
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  fence: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, None]:
    """x: [batch, tokens, hidden]; c: [batch, hidden] conditioning."""
    x = nn.with_logical_constraint(x, TOKENS)
    mod = dense(6 * self.hidden_size, ("embed", "adaln"), "adaLN_modulation", self.dtype,
                self.param_dtype, kernel_init=zeros)(nn.silu(c))
    # Upstream chunk order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    attn = Attention(self.hidden_size, self.num_heads, self.dtype, self.param_dtype,
                     self.attention_impl, name="attn")
    h = modulate(layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
    x = x + gate_msa[:, None, :] * nn.with_logical_constraint(attn(h), TOKENS)
    mlp = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), self.dtype,
              self.param_dtype, name="mlp")
    h = modulate(layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
    x = x + gate_mlp[:, None, :] * mlp(h)
    x = nn.with_logical_constraint(x, TOKENS)
    return (cotangent_fence(x) if self.fence else x), None


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> LayerNorm -> Linear(D -> p*p*C_out); all zero-initialized."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x: [batch, tokens, hidden] -> [batch, tokens, patch*patch*out_channels]."""
    mod = dense(2 * self.hidden_size, ("embed", "adaln"), "adaLN_modulation", self.dtype,
                self.param_dtype, kernel_init=zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(layer_norm(self.dtype, "norm_final")(x), shift, scale)
    features = self.patch_size * self.patch_size * self.out_channels
    return dense(features, ("embed", "out_patch"), "linear", self.dtype, self.param_dtype,
                 kernel_init=zeros)(x)
