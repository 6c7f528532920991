"""Flax Linen port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE that DiT uses), NHWC.

Module and parameter names follow diffusers' (`encoder.down_blocks.0.resnets.0.conv1`,
`decoder.mid_block.attentions.0.to_q`, ...) with `.N` written as `_N`, so that importing
weights is a rename plus a transpose (see `convert.py`).

Only inference is implemented: the VAE is frozen in DiT (images are encoded once, samples are
decoded once), so there is no dropout (diffusers' VAE uses dropout 0) and no training loss.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.noise import standard_normal
from dit_jax.vae.config import VAEConfig

Dtype = Any

# diffusers' AutoencoderKL builds every GroupNorm with eps 1e-6.
NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def group_norm(groups: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
  """torch.nn.GroupNorm(groups, eps=1e-6): stats per group over (H, W, C / groups).

  The two-pass variance (use_fast_variance=False) matches torch's to float32 rounding; the
  one-pass E[x^2] - E[x]^2 loses digits when the mean is large relative to the spread.
  """
  return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
         stride: int = 1, padding: Any = None) -> nn.Conv:
  """A 2-D conv with torch's symmetric `padding = kernel // 2` unless `padding` is given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding; [b, h, w, c_in] -> [b, h, w, c_out].

  norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a 1x1
  `conv_shortcut` when the channel count changes); output_scale_factor is 1.
  """
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(group_norm(self.groups, "norm1", self.dtype, self.param_dtype)(x))
    h = conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(h)
    h = nn.silu(group_norm(self.groups, "norm2", self.dtype, self.param_dtype)(h))
    h = conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.param_dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """The mid block's single-head self-attention over the h * w positions, with a residual.

  GroupNorm -> to_q / to_k / to_v (Linear on channels) -> softmax(q k^T / sqrt(c)) v ->
  to_out.0 -> + input. diffusers builds it with heads = 1 and head_dim = channels.
  """
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, channels] -> same shape."""
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, "group_norm", self.dtype, self.param_dtype)(x)
    h = h.reshape(batch, height * width, channels)

    def dense(name: str) -> nn.Dense:
      return nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    # [batch, tokens, heads=1, channels]; the XLA path takes the softmax in float32, as
    # diffusers does (upcast_softmax).
    q, k, v = (dense(name)(h)[:, :, None, :] for name in ("to_q", "to_k", "to_v"))
    out = jax.nn.dot_product_attention(q, k, v, scale=channels ** -0.5)
    out = dense("to_out_0")(out.reshape(batch, height * width, channels))
    return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D as the VAE uses it: resnet -> (attention) -> resnet."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.groups, self.dtype, self.param_dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, self.param_dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.groups, self.dtype, self.param_dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Image [b, H, W, in_channels] -> moments [b, H/f, W/f, 2 * latent_channels].

  f = 2 ** (levels - 1). Each level: layers_per_block resnets, then (except the last level) a
  Downsample2D that pads one zero row/column at the bottom/right only (torch's F.pad(0, 1, 0,
  1)) and applies a 3x3 stride-2 conv without padding. The asymmetric padding matters: a
  symmetric pad of 1 shifts the sampling grid by one pixel.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    groups = cfg.norm_num_groups
    x = conv(cfg.block_out_channels[0], 3, "conv_in", dt, pdt)(x)
    for i, channels in enumerate(cfg.block_out_channels):
      block = f"down_blocks_{i}"
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(channels, groups, dt, pdt, name=f"{block}_resnets_{j}")(x)
      if i < len(cfg.block_out_channels) - 1:
        x = conv(channels, 3, f"{block}_downsamplers_0_conv", dt, pdt, stride=2,
                 padding=((0, 1), (0, 1)))(x)
    x = MidBlock(groups, cfg.mid_block_add_attention, dt, pdt, name="mid_block")(x)
    x = nn.silu(group_norm(groups, "conv_norm_out", dt, pdt)(x))
    # double_z: the mean and the log-variance of the posterior, concatenated on channels.
    return conv(2 * cfg.latent_channels, 3, "conv_out", dt, pdt)(x)


