"""The model's speed-motivated formulations compute exactly what the plain ones do.

Each replaces a form that XLA on CPU ran slowly (benchmarks/README.md): a 2-D Dense, attention
with heads-major operands and a softmax whose backward keeps only the probabilities, and a fence
on the residual cotangent between unrolled blocks (and unrolled iterations of the block scan).
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.models import DiT, abstract_params, init_params, stack_block_params
from dit_jax.models import dit as dit_lib
from dit_jax.models import layers

from conftest import normal


def test_dense_on_3d_input_equals_flax_dense():
  x = normal(jax.random.key(0), (3, 5, 8))
  ours = layers.dense(6, ("embed", "mlp"), "fc", jnp.float32, jnp.float32)
  params = nn.unbox(ours.init(jax.random.key(1), x))
  plain = nn.Dense(6)
  np.testing.assert_array_equal(ours.apply(params, x), plain.apply(params, x))
  assert ours.apply(params, x).shape == (3, 5, 6)


def attention_f64(q, k, v, g=None, scale=1.0):
  """softmax(q k^T * scale) v over [batch, heads, tokens, head_dim] in float64 (numpy), and with
  a cotangent g its gradients (dq, dk, dv): the truth both float32 formulations round."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bnqh,bnkh->bnqk", q, k) * scale
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bnkh->bnqh", p, v)
  if g is None:
    return out
  g = np.asarray(g, np.float64)
  dp = np.einsum("bnqh,bnkh->bnqk", g, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
  return (np.einsum("bnqk,bnkh->bnqh", ds, k), np.einsum("bnqk,bnqh->bnkh", ds, q),
          np.einsum("bnqk,bnqh->bnkh", p, g))


def assert_as_accurate(got, plain, truth):
  """`got` (a reformulation) is as close to the float64 truth as the plain float32 form, within
  a factor 2 (or 2 float32 epsilons of the largest value): the bits of two layouts of the same
  products depend on the CPU's kernels (equal on the Intel development machine, not on an AMD
  EPYC), their accuracy does not."""
  got, plain, truth = (np.asarray(a, np.float64) for a in (got, plain, truth))
  floor = 2 * np.finfo(np.float32).eps * np.abs(truth).max()
  assert np.abs(got - truth).max() <= max(2 * np.abs(plain - truth).max(), floor)


# 16: a power-of-two scale (applied to q); 8 and 9: applied to the logits.
@pytest.mark.parametrize("head_dim", [8, 9, 16])
def test_heads_major_attention_equals_jax_attention(head_dim):
  batch, tokens, heads = 2, 7, 3
  qkv = normal(jax.random.key(head_dim), (batch, tokens, 3, heads, head_dim))
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  scale = head_dim ** -0.5
  expected = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  got = layers.heads_major_attention(qkv, scale)
  assert got.shape == (batch, tokens, heads, head_dim)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  jitted = jax.jit(layers.heads_major_attention, static_argnums=1)(qkv, scale)
  theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, implementation="xla"))(q, k, v)
  truth = np.moveaxis(attention_f64(*(np.moveaxis(a, 1, 2) for a in (q, k, v)), scale=scale),
                      1, 2)
  assert_as_accurate(jitted, theirs, truth)
  # bf16 inputs: float32 logits and softmax, as jax's XLA path.
  qkv16 = qkv.astype(jnp.bfloat16)
  got16 = layers.heads_major_attention(qkv16, scale)
  ref16 = jax.nn.dot_product_attention(qkv16[:, :, 0], qkv16[:, :, 1], qkv16[:, :, 2],
                                       scale=scale, implementation="xla")
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(got16.astype(np.float32), ref16.astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_power_of_two_scale_on_q_gives_the_bits_of_scaled_logits(head_dim, dtype):
  """Scaling q by a power of two is exact: the same bits as scaling the logits with the same
  products (jax's own layout sums in another order at 64, so it only matches to rounding)."""
  qkv = normal(jax.random.key(5), (2, 33, 3, 2, head_dim)).astype(dtype)
  scale = head_dim ** -0.5

  def logits_scaled(qkv):
    q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * jnp.float32(scale), axis=-1).astype(dtype)
    return jnp.moveaxis(jnp.einsum("bnqk,bnkh->bnqh", probs, v), 1, 2)
  got = jax.jit(layers.heads_major_attention, static_argnums=1)(qkv, scale)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(jax.jit(logits_scaled)(qkv), np.float32))


