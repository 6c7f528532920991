"""The Stable Diffusion VAE port: parity with diffusers' AutoencoderKL and weight import."""
import dataclasses
import json
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_rel_close, fixture_path, nchw_to_nhwc
from dit_jax.vae import (AutoencoderKL, VAEConfig, from_diffusers_state_dict,
                         load_diffusers_vae, read_safetensors, sample_latent,
                         save_diffusers_vae, to_diffusers_state_dict, write_safetensors)
from dit_jax.vae.convert import expected_shapes
from dit_jax.vae.safetensors import float32_to_bf16_bits

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


@pytest.fixture(scope="module")
def ref():
  with np.load(fixture_path("vae_reference", "tiny_vae.npz")) as data:
    return {k: nchw_to_nhwc(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def folder():
  return fixture_path("vae_reference", "tiny_vae")


@pytest.fixture(scope="module")
def state(folder):
  return read_safetensors(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def loaded(folder):
  return load_diffusers_vae(str(folder))


@pytest.fixture(scope="module")
def run(loaded):
  """(params) -> (mean, logvar, decode(fixture z)), jitted once for the fixture's shapes."""
  vae = AutoencoderKL(loaded[0])

  @jax.jit
  def forward(params, x, z):
    mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
    return mean, logvar, vae.apply({"params": params}, z, method=vae.decode)

  return forward


def _tree_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_parity_with_diffusers(ref, loaded, run):
  config, params = loaded
  assert config.block_out_channels == (32, 64) and config.norm_num_groups == 8
  mean, logvar, decoded = run(params, ref["x"], ref["z"])
  assert mean.shape == (2, 8, 8, 4) and decoded.shape == (2, 16, 16, 3)
  assert_rel_close(mean, ref["mean"], 1e-4, "mean")
  assert_rel_close(logvar, ref["logvar"], 1e-4, "logvar")
  assert_rel_close(decoded, ref["decoded"], 1e-4, "decoded")


def test_logvar_is_clamped(loaded, ref):
  config, params = loaded
  params = jax.tree_util.tree_map(np.array, params)
  # Push the log-variance half of quant_conv's bias far out of range both ways.
  bias = params["quant_conv"]["bias"]
  bias[4:6], bias[6:] = 1e4, -1e4
  _, logvar = AutoencoderKL(config).apply({"params": params}, ref["x"],
                                          method=AutoencoderKL.encode)
  np.testing.assert_array_equal(np.asarray(logvar[..., :2]), 20.0)
  np.testing.assert_array_equal(np.asarray(logvar[..., 2:]), -30.0)


def test_latent_scaling_helpers(loaded, ref):
  config, params = loaded
  vae = AutoencoderKL(config)
  rng = jax.random.key(3)
  latents = jax.jit(vae.encode_to_latents)(params, ref["x"], rng)
  noise = np.asarray(jax.random.normal(rng, latents.shape))
  # The fixture's moments stand in for ours (parity is tested above).
  expected = (ref["mean"] + np.exp(0.5 * ref["logvar"]) * noise) * 0.18215
  assert_rel_close(latents, expected, 1e-4, "encode_to_latents")
  np.testing.assert_allclose(sample_latent(ref["mean"], ref["logvar"], rng) * 0.18215,
                             expected, rtol=1e-6, atol=1e-6)
  images = jax.jit(vae.decode_latents)(params, ref["z"] * 0.18215)
  assert_rel_close(images, ref["decoded"], 1e-4, "decode_latents")


def test_bf16_compute_close_to_float32(loaded, ref):
  config, params = loaded
  vae = AutoencoderKL(config, dtype=jnp.bfloat16)
  mean, _ = vae.apply({"params": params}, ref["x"], method=vae.encode)
  decoded = vae.apply({"params": params}, ref["z"], method=vae.decode)
  assert mean.dtype == jnp.float32 and decoded.dtype == jnp.float32  # outputs stay float32
  assert_rel_close(mean, ref["mean"], 5e-2, "bf16 mean")
  assert_rel_close(decoded, ref["decoded"], 5e-2, "bf16 decoded")
  assert not np.allclose(np.asarray(decoded), ref["decoded"], rtol=0, atol=1e-7)  # really bf16


def _write_folder(tmp_path, state, fmt="safetensors"):
  folder = tmp_path / "vae"
  folder.mkdir()
  shutil.copy(fixture_path("vae_reference", "tiny_vae", "config.json"), folder)
  if fmt == "safetensors":
    write_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), state)
  else:
    import torch
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
               folder / "diffusion_pytorch_model.bin")
  return folder


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_attention_names(tmp_path, state, loaded, run, ref, conv_shaped):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old, renamed = {}, 0
  for key, value in state.items():
    for new, legacy in renames.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{legacy}.")
        if conv_shaped and value.ndim == 2:
          value = value[:, :, None, None]
        renamed += 1
    old[key] = value
  assert renamed == 16 and not any(".to_q." in k for k in old)
  _, params = load_diffusers_vae(str(_write_folder(tmp_path, old)))
  _tree_equal(params, loaded[1])
  assert_rel_close(run(params, ref["x"], ref["z"])[2], ref["decoded"], 1e-4, "legacy")


