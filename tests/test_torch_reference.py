"""benchmarks/torch_reference.py and torch_dit.py, the PyTorch baseline: parity with the official
outputs (tests/fixtures/dit_reference), its train step, guided sampling loop and command line."""
import copy

import numpy as np
import pytest
import torch

from benchmarks import torch_dit
from benchmarks import torch_reference as tr
from conftest import fixture_path
from test_models import PARAMS  # the facts doc's parameter counts, keyed "DiT-S/2"

TABLES = ["betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2"]


def tiny_config(dit_ref) -> dict:
  """The fixture model's settings (depth 1, hidden 64, 4 heads, patch 2, 8x8x4, 10 classes)."""
  return {str(k): int(v) for k, v in zip(dit_ref["config_names"], dit_ref["config"])}


def official_state_dict() -> dict:
  return torch.load(fixture_path("dit_reference", "tiny_dit.pt"), weights_only=True)


def tiny_model(dit_ref, attention: str = "fused") -> torch_dit.DiT:
  """The fixture's model with the official weights, in eval mode."""
  model = torch_dit.DiT(**tiny_config(dit_ref), attention=attention)
  model.load_state_dict(official_state_dict(), strict=True)
  return model.eval()


def tensors(dit_ref, *keys):
  return [torch.from_numpy(np.asarray(dit_ref[k])) for k in keys]


def fixed_output(output: torch.Tensor, calls: list):
  """A model stub returning `output` whatever its inputs, recording (x, t, kwargs) per call."""
  def model(x, t, **kwargs):
    calls.append((x, t, kwargs))
    return output
  return model


# ------------------------------------------------------------------------------------------------
# The model.

def test_state_dict_names_shapes_and_fixed_pos_embed(dit_ref):
  state = official_state_dict()
  model = torch_dit.DiT(**tiny_config(dit_ref))
  ours = model.state_dict()
  assert {k: tuple(v.shape) for k, v in ours.items()} == {
      k: tuple(v.shape) for k, v in state.items()}
  # Built, not loaded: the fixed sin-cos table equals the official one, and is not trained.
  torch.testing.assert_close(ours["pos_embed"], state["pos_embed"], rtol=1e-6, atol=1e-7)
  assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("attention", torch_dit.ATTENTION)
def test_forward_matches_official(dit_ref, attention):
  model = tiny_model(dit_ref, attention)
  x, t, y = tensors(dit_ref, "fwd_x", "fwd_t", "fwd_y")
  with torch.no_grad():
    out = model(x, t, y)
  assert out.dtype == torch.float32
  np.testing.assert_allclose(out.numpy(), dit_ref["fwd_out"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", torch_dit.ATTENTION)
def test_forward_with_cfg_matches_official(dit_ref, attention):
  model = tiny_model(dit_ref, attention)
  x, t, y = tensors(dit_ref, "cfg_x", "cfg_t", "cfg_y")
  with torch.no_grad():
    out = model.forward_with_cfg(x, t, y, float(dit_ref["cfg_scale"]))
  np.testing.assert_allclose(out.numpy(), dit_ref["cfg_out"], rtol=1e-5, atol=1e-6)


def test_label_dropout_only_in_training(dit_ref):
  """Training drops labels to the null class (p = 0.1); eval never does."""
  model = tiny_model(dit_ref)
  labels = torch.zeros(4000, dtype=torch.int64)
  torch.manual_seed(0)
  table = model.y_embedder.embedding_table.weight
  with torch.no_grad():
    evaluated = model.y_embedder(labels, model.training)
    model.train()
    trained = model.y_embedder(labels, model.training)
  assert torch.equal(evaluated, table[0].expand_as(evaluated))
  is_null = (trained == table[10]).all(dim=1)
  assert torch.equal(trained[~is_null], table[0].expand(int((~is_null).sum()), -1))
  assert 0.08 < is_null.float().mean() < 0.12


@pytest.mark.parametrize("variant", list(PARAMS))
def test_variant_parameter_counts(variant):
  with torch.device("meta"):
    model = torch_dit.create_model(variant)
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[variant]


def test_initial_model_outputs_zeros():
  """Official init (adaLN-Zero): zero output whatever the input."""
  torch.manual_seed(0)
  model = torch_dit.DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=7).eval()
  with torch.no_grad():
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 7]))
  assert out.shape == (3, 8, 8, 8)
  assert torch.count_nonzero(out) == 0
  assert model.blocks[0].attn.qkv.weight.std() > 0.01  # xavier, not zero


