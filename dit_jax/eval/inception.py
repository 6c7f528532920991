"""The FID InceptionV3 (pytorch-fid's network) in Flax Linen: pool3, logits and sFID features.

This is the network behind the standard FID weights `pt_inception-2015-12-05-6726825d.pth`:
torchvision's Inception v3 layout with pytorch-fid's `FIDInceptionA/C/E_1/E_2` blocks, which
reproduce TensorFlow's 2015 Inception graph (`classify_image_graph_def.pb`) that FID, sFID, IS
and precision/recall were defined with. The differences from torchvision's ImageNet network:

* the average pooling in the pool branch of Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b
  (E_1) ignores the zero padding (`count_include_pad=False`), as TF's `AvgPool` does;
* Mixed_7c (E_2) max-pools in its pool branch (a quirk of the TF graph);
* the classifier has 1008 classes (TF's label map) and no dropout.

Every conv is `BasicConv2d`: conv without bias, BatchNorm (eps 0.001, running statistics),
ReLU. Input handling follows pytorch-fid: images in [0, 1] are resized to 299x299 with torch's
`F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing, see
`resize_bilinear`), then mapped to [-1, 1].

Outputs of one forward pass (`FidInceptionV3.__call__`):

* `pool3` `[N, 2048]`: the global average pool after Mixed_7c (TF `pool_3:0`), for FID and
  precision/recall.
* `logits` `[N, 1008]`: `fc(pool3)`, TF `softmax/logits`.
* `logits_unbiased` `[N, 1008]`: `pool3 @ fc.weight^T` without the bias. ADM's evaluator (and
  torch-fidelity) compute the Inception Score from this: it imports `softmax/logits/MatMul`
  and applies softmax to `pool3 @ w`, leaving the bias out.
* `spatial` `[N, 17 * 17 * 7]`: ADM's sFID feature `mixed_6/conv:0[..., :7]`, flattened in
  NHWC order as ADM does (see `FidInceptionV3`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299  # Input resolution the network (and the FID definition) expects.
NUM_CLASSES = 1008  # TF's 2015 label map: 1000 ImageNet classes plus padding entries.
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv.
SPATIAL_SIZE = 17  # Mixed_6d's feature map is 17x17 at 299x299 input.
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS
_BN_EPS = 1e-3  # torchvision's BasicConv2d (and TF's graph) use 0.001, not PyTorch's 1e-5.
# The features define a metric: they must not depend on the backend's default matmul precision
# (TF32 on GPUs, bf16 passes on TPUs), so every conv and matmul runs at full float32.
_HIGHEST = jax.lax.Precision.HIGHEST


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Interpolation weights `[out_size, in_size]` of torch's bilinear resize along one axis.

  Mirrors `upsample_bilinear2d` with `align_corners=False` and no antialiasing: the source
  coordinate of output pixel `i` is `(i + 0.5) * in / out - 0.5`, clamped at 0, and the output
  blends the two neighbouring input pixels (the upper one clamped at the border). torch computes
  this in float32 for float32 inputs, and its compiled kernel fuses `scale * (i + 0.5) - 0.5`
  into one FMA (a single rounding). At source coordinates of a few hundred one float32 ulp is
  ~3e-5, which moves outputs by up to ~1e-5 when downsampling, so the weights reproduce that:
  the product of two float32 numbers is exact in float64, leaving one rounding to float32.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float64)
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  lo = np.minimum(src.astype(np.int64), in_size - 1)  # Truncation == floor since src >= 0.
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  # add.at: at the last input pixel lo == hi and the two weights must add up, not overwrite.
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch's `F.interpolate(x, size, mode="bilinear", align_corners=False)`, in NHWC.

  `jax.image.resize(method="bilinear")` antialiases when downsampling (a wider, scaled
  triangle kernel), which torch does not do by default, so large images would get different
  (smoother) FID features. Bilinear resizing is separable: one small interpolation matrix per
  axis, applied as two matmuls.

  Args:
    images: `[batch, height, width, channels]`, any float dtype.
    size: `(out_height, out_width)`.

  Returns:
    `[batch, out_height, out_width, channels]` float32.
  """
  images = jnp.asarray(images, jnp.float32)
  _, height, width, _ = images.shape
  mat_h = jnp.asarray(_bilinear_matrix(height, size[0]))
  mat_w = jnp.asarray(_bilinear_matrix(width, size[1]))
  out = jnp.einsum("oh,nhwc->nowc", mat_h, images, precision=_HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mat_w, out, precision=_HIGHEST)


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm with running statistics (eps 0.001) + ReLU.

  Attributes:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: `(sh, sw)`.
    padding: symmetric zero padding `(ph, pw)`, as torch's `padding=(ph, pw)`.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, H, W, C_in]` -> `[N, H', W', features]`."""
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False, precision=_HIGHEST,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # count_include_pad=False: border outputs average only the real pixels (TF's AvgPool); the
  # FID blocks differ from torchvision's here.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b..5d, 35x35): 1x1 | 5x5 | double 3x3 | avg-pool branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, 35, 35, C]` -> `[N, 35, 35, 224 + pool_features]`."""
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a): grid reduction 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, 35, 35, C]` -> `[N, 17, 17, 480 + C]`."""
    b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..6e, 17x17): 1x1 | 7x7 | double 7x7 | avg-pool branches.

  The first 192 output channels are `branch1x1`: TF's `mixed_k/conv`.
  """
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, 17, 17, 768]` -> `[N, 17, 17, 768]`."""
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a): grid reduction 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, 17, 17, 768]` -> `[N, 8, 8, 1280]`."""
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, `pool="avg"`) and FIDInceptionE_2 (Mixed_7c, `pool="max"`).

  Attributes:
    pool: "avg" (count_include_pad=False) or "max" (3x3, stride 1, padding 1; the padding is
      -inf, as in torch's max_pool2d) for the pool branch.
  """
  pool: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, 8, 8, C]` -> `[N, 8, 8, 2048]`."""
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Classifier(nn.Module):
  """torch's `fc` (Linear 2048 -> 1008) that also returns its output without the bias."""
  num_classes: int

  @nn.compact
  def __call__(self, pool3: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (pool3.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,))
    unbiased = jnp.dot(pool3, kernel, precision=_HIGHEST)
    return unbiased + bias, unbiased


class FidInceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3, returning pool3, logits and ADM's sFID features.

  Submodule names follow the PyTorch state_dict (`Mixed_6d.branch1x1.conv`, ...) so that
  `dit_jax.eval.inception_convert` maps keys one to one.

  Which tensor is ADM's `mixed_6/conv:0`: the TF graph names its inception blocks `mixed`,
  `mixed_1`, ..., `mixed_10`. `mixed`..`mixed_2` are the three 35x35 blocks (Mixed_5b..5d),
  `mixed_3` the 35->17 reduction (Mixed_6a), `mixed_4`..`mixed_7` the four 17x17 blocks
  (Mixed_6b..6e), `mixed_8` the 17->8 reduction (Mixed_7a), `mixed_9`/`mixed_10` the 8x8
  blocks (Mixed_7b/7c). So `mixed_6` is Mixed_6d. Inside a block, the graph names the
  un-towered 1x1 branch `conv` and the other branches `tower/conv`, `tower_1/conv_k`,
  `tower_2/{pool,conv}`; the conversion behind the FID weights (torch-fidelity's and
  pytorch-fid's TF-to-PyTorch maps) sends `mixed_6/conv/conv2d_params` and
  `mixed_6/conv/batchnorm` to `Mixed_6d.branch1x1.{conv,bn}`. The node named `mixed_6/conv`
  itself is the layer's output: the ReLU after `mixed_6/conv/Conv2D` and the
  `mixed_6/conv/batchnorm` op. Hence `mixed_6/conv:0` is `Mixed_6d.branch1x1`'s output after
  BN and ReLU, `[N, 17, 17, 192]`. Since InceptionC concatenates `branch1x1` first, its first 7
  channels are also the first 7 channels of Mixed_6d's output, which is what is sliced here.
  ADM flattens the NHWC tensor, so the feature order is (row, column, channel); the order does
  not change a Fréchet distance, but it keeps the vectors identical to ADM's.
  """

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Runs the network on images in [0, 1].

    Args:
      images: `[batch, height, width, 3]` RGB in [0, 1] (uint8 images divided by 255, as
        pytorch-fid's `ToTensor` does); any size, resized to 299x299 here.

    Returns:
      `{"pool3": [batch, 2048], "logits": [batch, 1008], "logits_unbiased": [batch, 1008],
      "spatial": [batch, 17 * 17 * 7]}`, float32.
    """
    x = resize_bilinear(images, (INCEPTION_SIZE, INCEPTION_SIZE))
    x = 2.0 * x - 1.0  # pytorch-fid's normalize_input: [0, 1] -> [-1, 1].
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149x149
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 73x73
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 35x35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17x17
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    # TF mixed_6/conv = Mixed_6d.branch1x1 = the first 192 channels of Mixed_6d's output.
    spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)); TF pool_3.
    logits, logits_unbiased = _Classifier(NUM_CLASSES, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased,
            "spatial": spatial}


