"""The FID InceptionV3 against pytorch-fid (seeded random weights), its resize and converter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, fixture_path
from dit_jax.eval import inception
from dit_jax.eval.inception import FidInceptionV3, resize_bilinear
from dit_jax.eval.inception_convert import (FID_WEIGHTS_URL, convert_state_dict,
                                            expected_state_dict_shapes, load_fid_inception)


def _rebuild_state_dict(ref) -> dict[str, np.ndarray]:
  """The fixture's random weights, redrawn in state_dict order (recipe in the README)."""
  rng = np.random.RandomState(int(ref["seed"]))
  state_dict = {}
  for key, shape_str in zip(ref["keys"].tolist(), ref["shapes"].tolist()):
    shape = tuple(int(s) for s in shape_str.split(",")) if shape_str else ()
    if key.endswith("num_batches_tracked"):
      state_dict[key] = np.zeros(shape, np.int64)  # Draws nothing.
      continue
    w = rng.standard_normal(shape)
    if key.endswith("running_var"):
      value = 1 + 0.1 * np.abs(w)
    elif key.endswith("running_mean"):
      value = 0.1 * w
    elif ".bn." in key:
      value = 1 + 0.1 * w if key.endswith("weight") else 0.1 * w
    elif key.endswith("bias"):
      value = 0.1 * w
    else:
      value = w / np.sqrt(np.prod(shape[1:]))
    state_dict[key] = value.astype(np.float32)
  return state_dict


@pytest.fixture(scope="module")
def ref():
  with np.load(fixture_path("inception_reference", "fid_inception_seed0.npz")) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def state_dict(ref):
  return _rebuild_state_dict(ref)


@pytest.fixture(scope="module")
def variables(state_dict, tmp_path_factory):
  """Converted through the real entry point: a .pth file written with torch.save."""
  path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
  return load_fid_inception(path)


@pytest.fixture(scope="module")
def outputs(ref, variables):
  """One jitted forward of the fixture images, also capturing Mixed_6d's 1x1 branch."""
  def forward(variables, images):
    return FidInceptionV3().apply(
        variables, images, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.path == ("Mixed_6d", "branch1x1"))
  out, state = jax.jit(forward)(variables, ref["images"].astype(np.float32) / 255.0)
  branch1x1 = state["intermediates"]["Mixed_6d"]["branch1x1"]["__call__"][0]
  return {k: np.asarray(v) for k, v in out.items()}, np.asarray(branch1x1)


def test_pool3_and_logits_match_pytorch_fid(ref, outputs):
  out, _ = outputs
  assert_rel_close(out["pool3"], ref["pool3"], 1e-4, "pool3")
  assert_rel_close(out["logits"], ref["logits"], 1e-4, "logits")


def test_differences_between_images_match_pytorch_fid(ref, outputs):
  # With random weights the deep features barely depend on the image (images differ by
  # ~2e-5 relative), so the 1e-4 check above is blind to input handling: an align_corners=True
  # resize still passes it at 1e-5. The image-to-image differences are not: float32 round-off
  # leaves them ~0.6% (pool3) / ~2% (logits) off, align_corners=True ~60%, nearest ~150%.
  out, _ = outputs
  for name, rtol in [("pool3", 5e-2), ("logits", 1e-1)]:
    ours = out[name].astype(np.float64)
    theirs = ref[name].astype(np.float64)
    assert_rel_close(ours[1:] - ours[:1], theirs[1:] - theirs[:1], rtol, f"{name} differences")