# ------------------------------------------------------------------------------------------------
# The diffusion.

@pytest.mark.parametrize("name", TABLES)
def test_tables_match_official(dit_ref, name):
  diffusion = tr.create_diffusion("")
  assert diffusion.num_timesteps == 1000
  np.testing.assert_allclose(getattr(diffusion, name), dit_ref[f"diff_{name}"], rtol=1e-12,
                             atol=0)


@pytest.mark.parametrize("key", ["250", "ddim50", "25_15_10", "100", "1000"])
def test_respacing_matches_official(dit_ref, key):
  diffusion = tr.create_diffusion(key.replace("_", ","))
  np.testing.assert_array_equal(diffusion.timestep_map, dit_ref[f"respace_{key}"])


def test_respaced_250_process_matches_official(dit_ref):
  diffusion = tr.create_diffusion("250")
  np.testing.assert_allclose(diffusion.betas, dit_ref["d250_betas"], rtol=1e-12, atol=0)
  np.testing.assert_array_equal(diffusion.timestep_map, dit_ref["d250_timestep_map"])


def test_training_losses_match_official(dit_ref):
  x_start, t, noise, output = tensors(dit_ref, "loss_x_start", "loss_t", "loss_noise",
                                      "loss_model_output")
  calls = []
  terms = tr.create_diffusion("").training_losses(fixed_output(output, calls), x_start, t,
                                                  dict(y=torch.tensor([1, 2, 3, 4])), noise)
  for name in ("loss", "mse", "vb"):
    assert terms[name].shape == (4,)
    np.testing.assert_allclose(terms[name].numpy(), dit_ref[f"loss_{name}"], rtol=1e-6, atol=0)
  (_, model_t, kwargs), = calls
  assert torch.equal(model_t, t) and torch.equal(kwargs["y"], torch.tensor([1, 2, 3, 4]))


def test_vb_term_trains_only_the_variance(dit_ref):
  """The VB term sees the mean prediction detached: its gradient reaches only the variance
  channels, the MSE's only the eps channels."""
  x_start, t, noise, output = tensors(dit_ref, "loss_x_start", "loss_t", "loss_noise",
                                      "loss_model_output")
  output.requires_grad_(True)
  terms = tr.create_diffusion("").training_losses(fixed_output(output, []), x_start, t,
                                                  noise=noise)
  vb_grad, = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
  mse_grad, = torch.autograd.grad(terms["mse"].sum(), output)
  assert torch.count_nonzero(vb_grad[:, :4]) == 0 and torch.count_nonzero(vb_grad[:, 4:]) > 0
  assert torch.count_nonzero(mse_grad[:, 4:]) == 0 and torch.count_nonzero(mse_grad[:, :4]) > 0


def test_p_mean_variance_matches_official(dit_ref):
  x, t, output = tensors(dit_ref, "pmv_x", "pmv_t", "pmv_model_output")
  calls = []
  out = tr.create_diffusion("250").p_mean_variance(fixed_output(output, calls), x, t,
                                                   clip_denoised=False)
  for name in ("mean", "variance", "log_variance", "pred_xstart"):
    assert out[name].dtype == torch.float32
    np.testing.assert_allclose(out[name].numpy(), dit_ref[f"pmv_{name}"], rtol=1e-6, atol=1e-9,
                               err_msg=name)
  # The model saw the original step numbers of respaced steps 0, 1, 124, 249.
  np.testing.assert_array_equal(calls[0][1].numpy(), dit_ref["d250_timestep_map"][t.numpy()])


