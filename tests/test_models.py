"""DiT model: parity with the official PyTorch outputs, variants, init, guidance, layouts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_rel_close, fixture_path, nchw_to_nhwc, normal
from dit_jax.convert import load_torch_checkpoint
from dit_jax.models import (VARIANTS, DiT, abstract_params, count_params, create_model, gflops,
                            init_params, stack_block_params, unstack_block_params)
from dit_jax.models.flops import analytic_gmacs
from dit_jax.models.layers import LABEL_DROPOUT_RNG, pos_embed_2d, timestep_features

# The facts doc: trainable parameters at 256 px, 1000 classes, and the paper's Gflops.
PARAMS = {
    "DiT-S/2": 32_865_056, "DiT-S/4": 32_920_448, "DiT-S/8": 33_142_016,
    "DiT-B/2": 130_315_808, "DiT-B/4": 130_426_496, "DiT-B/8": 130_869_248,
    "DiT-L/2": 457_840_672, "DiT-L/4": 457_988_224, "DiT-L/8": 458_578_432,
    "DiT-XL/2": 674_834_720, "DiT-XL/4": 675_000_704, "DiT-XL/8": 675_664_640,
}
GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56,
    "DiT-B/2": 23.01, "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39,
    "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}


# Computed once per model for the tests that ask about the same one (each traces the model).
model_gflops = functools.cache(gflops)
model_params = functools.cache(count_params)


def tiny_model(**overrides) -> DiT:
  """The architecture of the official fixture (depth 1, hidden 64, 4 heads, 8x8x4, 10 classes)."""
  return DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                       num_heads=4, num_classes=10, learn_sigma=True), **overrides})


@pytest.fixture(scope="module")
def tiny_params():
  return load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), tiny_model())


def test_fixture_config_matches_tiny_model(dit_ref):
  config = dict(zip(dit_ref["config_names"], dit_ref["config"]))
  model = tiny_model()
  for name, value in config.items():
    assert getattr(model, name) == value, name


@pytest.mark.parametrize("scan_blocks,remat_policy", [(False, None), (True, None),
                                                      (True, "nothing_saveable")])
def test_forward_matches_official(dit_ref, scan_blocks, remat_policy):
  model = tiny_model(scan_blocks=scan_blocks, remat_policy=remat_policy)
  params = load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), model)
  out = model.apply({"params": params}, nchw_to_nhwc(dit_ref["fwd_x"]), dit_ref["fwd_t"],
                    dit_ref["fwd_y"])
  assert out.dtype == jnp.float32
  assert_rel_close(out, nchw_to_nhwc(dit_ref["fwd_out"]), name="fwd_out")


def test_forward_with_cfg_matches_official(dit_ref, tiny_params):
  model = tiny_model()
  out = model.apply({"params": tiny_params}, nchw_to_nhwc(dit_ref["cfg_x"]), dit_ref["cfg_t"],
                    dit_ref["cfg_y"], float(dit_ref["cfg_scale"]), method=DiT.forward_with_cfg)
  assert_rel_close(out, nchw_to_nhwc(dit_ref["cfg_out"]), name="cfg_out")


def test_forward_under_jit_with_float_timesteps(dit_ref, tiny_params):
  model = tiny_model()
  fn = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  out = fn(tiny_params, nchw_to_nhwc(dit_ref["fwd_x"]), dit_ref["fwd_t"].astype(np.float32),
           dit_ref["fwd_y"])
  assert_rel_close(out, nchw_to_nhwc(dit_ref["fwd_out"]), name="jit fwd_out")


def test_guidance_scale_one_is_conditional_output(dit_ref, tiny_params):
  model = tiny_model()
  x = nchw_to_nhwc(dit_ref["fwd_x"])[:2]
  t = np.array([10, 700])
  y = np.array([1, 2])
  doubled = np.concatenate([x, x])
  guided = model.apply({"params": tiny_params}, doubled, np.concatenate([t, t]),
                       np.array([1, 2, 10, 10]), 1.0, guidance_channels=None,
                       method=DiT.forward_with_cfg)
  cond = model.apply({"params": tiny_params}, x, t, y)
  np.testing.assert_allclose(guided[:2, ..., :4], cond[..., :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guided[2:, ..., :4], cond[..., :4], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(cond)).max() > 1e-2  # the weights are not trivial


def test_guidance_all_channels_option(dit_ref, tiny_params):
  model = tiny_model()
  x, t, y = nchw_to_nhwc(dit_ref["cfg_x"]), dit_ref["cfg_t"], dit_ref["cfg_y"]
  scale = 3.0
  half = x[:2]
  raw = model.apply({"params": tiny_params}, np.concatenate([half, half]), t, y)
  expected_eps = raw[2:, ..., :4] + scale * (raw[:2, ..., :4] - raw[2:, ..., :4])
  out = model.apply({"params": tiny_params}, x, t, y, scale, guidance_channels=None,
                    method=DiT.forward_with_cfg)
  np.testing.assert_allclose(out[:2, ..., :4], expected_eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[2:, ..., :4], expected_eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[..., 4:], raw[..., 4:], rtol=1e-6)  # variance unguided
  official = model.apply({"params": tiny_params}, x, t, y, scale, method=DiT.forward_with_cfg)
  np.testing.assert_allclose(official[..., 3], raw[..., 3], rtol=1e-6)  # channel 3 unguided
  assert not np.allclose(official[:2, ..., 3], out[:2, ..., 3])


def test_initial_model_outputs_zeros():
  model = tiny_model(num_classes=7, depth=2)
  params = init_params(model, jax.random.key(3))
  x = normal(jax.random.key(1), (3, 8, 8, 4))
  out = model.apply({"params": params}, x, jnp.array([0, 500, 999]), jnp.array([0, 3, 7]))
  assert out.shape == (3, 8, 8, 8)
  assert np.all(np.asarray(out) == 0.0)
  # adaLN-Zero: the modulation and output Linears start at zero, the rest does not.
  assert np.all(np.asarray(params["blocks_0"]["adaLN_modulation"]["kernel"]) == 0)
  assert np.all(np.asarray(params["final_layer"]["linear"]["kernel"]) == 0)
  assert np.std(np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])) > 0


def test_initialization_distributions():
  model = create_model("S/2", input_size=16, num_classes=100)
  params = init_params(model, jax.random.key(0))
  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out)); the qkv is one [D, 3D] matrix.
  qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
  bound = np.sqrt(6 / (384 + 3 * 384))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
  # The patch embedding is xavier over the flattened (C*p*p) x D matrix.
  patch = np.asarray(params["x_embedder"]["kernel"])
  assert patch.shape == (2 * 2 * 4, 384)
  bound = np.sqrt(6 / (16 + 384))
  assert np.abs(patch).max() <= bound and np.abs(patch).max() > 0.95 * bound
  for leaf in (params["y_embedder"]["embedding_table"]["embedding"],
               params["t_embedder"]["mlp_0"]["kernel"], params["t_embedder"]["mlp_2"]["kernel"]):
    assert abs(np.std(np.asarray(leaf)) - 0.02) < 0.002
  assert np.all(np.asarray(params["blocks_0"]["mlp"]["fc1"]["bias"]) == 0)
  assert params["y_embedder"]["embedding_table"]["embedding"].shape == (101, 384)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_match_official(name):
  assert model_params(create_model(name, input_size=32)) == PARAMS[name]


def test_param_count_with_pos_embed_table():
  model = create_model("XL/2", input_size=32)
  assert model_params(model) + model.num_tokens * model.hidden_size == 675_129_632


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gflops_match_paper(name):
  value = model_gflops(create_model(name, input_size=32))
  assert abs(value - GFLOPS[name]) / GFLOPS[name] < 0.01, value


def test_gflops_xl2_512():
  value = gflops(create_model("XL/2", input_size=64))
  assert abs(value - 524.60) / 524.60 < 0.01, value


@pytest.mark.parametrize("name", list(VARIANTS))
def test_analytic_gmacs_match_paper(name):
  """The compiler-free count (MFU on backends without cost analysis) agrees with the paper."""
  value = analytic_gmacs(create_model(name, input_size=32))
  assert abs(value - GFLOPS[name]) / GFLOPS[name] < 0.01, value


def test_gflops_ignore_the_attention_kernel():
  """A fused attention custom call hides its flops from XLA: Gflops count XLA's attention."""
  model = create_model("S/8", input_size=32)
  assert gflops(model.clone(attention_impl="cudnn")) == model_gflops(model)


