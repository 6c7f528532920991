"""The official PyTorch DiT model (facebookresearch/DiT `models.py`), ported for this project.

Same constructor arguments, module and state_dict names and shapes as the official `DiT`, so an
official checkpoint loads with `strict=True`; timm's PatchEmbed, Attention and Mlp inlined.
NCHW, as the official code. The baseline model of `benchmarks.torch_reference`; checked against
the official reference fixture by tests/test_torch_reference.py.
"""
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_jax.models.dit import VARIANTS
from dit_jax.models.layers import pos_embed_2d

ATTENTION = ("fused", "explicit")  # F.scaled_dot_product_attention (timm's default) or softmax

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """adaLN modulation. x: [batch, tokens, hidden]; shift, scale: [batch, hidden]."""
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
  """timm's PatchEmbed: a stride-p conv, [N, C, H, W] -> [N, tokens, hidden] row-major."""

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
  """t -> 256 sinusoidal features ordered [cos, sin] -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
    super().__init__()
    self.frequency_embedding_size = frequency_embedding_size
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
  """Labels -> [batch, hidden]; row num_classes is the null class, each label dropped to it with
  probability dropout_prob in training (classifier-free guidance)."""

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
    self.num_classes, self.dropout_prob = num_classes, dropout_prob

  def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
    if train and self.dropout_prob > 0:
      drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
      labels = torch.where(drop, self.num_classes, labels)
    return self.embedding_table(labels)


class Attention(nn.Module):
  """timm's Attention (qkv_bias=True): fused qkv split as (3, heads, head_dim)."""

  def __init__(self, dim: int, num_heads: int, fused: bool = True):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.fused = fused
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [batch, heads, tokens, head_dim]
    if self.fused:
      x = F.scaled_dot_product_attention(q, k, v)
    else:
      x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  """timm's Mlp with DiT's GELU (tanh approximation)."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
  """adaLN-Zero block: (shift, scale, gate) for attention and for the MLP from c."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, fused: bool):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads, fused)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
        self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
  def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """The official `models.DiT` (same arguments, parameter names and shapes; NCHW), with the
  attention computed fused (`attention="fused"`, timm's default) or as an explicit softmax."""

  def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
               num_classes: int = 1000, learn_sigma: bool = True, attention: str = "fused"):
    super().__init__()
    if attention not in ATTENTION:
      raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
    self.input_size, self.in_channels = input_size, in_channels
    self.out_channels = in_channels * 2 if learn_sigma else in_channels
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    # The fixed sin-cos table: a Parameter (the official state_dict key) that is not trained.
    table = pos_embed_2d(hidden_size, input_size // patch_size)
    self.pos_embed = nn.Parameter(torch.from_numpy(table).float().unsqueeze(0),
                                  requires_grad=False)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attention == "fused")
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
    self.initialize_weights()

  def initialize_weights(self) -> None:
    """Official init: xavier Linears (and the flattened patch conv), normal(0.02) embeddings,
    zero adaLN and output layers (adaLN-Zero: the initial model outputs zeros)."""
    for module in self.modules():
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    w = self.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.zeros_(self.x_embedder.proj.bias)
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
        self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)

  def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
    """[N, tokens, p*p*C] -> [N, C, H, W]; each token's features ordered (row, col, channel)."""
    c, p = self.out_channels, self.x_embedder.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W], t [N] (original step numbers), y [N] -> [N, out_channels, H, W]."""
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y, self.training)
    for block in self.blocks:
      x = block(x, c)
    return self.unpatchify(self.final_layer(x, c))

  def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       cfg_scale: float) -> torch.Tensor:
    """Guidance on a [cond; uncond] batch: the first half of x is fed to both halves; the guided
    eps replaces both, for the first 3 channels only (the official quirk)."""
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def create_model(variant: str, attention: str = "fused", **overrides: Any) -> DiT:
  """A named variant ("S/2" or "DiT-S/2") at 256 px, 1000 classes unless overridden."""
  name = variant if variant.startswith("DiT-") else f"DiT-{variant}"
  if name not in VARIANTS:
    raise ValueError(f"variant: unknown DiT variant {variant!r}; known: {', '.join(VARIANTS)}")
  return DiT(**{**VARIANTS[name], **overrides}, attention=attention)
