"""Official PyTorch weight import/export, the orbax checkpoint CLI, and their errors."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_rel_close, fixture_path, nchw_to_nhwc
from dit_jax import checkpoints
from dit_jax.diffusion import OFFICIAL_PROCESS
from dit_jax.convert import (load_torch_checkpoint, read_torch_file, save_torch_checkpoint,
                             to_torch_state_dict)
from dit_jax.models import DiT

TINY_ARGS = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "64", "--num-heads", "4",
             "--image-size", "64", "--num-classes", "10"]


def tiny_model(**overrides) -> DiT:
  return DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                       num_heads=4, num_classes=10), **overrides})


@pytest.fixture(scope="module")
def official_state():
  path = fixture_path("dit_reference", "tiny_dit.pt")
  return {k: v.numpy() for k, v in torch.load(path, map_location="cpu").items()}


def test_round_trip_reproduces_official_state_dict(official_state):
  for scan_blocks in (False, True):
    model = tiny_model(scan_blocks=scan_blocks)
    params = load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), model)
    exported = to_torch_state_dict(params, model)
    # What load_state_dict(strict=True) checks: the same keys with the same shapes.
    assert list(exported) == list(exported) and set(exported) == set(official_state)
    for key, value in official_state.items():
      assert exported[key].shape == value.shape, key
      if key == "pos_embed":
        np.testing.assert_allclose(exported[key], value, atol=1e-6)
      else:
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_saved_export_loads_with_torch(tmp_path, official_state):
  model = tiny_model()
  params = load_torch_checkpoint(str(fixture_path("dit_reference", "tiny_dit.pt")), model)
  out = tmp_path / "export.pt"
  save_torch_checkpoint(params, model, str(out))
  loaded = torch.load(out, map_location="cpu", weights_only=True)
  assert set(loaded) == set(official_state)
  assert all(loaded[k].dtype == torch.float32 for k in loaded)
  np.testing.assert_array_equal(loaded["blocks.0.attn.qkv.weight"].numpy(),
                                official_state["blocks.0.attn.qkv.weight"])
  with pytest.raises(FileExistsError, match="--torch-out"):
    save_torch_checkpoint(params, model, str(out))


def test_training_checkpoint_picks_ema_or_model(tmp_path, official_state):
  ema = {k: torch.from_numpy(v) for k, v in official_state.items()}
  raw = {k: v + 1.0 if k != "pos_embed" else v for k, v in ema.items()}
  path = tmp_path / "0400000.pt"
  torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
              "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
  key = "final_layer.linear.bias"
  np.testing.assert_array_equal(read_torch_file(str(path))[key], official_state[key])
  np.testing.assert_array_equal(read_torch_file(str(path), use_ema=False)[key],
                                official_state[key] + 1.0)
  params = load_torch_checkpoint(str(path), tiny_model(), use_ema=False)
  np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"],
                                official_state[key] + 1.0)


def test_wrong_size_checkpoint_names_key_and_shapes():
  path = str(fixture_path("dit_reference", "tiny_dit.pt"))
  with pytest.raises(ValueError, match=r"'final_layer\.linear\.bias' has shape \(32,\) "
                     r"but .* expects \(128,\)"):
    load_torch_checkpoint(path, tiny_model(patch_size=4))
  with pytest.raises(ValueError, match=r"'blocks\.0\.adaLN_modulation\.1\.bias' has shape "
                     r"\(384,\) but .* expects \(192,\)"):
    load_torch_checkpoint(path, tiny_model(hidden_size=32))
  with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.adaLN_modulation\.1\.bias'"):
    load_torch_checkpoint(path, tiny_model(depth=2))


def test_unexpected_and_missing_keys(tmp_path, official_state):
  state = {k: torch.from_numpy(v) for k, v in official_state.items()}
  extra = dict(state, **{"blocks.1.attn.qkv.weight": state["blocks.0.attn.qkv.weight"]})
  torch.save(extra, tmp_path / "extra.pt")
  with pytest.raises(ValueError, match=r"unexpected key\(s\) \['blocks\.1\.attn\.qkv\.weight'\]"):
    load_torch_checkpoint(str(tmp_path / "extra.pt"), tiny_model())
  missing = {k: v for k, v in state.items() if k != "y_embedder.embedding_table.weight"}
  torch.save(missing, tmp_path / "missing.pt")
  with pytest.raises(ValueError, match="missing key 'y_embedder.embedding_table.weight'"):
    load_torch_checkpoint(str(tmp_path / "missing.pt"), tiny_model())
  with pytest.raises(FileNotFoundError, match="--torch"):
    load_torch_checkpoint(str(tmp_path / "absent.pt"), tiny_model())


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dit_jax.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # an end-to-end run of the program
def test_cli_import_export(tmp_path, dit_ref, official_state):
  out = tmp_path / "ckpt"
  result = run_cli("--torch", str(fixture_path("dit_reference", "tiny_dit.pt")), *TINY_ARGS,
                   "--out", str(out))
  assert result.returncode == 0, result.stderr
  config, step = checkpoints.load_config(str(out))
  assert step == 0 and config["model"]["hidden_size"] == 64 and config["image_size"] == 64
  model, params = checkpoints.load_params(str(out))
  assert model == tiny_model()
  # It records the official process: sample.py samples it with linear betas, 1000 steps, eps.
  assert checkpoints.load_for_sampling(str(out))[1] == OFFICIAL_PROCESS
  fwd = model.apply({"params": params}, nchw_to_nhwc(dit_ref["fwd_x"]), dit_ref["fwd_t"],
                    dit_ref["fwd_y"])
  assert_rel_close(fwd, nchw_to_nhwc(dit_ref["fwd_out"]), name="fwd_out from checkpoint")
  scanned, stacked = checkpoints.load_params(str(out), scan_blocks=True)
  assert scanned.scan_blocks and stacked["blocks"]["mlp"]["fc1"]["kernel"].shape == (1, 64, 256)

  # Nothing already written is overwritten.
  again = run_cli("--torch", str(fixture_path("dit_reference", "tiny_dit.pt")), *TINY_ARGS,
                  "--out", str(out))
  assert again.returncode != 0 and "--out" in again.stderr and "refusing" in again.stderr

  pt = tmp_path / "back.pt"
  result = run_cli("--from-checkpoint", str(out), "--torch-out", str(pt))
  assert result.returncode == 0, result.stderr
  back = torch.load(pt, map_location="cpu", weights_only=True)
  assert set(back) == set(official_state)
  np.testing.assert_array_equal(back["x_embedder.proj.weight"].numpy(),
                                official_state["x_embedder.proj.weight"])


def test_cli_wrong_model_is_one_clear_error(tmp_path):
  result = run_cli("--torch", str(fixture_path("dit_reference", "tiny_dit.pt")), "--model",
                   "DiT-B/4", "--image-size", "64", "--num-classes", "10",
                   "--out", str(tmp_path / "ckpt"))
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert "has shape" in lines[0] and "expects" in lines[0]
  assert not (tmp_path / "ckpt").exists()


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line of stderr, `error: ...`, of a refused run (no traceback, nothing else)."""
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_training_checkpoint_entry_that_is_not_a_state_dict(tmp_path, official_state):
  path = tmp_path / "weird.pt"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official_state.items()}, "ema": 5},
             path)
  with pytest.raises(ValueError, match=r"weird\.pt: entry 'ema' is a int, not a state_dict"):
    read_torch_file(str(path))
  result = run_cli("--torch", str(path), *TINY_ARGS, "--out", str(tmp_path / "ckpt"))
  assert "entry 'ema'" in error_line(result) and "weird.pt" in result.stderr
  assert not (tmp_path / "ckpt").exists()


def test_import_and_export_flags_together_are_refused(tmp_path):
  result = run_cli("--torch", str(fixture_path("dit_reference", "tiny_dit.pt")), *TINY_ARGS,
                   "--out", str(tmp_path / "ckpt"), "--from-checkpoint", str(tmp_path / "c"),
                   "--torch-out", str(tmp_path / "back.pt"))
  line = error_line(result)
  assert "--torch --out (import)" in line and "--from-checkpoint --torch-out (export)" in line
  assert not list(tmp_path.iterdir())