def test_p_sample_loop_steps_down_original_timesteps_without_final_noise(dit_ref):
  diffusion = tr.create_diffusion("5")  # steps 0, 250, 500, 749, 999
  output = torch.from_numpy(dit_ref["pmv_model_output"])
  calls = []
  model = fixed_output(output, calls)
  torch.manual_seed(0)
  final = diffusion.p_sample_loop(model, (4, 4, 8, 8), clip_denoised=False)
  assert [c[1].tolist() for c in calls] == [[s] * 4 for s in (999, 749, 500, 250, 0)]
  # The last step (t = 0) adds no noise: the sample is that step's posterior mean.
  last_x = calls[-1][0]
  mean = diffusion.p_mean_variance(model, last_x, torch.zeros(4, dtype=torch.int64),
                                   clip_denoised=False)["mean"]
  assert torch.equal(final, mean)
  # The steps before do: the sample is not the mean.
  x3 = calls[-2][0]
  step = diffusion.p_sample(model, x3, torch.full((4,), 1), clip_denoised=False)
  assert not torch.allclose(step["sample"], diffusion.p_mean_variance(
      model, x3, torch.full((4,), 1), clip_denoised=False)["mean"])


# ------------------------------------------------------------------------------------------------
# train.py's step, sample.py's loop, the command line.

def test_train_step_updates_model_and_ema(dit_ref):
  model = tiny_model(dit_ref).train()
  before = copy.deepcopy(model)
  ema = tr.make_ema(model)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  diffusion = tr.create_diffusion("")
  x, y = torch.from_numpy(dit_ref["fwd_x"]), torch.tensor([0, 3, 9, 5])
  torch.manual_seed(7)
  loss = tr.train_step(model, ema, opt, diffusion, x, y)
  # The same draws (t, noise, label dropout) on the weights before the step give the loss.
  torch.manual_seed(7)
  t = torch.randint(0, 1000, (4,))
  expected = diffusion.training_losses(before, x, t, dict(y=y))["loss"].mean().item()
  assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-6)
  old, new, averaged = (dict(m.named_parameters()) for m in (before, model, ema))
  for name, p in new.items():
    step = (p - old[name]).abs()
    if name == "pos_embed":
      assert torch.equal(p, old[name])
    else:  # AdamW's first step moves each weight by at most lr
      assert step.max() <= 1e-4 * (1 + 1e-3) and step.max() > 0.5e-4, name
    torch.testing.assert_close(averaged[name], 0.9999 * old[name] + 0.0001 * p, rtol=1e-6,
                               atol=1e-9)


def test_guided_sampling_as_sample_py(dit_ref, monkeypatch):
  model = tiny_model(dit_ref)
  calls = []
  guided = model.forward_with_cfg

  def recording(x, t, y, cfg_scale):
    calls.append((x, t, y, cfg_scale, torch.is_grad_enabled()))
    return guided(x, t, y, cfg_scale)
  monkeypatch.setattr(model, "forward_with_cfg", recording)
  torch.manual_seed(0)
  out = tr.sample(model, tr.create_diffusion("5"), torch.tensor([1, 2]))
  assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
  assert [c[1].tolist() for c in calls] == [[s] * 4 for s in (999, 749, 500, 250, 0)]
  x0, _, y0, scale, _ = calls[0]
  assert torch.equal(x0[:2], x0[2:])  # the same noise in both halves
  assert y0.tolist() == [1, 2, 10, 10] and scale == 4.0
  assert not any(c[4] for c in calls)  # under torch.no_grad


def test_command_line_tiny(capsys):
  tr.main(["--tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--sample_images", "1",
           "--sample_steps", "3", "--attention", "explicit"])
  rows = dict(line.strip("|").split("|", 1) for line in capsys.readouterr().out.splitlines()
              if line.startswith("| ") and not line.startswith("| |"))
  rows = {k.strip(): v.strip() for k, v in rows.items()}
  assert rows["torch"] == torch.__version__
  assert int(rows["threads"]) == torch.get_num_threads()
  assert "explicit attention" in rows["model"]
  train = rows["train img/s (batch 2, 2 steps after 1)"]
  assert float(train) > 0
  sampling = rows["guided sampling s (1 images, 3 DDPM steps, cfg 4)"]
  seconds, img_s = sampling.split(" (")
  assert float(img_s.split()[0]) == pytest.approx(1 / float(seconds), rel=0.01)


def test_command_line_rejects_unknown_variant():
  with pytest.raises(ValueError, match="unknown DiT variant"):
    tr.main(["--model", "M/2", "--skip_train", "--skip_sample"])