def test_torch_bin_gives_identical_params(tmp_path, state, loaded):
  pytest.importorskip("torch")
  config, params = load_diffusers_vae(str(_write_folder(tmp_path, state, fmt="bin")))
  assert config == loaded[0]
  _tree_equal(params, loaded[1])


def test_key_errors_name_every_bad_key(state, loaded):
  config = loaded[0]
  bad = dict(state)
  del bad["decoder.conv_in.bias"]
  bad["encoder.extra.weight"] = np.zeros(3, np.float32)
  bad["encoder.conv_out.weight"] = np.zeros((8, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    from_diffusers_state_dict(bad, config, source="bad.safetensors")
  message = str(info.value)
  assert "bad.safetensors" in message
  assert "missing (1): decoder.conv_in.bias (64,)" in message
  assert "unexpected (1): encoder.extra.weight (3,)" in message
  assert ("encoder.conv_out.weight: file has (8, 64, 1, 1), model expects (8, 64, 3, 3)"
          in message)
  # Weights for another config (one more resnet per level) fail the same way.
  with pytest.raises(ValueError,
                     match=r"missing \(32\): decoder.up_blocks.0.resnets.2.conv1.bias \(64,\)"):
    from_diffusers_state_dict(state, dataclasses.replace(config, layers_per_block=2))


def test_export_round_trip(tmp_path, state, loaded):
  config, params = loaded
  exported = to_diffusers_state_dict(params, config)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  save_diffusers_vae(str(tmp_path / "vae"), config, params)
  config2, params2 = load_diffusers_vae(str(tmp_path))  # a pipeline folder: uses vae/
  assert config2 == config
  _tree_equal(params2, params)


def test_safetensors_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32) * 100,
            "b.c": rng.standard_normal((2, 1, 4)).astype(np.float32), "s": np.float32(7.5)}
  torch = pytest.importorskip("torch")
  for dtype, cast in (
      ("F32", lambda a: a),
      ("F16", lambda a: a.astype(np.float16).astype(np.float32)),
      ("BF16", lambda a: torch.from_numpy(np.array(a)).bfloat16().float().numpy())):
    path = str(tmp_path / f"{dtype}.safetensors")
    write_safetensors(path, arrays, dtype=dtype)
    back = read_safetensors(path)
    assert sorted(back) == sorted(arrays)
    for name, value in arrays.items():
      assert back[name].dtype == np.float32 and back[name].shape == np.shape(value)
      np.testing.assert_array_equal(back[name], cast(np.asarray(value)), err_msg=dtype)
  bits = float32_to_bf16_bits(np.array([1.0, -2.5, np.nan, 1 + 2 ** -8 + 2 ** -20], np.float32))
  np.testing.assert_array_equal(bits[[0, 1, 3]], [0x3F80, 0xC020, 0x3F81])  # round up past half
  assert bits[2] & 0x7F80 == 0x7F80 and bits[2] & 0x7F


