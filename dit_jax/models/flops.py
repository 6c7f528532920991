"""Parameter counts and forward cost of DiT models, without materializing weights.

`python -m dit_jax.models` prints the variant table that README shows.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.dit import DiT, VARIANTS, create_model, dummy_inputs


def abstract_params(model: DiT, boxed: bool = False) -> Any:
  """Parameter shapes ({"params": ...} contents) via `jax.eval_shape`: nothing is allocated.

  With boxed=True the leaves keep their `nn.LogicallyPartitioned` logical-axis metadata
  (what `nn.get_partition_spec` needs to derive shardings).
  """
  x, t, y = dummy_inputs(model, 1)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  return params if boxed else nn.unbox(params)


def count_params(model: DiT) -> int:
  """Trainable parameters (the fixed position table is a constant, not a parameter)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(model))))


def gflops(model: DiT, batch: int = 2) -> float:
  """Forward multiply-accumulates per image, in G, the paper's "Gflops" convention.

  Taken from XLA's cost analysis of the lowered forward pass (abstract inputs, so no weights
  are allocated and nothing runs). XLA counts a multiply-accumulate as 2 flops; the paper
  counts it as one, hence the division by 2. Elementwise work (norms, softmax, GELU) is
  included by XLA but is well under 1% of the total for every variant.
  """
  # Cost analysis counts a while-loop body once, so analyse the unrolled block stack; a fused
  # attention kernel (cuDNN) is an opaque custom call to it, so count XLA's attention.
  model = model.clone(scan_blocks=False, remat_policy=None, dtype=jnp.float32,
                      attention_impl="xla")
  params = abstract_params(model)
  x, t, y = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in dummy_inputs(model, batch))
  forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  cost = forward.lower(params, x, t, y).cost_analysis()
  return float(cost["flops"]) / 2 / batch / 1e9


def analytic_gmacs(model: DiT) -> float:
  """Forward multiply-accumulates per image (G) of the matmuls, counted from the architecture.

  Needs no compiler: some backends (jax 0.11 on GPU) give no cost analysis of a lowered program.
  Per block: qkv, projection and the 4x MLP (12 D^2 per token), QK^T and AV (2 T D per token),
  the adaLN modulation (6 D^2 per image).
  """
  d, p, c = model.hidden_size, model.patch_size, model.in_channels
  tokens = (model.input_size // p) ** 2
  out = c * 2 if model.learn_sigma else c
  per_block = tokens * (12 * d * d + 2 * tokens * d) + 6 * d * d
  embed = tokens * p * p * c * d + 256 * d + d * d
  final = 2 * d * d + tokens * d * p * p * out
  return (embed + model.depth * per_block + final) / 1e9


def variant_table(image_sizes: tuple[int, ...] = (256,), num_classes: int = 1000) -> str:
  """Markdown table of every variant: depth, hidden, heads, params and Gflops per image size."""
  head = "| model | depth | hidden | heads | params (256 px) |" + "".join(
      f" Gflops {s} px |" for s in image_sizes)
  rows = [head, "|" + "---|" * (5 + len(image_sizes))]
  for name, arch in VARIANTS.items():
    models = [create_model(name, input_size=s // 8, num_classes=num_classes)
              for s in image_sizes]
    params = count_params(create_model(name, input_size=32, num_classes=num_classes))
    flops = "".join(f" {gflops(m):.2f} |" for m in models)
    rows.append(f"| {name} | {arch['depth']} | {arch['hidden_size']} | {arch['num_heads']} | "
                f"{params:,} |{flops}")
  return "\n".join(rows)