def test_position_embedding_column_first():
  table = pos_embed_2d(8, 3)  # 3x3 grid, 4 dims per axis: [sin, sin, cos, cos] per half
  assert table.dtype == np.float64 and table.shape == (9, 8)
  token = 1 * 3 + 2  # row 1, column 2
  np.testing.assert_allclose(table[token, 0], np.sin(2.0))  # first half: column
  np.testing.assert_allclose(table[token, 2], np.cos(2.0))
  np.testing.assert_allclose(table[token, 4], np.sin(1.0))  # second half: row
  np.testing.assert_allclose(table[token, 5], np.sin(1.0 / 100.0))  # omega_1 = 1/10000^(1/2)


def test_timestep_features_cos_then_sin():
  feats = np.asarray(timestep_features(jnp.array([3.0]), 256))[0]
  np.testing.assert_allclose(feats[0], np.cos(3.0), rtol=1e-6)
  np.testing.assert_allclose(feats[128], np.sin(3.0), rtol=1e-6)
  np.testing.assert_allclose(feats[1], np.cos(3.0 * np.exp(-np.log(10000) / 128)), rtol=1e-5)


def test_label_dropout_in_training_only(tiny_params):
  model = tiny_model()
  n = 256
  x = jnp.broadcast_to(normal(jax.random.key(0), (1, 8, 8, 4)), (n, 8, 8, 4))
  t = jnp.full((n,), 500)
  y = jnp.full((n,), 3)
  variables = {"params": tiny_params}
  cond = model.apply(variables, x[:1], t[:1], y[:1])
  null = model.apply(variables, x[:1], t[:1], jnp.full((1,), 10))
  out = model.apply(variables, x, t, y, train=True,
                    rngs={LABEL_DROPOUT_RNG: jax.random.key(42)})
  is_cond = np.all(np.isclose(out, cond, atol=1e-6), axis=(1, 2, 3))
  is_null = np.all(np.isclose(out, null, atol=1e-6), axis=(1, 2, 3))
  assert np.all(is_cond ^ is_null)
  assert 8 <= is_null.sum() <= 45  # Binomial(256, 0.1): mean 25.6
  again = model.apply(variables, x, t, y, train=True,
                      rngs={LABEL_DROPOUT_RNG: jax.random.key(42)})
  np.testing.assert_array_equal(out, again)
  evaluated = model.apply(variables, x, t, y, train=False)
  assert np.all(np.isclose(evaluated, cond, atol=1e-6))