def test_softmax_is_jax_softmax_and_its_gradient_too():
  x = 4 * normal(jax.random.key(0), (3, 5, 17))
  x = x.at[0, 0].set(jnp.array([80.0] + [-80.0] * 16))  # a saturated row
  g = normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(layers.softmax(x), jax.nn.softmax(x, axis=-1))
  got = jax.vjp(layers.softmax, x)[1](g)[0]
  expected = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), x)[1](g)[0]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert np.isfinite(got).all()
  # Probabilities sum to one, so a constant added to a row has no gradient.
  np.testing.assert_allclose(got.sum(-1), 0, atol=1e-6)


@pytest.mark.parametrize("head_dim", [8, 16])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_heads_major_attention_gradient_equals_jax_attention_gradient(dtype, tol, head_dim):
  batch, tokens, heads = 2, 7, 3
  qkv = normal(jax.random.key(2), (batch, tokens, 3, heads, head_dim)).astype(dtype)
  g = normal(jax.random.key(3), (batch, tokens, heads, head_dim)).astype(dtype)
  scale = head_dim ** -0.5

  def theirs(qkv):
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale,
                                        implementation="xla")
  got = jax.vjp(lambda qkv: layers.heads_major_attention(qkv, scale), qkv)[1](g)[0]
  expected = jax.vjp(theirs, qkv)[1](g)[0]
  assert got.dtype == dtype
  np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=tol,
                             atol=tol)


def test_cotangent_fence_is_the_identity_and_its_gradient_too():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  np.testing.assert_array_equal(layers.cotangent_fence(x), x)
  f = lambda x: jnp.sum(jnp.sin(layers.cotangent_fence(x)) * x)
  g = lambda x: jnp.sum(jnp.sin(x) * x)
  # Equal up to rounding: the fence changes which products XLA fuses (fused multiply-adds).
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(g))(x), rtol=1e-6,
                             atol=1e-7)
  # A non-finite first element only picks the other (identical) branch.
  y = x.at[0, 0].set(jnp.inf)
  np.testing.assert_array_equal(jax.grad(lambda y: jnp.sum(layers.cotangent_fence(y) * 2))(y),
                                jnp.full_like(y, 2.0))


def test_cpu_attention_is_the_plain_forward_and_gradient():
  """`cpu_attention` (used on CPU for float32 with a power-of-two scale): the forward's bits,
  and the gradient of the plain formulation up to rounding (another summation order): as
  accurate against float64 as autodiff's (1 of 3168 elements differs by 1.2e-6 on an AMD EPYC,
  a sum of 33 terms of magnitude ~1)."""
  q, k, v, g = (normal(jax.random.key(i), (2, 3, 33, 16)) for i in range(4))

  def plain(q, k, v):
    return jnp.einsum("bnqk,bnkh->bnqh",
                      jax.nn.softmax(jnp.einsum("bnqh,bnkh->bnqk", q, k), axis=-1), v)
  np.testing.assert_array_equal(jax.jit(layers.cpu_attention)(q, k, v), jax.jit(plain)(q, k, v))
  got = jax.jit(lambda *a: jax.vjp(layers.cpu_attention, *a)[1](g))(q, k, v)
  expected = jax.jit(lambda *a: jax.vjp(plain, *a)[1](g))(q, k, v)
  for a, b, truth in zip(got, expected, attention_f64(q, k, v, g)):
    assert_as_accurate(a, b, truth)


def test_attention_backward_computes_the_transposed_key_and_value_gradients():
  """The gradients of k and v stay in the form XLA's CPU dot runs fast: every dot of the
  attention backward that contracts the token axis leading both operands has the small operand
  first and gives [..., head_dim, tokens]; XLA folds a plain transpose back into
  [..., tokens, head_dim] from the probabilities, the slow form."""
  tokens, head_dim = 24, 16
  qkv = normal(jax.random.key(0), (2, tokens, 3, 2, head_dim))
  g = normal(jax.random.key(1), (2, tokens, 2, head_dim))
  grad = jax.jit(lambda x: jax.vjp(lambda x: layers.heads_major_attention(x, 0.25), x)[1](g))
  leading = [line.split("=", 1)[1].split("dot(")[0].strip()
             for line in grad.lower(qkv).compile().as_text().splitlines()
             if " dot(" in line and "lhs_contracting_dims={2}" in line
             and "rhs_contracting_dims={2}" in line]
  assert leading == [f"f32[2,2,{head_dim},{tokens}]{{3,2,1,0}}"] * 2, leading


def _unrolled_model(depth: int = 6, **kw) -> DiT:
  return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth,
             num_heads=4, num_classes=10, **kw)


_GRADS: dict = {}