@jax.jit
def _forward(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
  """The network on float images in [0, 1]. One jitted function for the module, so that every
  call of `inception_features` with the same batch shape reuses its compiled program.
  `variables` are an argument, not closed over: a closure would bake ~95 MB of weights into
  the compiled program as constants."""
  return FidInceptionV3().apply(variables, images)


def inception_features(variables: Mapping[str, Any], batches: Iterable[np.ndarray],
                       batch_size: int = 250) -> dict[str, np.ndarray]:
  """Runs the network over uint8 image batches and gathers every output on the host.

  Batches are cut or padded to `batch_size` so that one compiled program serves them all.

  Args:
    variables: `{"params", "batch_stats"}`, e.g. from `inception_convert.load_fid_inception`.
    batches: iterable of uint8 `[n, height, width, 3]` arrays (one size throughout).
    batch_size: images per forward pass.

  Returns:
    The outputs of `FidInceptionV3` for all images, concatenated: `pool3 [N, 2048]`,
    `logits [N, 1008]`, `logits_unbiased [N, 1008]`, `spatial [N, 2023]` (float32 numpy).
  """
  outputs: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
      raise ValueError(f"images must be uint8 in [0, 255], got {batch.dtype}")
    for start in range(0, len(batch), batch_size):
      chunk = batch[start:start + batch_size]
      count = len(chunk)
      if count < batch_size:  # Pad the tail instead of compiling a second shape.
        pad = np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      result = _forward(variables, jnp.asarray(chunk, jnp.float32) / 255.0)
      for name, value in result.items():
        outputs.setdefault(name, []).append(np.asarray(value)[:count])
  if not outputs:
    raise ValueError("no images were given")
  return {name: np.concatenate(values) for name, values in outputs.items()}