def test_scan_layout_conversion_round_trip():
  unscanned = tiny_model(depth=3)
  scanned = tiny_model(depth=3, scan_blocks=True)
  params = init_params(unscanned, jax.random.key(0))
  # Make the blocks non-trivial so that the outputs depend on every block.
  params = jax.tree.map(lambda a: a + 0.01 * normal(jax.random.key(1), a.shape),
                        params)
  stacked = stack_block_params(params, 3)
  assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)
  x = normal(jax.random.key(2), (2, 8, 8, 4))
  t, y = jnp.array([1, 900]), jnp.array([0, 9])
  a = unscanned.apply({"params": params}, x, t, y)
  b = scanned.apply({"params": stacked}, x, t, y)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  back = unstack_block_params(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # The scanned layout is exactly what a scanned model initializes.
  shapes = jax.tree.map(lambda s: s.shape, abstract_params(scanned))
  assert shapes == jax.tree.map(lambda a: a.shape, stacked)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_param_names_do_not_depend_on_remat(scan_blocks):
  plain = abstract_params(tiny_model(depth=2, scan_blocks=scan_blocks))
  remat = abstract_params(tiny_model(depth=2, scan_blocks=scan_blocks,
                                     remat_policy="dots_saveable"))
  assert jax.tree.structure(plain) == jax.tree.structure(remat)


def test_every_kernel_has_logical_axes():
  boxed = abstract_params(tiny_model(depth=2, scan_blocks=True), boxed=True)
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_flatten_with_path(specs)[0]
  assert flat
  for path, spec in flat:
    names = [k.key for k in path]
    assert spec is not None and all(axis is not None for axis in spec), names
    if names[0] == "blocks":
      assert spec[0] == "layers", names
  assert specs["blocks"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "qkv")
  assert specs["blocks"]["mlp"]["fc2"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "mlp", "embed")


def test_bfloat16_forward_close_to_float32(dit_ref, tiny_params):
  x = nchw_to_nhwc(dit_ref["fwd_x"])
  out32 = tiny_model().apply({"params": tiny_params}, x, dit_ref["fwd_t"], dit_ref["fwd_y"])
  out16 = tiny_model(dtype=jnp.bfloat16).apply({"params": tiny_params}, x, dit_ref["fwd_t"],
                                               dit_ref["fwd_y"])
  assert out16.dtype == jnp.float32
  err = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert 0 < err < 3e-2, err


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_size=66, num_heads=4), "hidden_size"),
    (dict(hidden_size=6, num_heads=3), "hidden_size"),
    (dict(input_size=9), "input_size"),
    (dict(depth=0), "depth"),
    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
    (dict(remat_policy="no_such_policy"), "remat_policy"),
])
def test_invalid_config_raises_naming_field(overrides, field):
  with pytest.raises(ValueError, match=rf"^{field}:"):
    tiny_model(**overrides)


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="^variant:"):
    create_model("DiT-M/2")
  assert create_model("XL/2").hidden_size == create_model("DiT-XL/2").hidden_size == 1152


