"""One model's train step under several settings, each in a fresh process: what moves its time.

  python -m benchmarks.step_variants --variant XL/2 --out results.jsonl [--only base unrolled]

Every setting changes one or two things against `base` (the accelerator table's setting:
scanned blocks, cuDNN attention, no remat, bf16 compute, float32 params): the block layout, the
remat policy with a larger batch, the attention kernel, an XLA flag, or a what-if change to the
model's code applied by `PATCHES` in the child process (to learn whether a change is worth
making in `dit_jax/models/layers.py`, not a way to run the trainer). Each runs through
`benchmarks.accelerator`'s child (train step only, no sampling) under a time limit, and the
table gives img/s and MFU relative to `base`. Needs only jax, flax, optax and numpy.
"""
import argparse
import dataclasses
import json
import time

import flax.linen as nn

from benchmarks.accelerator import last_line, run_child


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  batch: int = 64
  blocks: str = "scanned"
  remat: str = "none"
  attention: str = "cudnn"
  xla_flags: str = ""
  patch: str = ""


SETTINGS = (
    Setting("base"),
    Setting("remat dots, 128", batch=128, remat="dots_with_no_batch_dims_saveable"),
    Setting("remat dots, 256", batch=256, remat="dots_with_no_batch_dims_saveable"),
    Setting("unrolled", blocks="unrolled"),
    Setting("q, k, v as three matmuls", patch="split_qkv"),
    Setting("one-pass layer norm", patch="ln_one_pass"),
    Setting("cuBLAS only", xla_flags="--xla_gpu_enable_triton_gemm=false"),
    Setting("xla attention", attention="xla"),
    Setting("unrolled, remat dots, 128", batch=128, blocks="unrolled",
            remat="dots_with_no_batch_dims_saveable"),
    Setting("unrolled, 128", batch=128, blocks="unrolled"),
    Setting("unrolled, one-pass LN, cuBLAS only", blocks="unrolled", patch="ln_one_pass",
            xla_flags="--xla_gpu_enable_triton_gemm=false"),
    Setting("unrolled, 128, one-pass LN, cuBLAS only", batch=128, blocks="unrolled",
            patch="ln_one_pass", xla_flags="--xla_gpu_enable_triton_gemm=false"),
    # XLA's own options against the unrolled step's memory-bound half (benchmarks/README, "GPU
    # profile"): each is an environment setting a user can make, no code change.
    Setting("unrolled, 128, cuBLASLt epilogues", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false"),
    Setting("unrolled, 256", batch=256, blocks="unrolled"),
    Setting("unrolled, 128, block-level fusions", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"),
    Setting("unrolled, 128, Triton multi-output fusions", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"),
    Setting("unrolled, 128, cuDNN layer norm", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_enable_cudnn_layer_norm=true"),
    Setting("unrolled, 128, heroless Triton fusions", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"),
    Setting("unrolled, 128, programmatic dependent launch", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_enable_pdl=true"),
    Setting("unrolled, 128, Triton gemms with any fusion", batch=128, blocks="unrolled",
            xla_flags="--xla_gpu_triton_gemm_any=true"),
)


def _ln_one_pass() -> None:
  """Layer norm's variance as E[x^2] - E[x]^2 (one reduction pass) instead of two passes."""
  from dit_jax.models import layers

  def layer_norm(dtype, name=None):
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, use_fast_variance=True,
                        dtype=dtype, name=name)
  layers.layer_norm = layer_norm


def _split_qkv() -> None:
  """q, k and v each from its own matmul (column slices of the same `qkv` kernel and bias),
  so each comes out contiguous as [batch, tokens, heads, head_dim] for the cuDNN kernel,
  instead of three strided slices of one [batch, tokens, 3, heads, head_dim] output."""
  import jax
  import jax.numpy as jnp
  from dit_jax.models import layers

  class SplitQKV(nn.Module):
    features: int
    dtype: object
    param_dtype: object

    @nn.compact
    def __call__(self, x):
      d = x.shape[-1]
      kernel = self.param("kernel", nn.with_logical_partitioning(
          layers.xavier_uniform, ("embed", "qkv")), (d, 3 * self.features), self.param_dtype)
      bias = self.param("bias", nn.with_logical_partitioning(layers.zeros, ("bias",)),
                        (3 * self.features,), self.param_dtype)
      rows = x.reshape(-1, d).astype(self.dtype)
      kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
      return [(rows @ kernel[:, i * self.features:(i + 1) * self.features]
               + bias[i * self.features:(i + 1) * self.features]) for i in range(3)]

  class SplitAttention(layers.Attention):
    @nn.compact
    def __call__(self, x):
      return _split_attention(self, x)

  def _split_attention(self, x):
    batch, tokens, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    q, k, v = (y.reshape(batch, tokens, self.num_heads, head_dim) for y in
               SplitQKV(self.hidden_size, self.dtype, self.param_dtype, name="qkv")(x))
    if self.implementation == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, implementation="cudnn")
    else:
      out = layers.heads_major_attention(jnp.stack([q, k, v], axis=2), head_dim ** -0.5)
    out = out.reshape(batch, tokens, self.hidden_size)
    return layers.dense(self.hidden_size, ("heads", "embed"), "proj", self.dtype,
                        self.param_dtype)(out)
  layers.Attention = SplitAttention


PATCHES = {"ln_one_pass": _ln_one_pass, "split_qkv": _split_qkv}


def apply_patch(names: str) -> None:
  """Applies the comma-separated `PATCHES` named."""
  for name in filter(None, names.split(",")):
    if name not in PATCHES:
      raise SystemExit(f"--patch: unknown {name!r}; known: {', '.join(PATCHES)}")
    PATCHES[name]()


def run_setting(setting: Setting, variant: str, steps: int, timeout: float) -> dict:
  start = time.perf_counter()
  code, result, err = run_child(variant, setting.batch, remat=setting.remat, steps=steps,
                                sample_batch=0, blocks=setting.blocks,
                                attention=setting.attention, patch=setting.patch,
                                xla_flags=setting.xla_flags, timeout=timeout)
  if code is None or result is None:
    return {"setting": setting.name, "error": err if code is None else last_line(err),
            "stderr_tail": err[-4000:]}
  return {"setting": setting.name, **dataclasses.asdict(setting), **result,
          "process_s": time.perf_counter() - start}


def format_table(rows: list[dict], base_name: str = "base") -> str:
  base = next((r for r in rows if r["setting"] == base_name and "error" not in r), None)
  lines = [f"| setting | batch | img/s | vs {base_name} | MFU | peak GiB | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['setting']} | {r['error']} ||||||")
      continue
    ratio = f"{r['images_per_sec'] / base['images_per_sec']:.2f}x" if base else "-"
    lines.append(f"| {r['setting']} | {r['batch']} | {r['images_per_sec']:.1f} | {ratio} | "
                 f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="XL/2")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps per setting")
  parser.add_argument("--timeout", type=float, default=150, help="seconds per setting")
  parser.add_argument("--only", nargs="+", default=None, help="setting names to run")
  parser.add_argument("--out", default=None, help="append each result as a JSON line here")
  parser.add_argument("--base", default="base",
                      help="the setting the others are compared with; it runs first, and if "
                           "it fails nothing else runs (they would fail the same way)")
  args = parser.parse_args()
  names = {s.name for s in SETTINGS}
  unknown = sorted(set(args.only or ()) - names)
  if unknown:
    raise SystemExit(f"--only: unknown {unknown}; known: {sorted(names)}")
  if args.base not in names:
    raise SystemExit(f"--base: unknown {args.base!r}; known: {sorted(names)}")
  chosen = [s for s in SETTINGS if not args.only or s.name in args.only]
  chosen.sort(key=lambda s: s.name != args.base)  # the base first, the rest in their order
  rows = []
  for setting in chosen:
    row = run_setting(setting, args.variant, args.steps, args.timeout)
    rows.append(row)
    print(f"  {setting.name}: " + (row.get("error") or
                                   f"{row['images_per_sec']:.1f} img/s, {row['mfu']:.1%} MFU"),
          flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if setting.name == args.base and "error" in row:
      print(f"the base setting failed; nothing else run:\n{row['stderr_tail']}", flush=True)
      break
  print(f"DiT-{args.variant}, bf16, 256 px\n" + format_table(rows, args.base))


if __name__ == "__main__":
  main()