class Decoder(nn.Module):
  """Latent [b, h, w, latent_channels] -> image [b, h * f, w * f, out_channels].

  Levels run over reversed(block_out_channels), each with layers_per_block + 1 resnets and
  (except the last) an Upsample2D: nearest-neighbour 2x, then a 3x3 conv.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    groups = cfg.norm_num_groups
    channels = tuple(reversed(cfg.block_out_channels))
    x = conv(channels[0], 3, "conv_in", dt, pdt)(z)
    x = MidBlock(groups, cfg.mid_block_add_attention, dt, pdt, name="mid_block")(x)
    for i, out_channels in enumerate(channels):
      block = f"up_blocks_{i}"
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(out_channels, groups, dt, pdt, name=f"{block}_resnets_{j}")(x)
      if i < len(channels) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(nearest, 2x)
        x = conv(out_channels, 3, f"{block}_upsamplers_0_conv", dt, pdt)(x)
    x = nn.silu(group_norm(groups, "conv_norm_out", dt, pdt)(x))
    return conv(cfg.out_channels, 3, "conv_out", dt, pdt)(x)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1).

  Args:
    mean, logvar: [batch, h, w, latent_channels] from `AutoencoderKL.encode`.
    rng: a PRNG key.
  Returns:
    [batch, h, w, latent_channels] float32.
  """
  noise = standard_normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: `encode` (posterior moments) and `decode`, NHWC.

  Attributes:
    config: the architecture (`VAEConfig.from_json` reads diffusers' config.json).
    dtype: computation dtype (bfloat16 for speed); params stay `param_dtype`. Outputs are
      float32 either way, since the diffusion arithmetic that consumes them is.

  Apply with `method=` for the parts, or use the `encode_to_latents` / `decode_latents`
  helpers (called on the unbound module with explicit params; both are jit-friendly):
    vae = AutoencoderKL(config)
    latents = jax.jit(vae.encode_to_latents)(params, images, rng)
    images = jax.jit(vae.decode_latents)(params, latents)
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    self.encoder = Encoder(cfg, dt, pdt)
    self.decoder = Decoder(cfg, dt, pdt)
    moments = 2 * cfg.latent_channels
    self.quant_conv = conv(moments, 1, "quant_conv", dt, pdt) if cfg.use_quant_conv else None
    self.post_quant_conv = (conv(cfg.latent_channels, 1, "post_quant_conv", dt, pdt)
                            if cfg.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior moments of images.

    Args:
      x: [batch, height, width, in_channels] in [-1, 1].
    Returns:
      (mean, logvar), each [batch, height / f, width / f, latent_channels] float32, where
      f = `config.downsample_factor` (8 for the released SD VAE); logvar clamped to
      [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f"encode: expected [batch, height, width, {self.config.in_channels}] "
                       f"images, got shape {x.shape}")
    moments = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (unscaled) [batch, h, w, latent_channels] -> images [batch, h*f, w*f, out]."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"decode: expected [batch, h, w, {self.config.latent_channels}] "
                       f"latents, got shape {z.shape}")
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Reconstruction: decode(posterior sample), or decode(mean) when rng is None."""
    mean, logvar = self.encode(x)
    return self.decode(mean if rng is None else sample_latent(mean, logvar, rng))

  @nn.nowrap
  def init_params(self, rng: jax.Array, image_size: Optional[int] = None) -> dict[str, Any]:
    """Randomly initialized params (shapes only matter; real weights come from convert.py)."""
    size = image_size or self.config.sample_size
    x = jnp.zeros((1, size, size, self.config.in_channels), jnp.float32)
    return self.init(rng, x)["params"]

  @nn.nowrap
  def encode_to_latents(self, params: Any, x: jax.Array, rng: jax.Array) -> jax.Array:
    """Images [b, H, W, 3] in [-1, 1] -> the diffusion model's latents [b, H/f, W/f, c]:
    a posterior sample, shifted (if the config has a shift) and times `scaling_factor`."""
    mean, logvar = self.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = sample_latent(mean, logvar, rng)
    if self.config.shift_factor is not None:
      z = z - self.config.shift_factor
    return z * self.config.scaling_factor

  @nn.nowrap
  def decode_latents(self, params: Any, latents: jax.Array) -> jax.Array:
    """The inverse scaling of `encode_to_latents`, then decode: -> images [b, H, W, 3]."""
    z = latents / self.config.scaling_factor
    if self.config.shift_factor is not None:
      z = z + self.config.shift_factor
    return self.apply({"params": params}, z, method=AutoencoderKL.decode)