@pytest.mark.parametrize("labels", [[0, 11], [-1, 2]])
def test_labels_out_of_range_raise(tiny_params, labels):
  x = jnp.zeros((2, 8, 8, 4))
  with pytest.raises(ValueError, match="^y:"):
    tiny_model().apply({"params": tiny_params}, x, jnp.array([1, 2]), jnp.array(labels))


def test_wrong_input_shape_raises(tiny_params):
  with pytest.raises(ValueError, match="^x:"):
    tiny_model().apply({"params": tiny_params}, jnp.zeros((2, 16, 16, 4)), jnp.array([1, 2]),
                       jnp.array([0, 1]))


def test_guidance_without_null_class_raises():
  model = tiny_model(class_dropout_prob=0.0)
  params = init_params(model, jax.random.key(0))
  assert params["y_embedder"]["embedding_table"]["embedding"].shape[0] == 10
  with pytest.raises(ValueError, match="^class_dropout_prob:"):
    model.apply({"params": params}, jnp.zeros((2, 8, 8, 4)), jnp.array([1, 1]),
                jnp.array([0, 1]), 4.0, method=DiT.forward_with_cfg)


def test_a_config_without_a_block_layout_unrolls_only_on_gpus(monkeypatch):
  """`model.scan_blocks=None` (the ImageNet configs): unrolled on GPUs, scanned elsewhere; an
  explicit True / False is kept on any backend."""
  from dit_jax.models import build_model, dit
  assert dit.default_scan_blocks("gpu") is False
  assert dit.default_scan_blocks("tpu") is True and dit.default_scan_blocks("cpu") is True
  config = {"variant": "S/8", "input_size": 16, "num_classes": 10, "scan_blocks": None}
  assert build_model(config).scan_blocks  # this machine is a CPU
  monkeypatch.setattr(dit.jax, "default_backend", lambda: "gpu")
  assert not build_model(config).scan_blocks
  assert build_model({**config, "scan_blocks": True}).scan_blocks
  assert config["scan_blocks"] is None  # the caller's config is not changed