def _loss_grad(model: DiT) -> jax.stages.Compiled:
  """The compiled gradient of a loss of `model`'s output. One program per model and backend the
  model is traced for (`jax.default_backend`, which tests patch to leave the fences out), shared
  by the tests: it depends on the parameters' shapes only, so it is compiled from them; its HLO
  (`.as_text()`) is the program that runs."""
  key = (model, jax.default_backend())
  if key not in _GRADS:
    x = normal(jax.random.key(1), (2, 8, 8, 4))
    t, y = jnp.array([3, 700]), jnp.array([1, 10])
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)
    _GRADS[key] = jax.jit(jax.grad(loss)).lower(abstract_params(model)).compile()
  return _GRADS[key]


def _widest_fusion(hlo: str, stacking: bool = True) -> int:
  """Operands of the widest fusion of a compiled backward's HLO; without `stacking`, leaving
  out the fusions that concatenate per-block values (XLA names a fusion after its root), which
  the scanned layout's stacked gradients need: they read each block's values once."""
  return max(len(re.findall(r"%[\w.\-]+", line.split(" fusion(", 1)[1].split(")")[0]))
             for line in hlo.splitlines()
             if " fusion(" in line and (stacking or "concatenate" not in line.split("=")[0]))


def test_unrolled_backward_has_no_fusion_spanning_the_blocks(monkeypatch):
  """Without the fence XLA on CPU fused the residual cotangent of every block into each
  consumer: such a fusion reads about 5 tensors per block, so its width grows with depth. With
  the fence the widest fusion is one block's and does not grow."""
  fenced = {depth: _widest_fusion(_loss_grad(_unrolled_model(depth=depth)).as_text())
            for depth in (3, 6)}
  assert fenced[6] == fenced[3], fenced
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the model leaves the fence out
  unfenced = _widest_fusion(_loss_grad(_unrolled_model(depth=6)).as_text())
  assert unfenced > fenced[6] + 10, (unfenced, fenced)


@pytest.fixture(scope="module")
def unrolled_gradient():
  """Parameters of the (depth 6) unrolled model, moved off their initial values, and its
  gradient there, both in the scanned layout: the same whatever the scanned loop's unroll."""
  model = _unrolled_model()
  params = init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * normal(jax.random.key(2), p.shape), params)
  grad = _loss_grad(model)(params)
  return stack_block_params(params, model.depth), stack_block_params(grad, model.depth)


@pytest.mark.parametrize("scan_unroll", [None, 1, 4])
def test_fenced_unrolled_gradient_is_the_scanned_gradient(scan_unroll, unrolled_gradient):
  """The scanned layout gives the unrolled gradient whether its loop runs rolled (1), fully
  unrolled (None: CPU's default) or partly (4 of 6 blocks per iteration, a remainder of 2)."""
  params, got = unrolled_gradient
  model = _unrolled_model().clone(scan_blocks=True, scan_unroll=scan_unroll)
  expected = _loss_grad(model)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got,
               expected)


def test_scanned_blocks_run_straight_on_cpu_and_as_a_loop_when_asked(monkeypatch):
  """On CPU the scanned layout compiles, by default, without a loop (XLA's loop stacks the
  residuals); `scan_unroll=1` keeps the loop. Unrolled, its backward is fenced like the
  unrolled layout's: apart from the stacked gradients, the widest fusion is one block's,
  whatever the depth; unfenced, it grows with depth."""
  def program(depth, **kw):
    return _loss_grad(_unrolled_model(depth=depth, scan_blocks=True, **kw)).as_text()

  straight = {depth: program(depth) for depth in (3, 6)}
  rolled = program(3, scan_unroll=1)
  assert " while(" not in straight[3] and " while(" in rolled
  fenced = {depth: _widest_fusion(hlo, stacking=False) for depth, hlo in straight.items()}
  assert fenced[6] == fenced[3], fenced
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the model leaves the fence out
  unfenced = _widest_fusion(program(6, scan_unroll=6), stacking=False)
  assert unfenced > fenced[6] + 10, (unfenced, fenced)


def test_default_scan_unroll_is_every_block_on_cpu_only():
  assert dit_lib.default_scan_unroll(28, "cpu") == 28
  assert dit_lib.default_scan_unroll(28, "gpu") == 1 and dit_lib.default_scan_unroll(28, "tpu") == 1
  assert dit_lib.default_scan_unroll(12) == 12  # this machine is a CPU


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "all"])
def test_scan_unroll_is_checked(value):
  with pytest.raises(ValueError, match="^scan_unroll: must be None or a positive integer"):
    _unrolled_model(scan_blocks=True, scan_unroll=value)


def test_attention_impl_is_checked():
  with pytest.raises(ValueError, match="attention_impl"):
    _unrolled_model(attention_impl="flash")