def test_outputs_and_sfid_feature(outputs, variables):
  out, branch1x1 = outputs
  n = len(out["pool3"])
  assert out["pool3"].shape == (n, 2048)
  assert out["logits"].shape == (n, 1008)
  assert out["spatial"].shape == (n, inception.SPATIAL_DIM) == (n, 17 * 17 * 7)
  # spatial is TF mixed_6/conv = Mixed_6d.branch1x1 (after BN + ReLU), first 7 channels,
  # flattened in NHWC order as ADM does.
  assert branch1x1.shape == (n, 17, 17, 192)
  np.testing.assert_array_equal(out["spatial"], branch1x1[..., :7].reshape(n, -1))
  assert np.all(out["spatial"] >= 0) and np.any(out["spatial"] > 0)
  # logits_unbiased leaves out fc.bias (ADM's Inception Score input).
  bias = np.asarray(variables["params"]["fc"]["bias"])
  np.testing.assert_allclose(out["logits"] - out["logits_unbiased"],
                             np.broadcast_to(bias, (n, 1008)), atol=1e-6)


def test_inception_features_batches_uint8_and_pads(ref, variables, outputs):
  out, _ = outputs
  images = ref["images"]
  # Two input batches, the first cut into a full and a padded chunk of 2.
  feats = inception.inception_features(variables, [images[:2], images[2:]], batch_size=2)
  for name in ("pool3", "logits", "logits_unbiased", "spatial"):
    assert feats[name].shape == out[name].shape
    np.testing.assert_allclose(feats[name], out[name], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    inception.inception_features(variables, [images.astype(np.float32)], batch_size=2)


@pytest.mark.parametrize("in_hw,out_hw", [
    ((64, 64), (299, 299)),  # Upsampling (the fixture's case).
    ((517, 389), (299, 299)),  # Downsampling: torch does not antialias.
    ((37, 50), (299, 123)),  # Mixed, non-square.
    ((299, 299), (299, 299)),  # Identity.
])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
  rng = np.random.RandomState(0)
  x = rng.uniform(size=(2,) + in_hw + (3,)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw,
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(resize_bilinear(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(got, expected, rtol=0, atol=5e-7)
  if in_hw == out_hw:
    np.testing.assert_array_equal(got, x)


def test_jax_image_resize_would_antialias():
  # Why resize_bilinear exists: jax.image.resize smooths when downsampling, torch does not.
  x = np.random.RandomState(1).uniform(size=(1, 517, 389, 3)).astype(np.float32)
  ours = np.asarray(resize_bilinear(jnp.asarray(x), (299, 299)))
  antialiased = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear"))
  assert np.max(np.abs(ours - antialiased)) > 0.1


def test_converter_reports_every_bad_key(state_dict):
  bad = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  del bad["Mixed_6d.branch1x1.bn.running_var"]
  bad["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError) as info:
    convert_state_dict(bad)
  message = str(info.value)
  assert "3 problem(s)" in message  # num_batches_tracked keys are optional.
  assert "missing key 'Mixed_6d.branch1x1.bn.running_var'" in message
  assert ("key 'Mixed_7c.branch_pool.conv.weight' has shape (192, 2048, 3, 3), "
          "expected (192, 2048, 1, 1)") in message
  assert "unexpected key 'AuxLogits.fc.weight'" in message


def test_converter_layouts(state_dict, variables):
  params, stats = variables["params"], variables["batch_stats"]
  conv = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # [out, in, 1, 7]
  np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                np.transpose(conv, (2, 3, 1, 0)))
  np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
  bn = params["Conv2d_1a_3x3"]["bn"]
  np.testing.assert_array_equal(bn["scale"], state_dict["Conv2d_1a_3x3.bn.weight"])
  np.testing.assert_array_equal(bn["bias"], state_dict["Conv2d_1a_3x3.bn.bias"])
  np.testing.assert_array_equal(stats["Conv2d_1a_3x3"]["bn"]["var"],
                                state_dict["Conv2d_1a_3x3.bn.running_var"])
  expected = expected_state_dict_shapes()
  fixture_keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
  assert list(expected) and set(expected) == set(fixture_keys)
  assert all(expected[k] == state_dict[k].shape for k in fixture_keys)


def test_missing_weights_file_names_path_and_source(tmp_path):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  with pytest.raises(FileNotFoundError) as info:
    load_fid_inception(path)
  assert str(path) in str(info.value) and FID_WEIGHTS_URL in str(info.value)