def _handmade(path, header, data):
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def test_safetensors_reader_on_handmade_file(tmp_path):
  """A file laid out by hand (unsorted, unpadded header; BF16 bits by hand), not by our writer."""
  f16 = np.array([[1.5, -2.0]], "<f2").tobytes()
  bf16 = np.array([0x3F80, 0xC0A0, 0x3E20], "<u2").tobytes()  # 1.0, -5.0, 0.15625
  f32 = np.arange(6, dtype="<f4").tobytes()
  header = {"z": {"dtype": "F32", "shape": [2, 3], "data_offsets": [10, 34]},
            "h": {"dtype": "F16", "shape": [1, 2], "data_offsets": [0, 4]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [4, 10]},
            "__metadata__": {"format": "pt"}}
  path = str(tmp_path / "hand.safetensors")
  _handmade(path, header, f16 + bf16 + f32)
  out = read_safetensors(path)
  np.testing.assert_array_equal(out["h"], [[1.5, -2.0]])
  np.testing.assert_array_equal(out["b"], [1.0, -5.0, 0.15625])
  np.testing.assert_array_equal(out["z"], np.arange(6).reshape(2, 3))
  header["z"]["data_offsets"] = [10, 30]
  _handmade(path, header, f16 + bf16 + f32)
  with pytest.raises(ValueError, match="'z' has data_offsets"):
    read_safetensors(path)
  _handmade(path, {"i": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
  with pytest.raises(ValueError, match="'i' has dtype I64"):
    read_safetensors(path)


def test_config_defaults_and_errors(tmp_path):
  config = VAEConfig.from_dict({"_class_name": "AutoencoderKL"})
  assert config == VAEConfig()
  assert (config.block_out_channels, config.layers_per_block, config.norm_num_groups) == (
      (64,), 1, 32)
  assert config.scaling_factor == 0.18215 and config.shift_factor is None
  assert config.use_quant_conv and config.use_post_quant_conv and config.mid_block_add_attention
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**VAEConfig(**SD_VAE).to_dict(), "force_upcast": True,
                              "mid_block_add_attention": None}))
  sd = VAEConfig.from_json(str(tmp_path))
  assert sd == VAEConfig(**SD_VAE) and sd.downsample_factor == 8
  for raw, field in (
      ({"down_block_types": ["DownBlock2D"]}, "down_block_types"),
      ({"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}, "up_block_types"),
      ({"act_fn": "gelu"}, "act_fn"),
      ({"_class_name": "AutoencoderTiny"}, "_class_name"),
      ({"block_out_channels": [48]}, "norm_num_groups")):
    with pytest.raises(ValueError, match=field):
      VAEConfig.from_dict(raw)


@pytest.mark.parametrize("key,value,expected", [
    ("block_out_channels", "128,256", "a list of positive integers"),
    ("block_out_channels", [128, 2.5], "a list of positive integers"),
    ("layers_per_block", "2", "a positive integer"),
    ("latent_channels", True, "a positive integer"),
    ("norm_num_groups", 0, "a positive integer"),
    ("scaling_factor", "0.18215", "a number"),
    ("shift_factor", [0.1], "a number or null"),
    ("use_quant_conv", "yes", "true or false"),
    ("down_block_types", "DownEncoderBlock2D", "a list of strings"),
    ("act_fn", 1, "a string")])
def test_config_json_of_wrong_types_names_the_file_and_setting(tmp_path, key, value, expected):
  """Valid JSON, wrong types: one line naming the file and the setting, not a TypeError from
  deep inside the config."""
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**VAEConfig(**SD_VAE).to_dict(), key: value}))
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {key}: expected {expected}, "
                                       rf"got {re.escape(json.dumps(value))}$"):
    VAEConfig.from_json(str(tmp_path))


def test_released_sd_vae_layout():
  """The sd-vae-ft-ema/mse layout: 248 tensors, 83,653,863 parameters, 8x downsampling."""
  config = VAEConfig(**SD_VAE)
  shapes = expected_shapes(config)
  assert len(shapes) == 248 and sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  vae = AutoencoderKL(config)
  params = jax.eval_shape(lambda: vae.init_params(jax.random.key(0)))
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  latents = jax.eval_shape(lambda p, x: vae.encode_to_latents(p, x, jax.random.key(0)),
                           params, images)
  assert latents.shape == (2, 32, 32, 4)
  decoded = jax.eval_shape(vae.decode_latents, params, latents)
  assert decoded.shape == (2, 256, 256, 3)
  # Without the optional parts their weights are neither expected nor accepted.
  lean = VAEConfig(**SD_VAE, use_quant_conv=False, use_post_quant_conv=False,
                   mid_block_add_attention=False)
  paths = {"/".join(p) for p in expected_shapes(lean)}
  assert len(paths) == 248 - 4 - 2 * 10
  assert not any("quant_conv" in p or "attentions" in p for p in paths)


def test_group_norm_eps_and_two_pass_variance():
  """GroupNorm(eps 1e-6) against float64 math, on a small spread around a nonzero mean.

  The fixture's activations have variance ~1, where eps 1e-5 instead of 1e-6 stays under the
  1e-4 parity bound; here eps 1e-5 is off by ~0.3 and flax's one-pass variance by ~4e-3.
  (torch's own float32 CPU GroupNorm is off by ~2e-3 here, so float64 is the reference.)
  """
  from dit_jax.vae.model import group_norm
  rng = np.random.default_rng(0)
  x = (0.5 + 3e-3 * rng.standard_normal((2, 8, 8, 16))).astype(np.float32)
  groups = x.astype(np.float64).reshape(2, 8, 8, 4, 4)  # channels split into 4 groups of 4
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = groups.var(axis=(1, 2, 4), keepdims=True)
  expected = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
  norm = group_norm(4, "norm", jnp.float32, jnp.float32)
  params = norm.init(jax.random.key(0), x)
  assert_rel_close(norm.apply(params, x), expected, 1e-4, "group_norm")
