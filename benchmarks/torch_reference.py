"""The official PyTorch DiT, ported for this project: the baseline of the speed targets.

  python -m benchmarks.torch_reference --model S/2 --batch 8 --steps 10

The project's targets are ratios against the official PyTorch code (facebookresearch/DiT) on the
same machine: train step >= 1.3x, guided sampling >= 2x. That code cannot be fetched here, so
this module is a port written for this project from the math and from dit_jax (whose outputs
match the official ones): the model in `benchmarks.torch_dit` (the official module and
state_dict names), here the Gaussian diffusion as
`create_diffusion` builds it (linear betas, learned-range variance, hybrid MSE + VB loss,
respacing with the model called at the original timesteps), the official train.py step on
latents (AdamW, EMA) and sample.py's guided DDPM loop. tests/test_torch_reference.py checks it
against the official reference fixture (tests/fixtures/dit_reference/tiny_dit.{pt,npz}).

The CLI times the same work as
  python -m benchmarks.train_throughput --variants S/2 --batch 8 --dtype float32
  python -m benchmarks.sampling_speed --models S/2 --samplers ddpm --batch 4 --num_steps 50
on 256 px (32x32x4 latents, 1000 classes), float32, and prints a Markdown table. Left out, as
they do not change the timed arithmetic on one CPU: the VAE and data loader (latents are
random), DistributedDataParallel (one process: no gradient all-reduce), the zero-probability
dropouts and identity norms of timm's layers. The host-side float64 tables come from the same
numpy schedule functions as dit_jax (`dit_jax.diffusion.schedules`), which do not start JAX.
"""
import argparse
import copy
import math
import platform
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from benchmarks.torch_dit import ATTENTION, DiT, create_model
from dit_jax.diffusion.schedules import get_named_beta_schedule, respace_betas, space_timesteps

# ------------------------------------------------------------------------------------------------
# The Gaussian diffusion (official diffusion/ package, DiT's settings: eps prediction,
# learned-range variance).

def mean_flat(x: torch.Tensor) -> torch.Tensor:
  return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
  """Log probability of x in [-1, 1] under a Gaussian discretized into 256 bins (tanh CDF)."""
  def cdf(v):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * torch.pow(v, 3))))
  inv_stdv = torch.exp(-log_scales)
  cdf_plus = cdf(inv_stdv * (x - means + 1.0 / 255.0))
  cdf_min = cdf(inv_stdv * (x - means - 1.0 / 255.0))
  log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
  log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
  log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
  return torch.where(x < -0.999, log_cdf_plus,
                     torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
  """arr[t] as float32, broadcast to shape (official `_extract_into_tensor`)."""
  res = torch.from_numpy(arr)[t].float()
  return res.reshape(res.shape + (1,) * (len(shape) - res.ndim)) + torch.zeros(shape)


class SpacedDiffusion:
  """The official (Spaced)GaussianDiffusion with learned-range variance and eps prediction.

  `t` arguments index this process; the model is called with `timestep_map[t]`, the original
  step numbers. Tables are float64 numpy, read as float32 tensors.
  """

  def __init__(self, use_timesteps: set[int], betas: np.ndarray,
               rescale_learned_sigmas: bool = False):
    betas, self.timestep_map = respace_betas(betas, use_timesteps)
    self.betas, self.num_timesteps = betas, len(betas)
    self.rescale_learned_sigmas = rescale_learned_sigmas  # official LossType.RESCALED_MSE
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev)
                                 / (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))

  def _wrap(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The official `_WrappedModel`: respaced step indices -> original step numbers."""
    def wrapped(x, t, **kwargs):
      return model(x, torch.tensor(self.timestep_map, dtype=t.dtype)[t], **kwargs)
    return wrapped

  def q_sample(self, x_start, t, noise):
    return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
    return (mean, _extract(self.posterior_variance, t, x_t.shape),
            _extract(self.posterior_log_variance_clipped, t, x_t.shape))

  def p_mean_variance(self, model, x, t, clip_denoised: bool = True,
                      model_kwargs: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """p(x_{t-1} | x_t): dict of [N, C, H, W] mean, variance, log_variance, pred_xstart."""
    return self._p_mean_variance(self._wrap(model), x, t, clip_denoised, model_kwargs)

  def _p_mean_variance(self, model, x, t, clip_denoised, model_kwargs):
    c = x.shape[1]
    model_output, var_values = torch.split(model(x, t, **(model_kwargs or {})), c, dim=1)
    # var_values in [-1, 1] spans [posterior variance, beta] in log space.
    min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
    max_log = _extract(np.log(self.betas), t, x.shape)
    frac = (var_values + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = (_extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
                   - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
    if clip_denoised:
      pred_xstart = pred_xstart.clamp(-1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  def training_losses(self, model, x_start, t, model_kwargs: Optional[dict] = None,
                      noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Hybrid loss per example ([N] each): mse on eps, plus the VB term (bits) that trains the
    variance only (the mean prediction detached); loss = mse + vb."""
    noise = torch.randn_like(x_start) if noise is None else noise
    x_t = self.q_sample(x_start, t, noise)
    c = x_t.shape[1]
    model_output, var_values = torch.split(
        self._wrap(model)(x_t, t, **(model_kwargs or {})), c, dim=1)
    frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
    out = self._p_mean_variance(lambda *_, **__: frozen_out, x_t, t, False, None)
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = mean_flat(-discretized_gaussian_log_likelihood(
        x_start, out["mean"], 0.5 * out["log_variance"]))
    vb = torch.where(t == 0, decoder_nll, kl) / math.log(2.0)
    if self.rescale_learned_sigmas:
      vb = vb * (self.num_timesteps / 1000.0)
    mse = mean_flat((noise - model_output) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

  def p_sample(self, model, x, t, clip_denoised: bool = True,
               model_kwargs: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t == 0): dict(sample, pred_xstart)."""
    out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x)
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  def p_sample_loop(self, model, shape, noise: Optional[torch.Tensor] = None,
                    clip_denoised: bool = True, model_kwargs: Optional[dict] = None
                    ) -> torch.Tensor:
    """Ancestral sampling over every step of this process, from noise (or torch.randn)."""
    img = torch.randn(*shape) if noise is None else noise
    for i in reversed(range(self.num_timesteps)):
      with torch.no_grad():
        img = self.p_sample(model, img, torch.tensor([i] * shape[0]), clip_denoised,
                            model_kwargs)["sample"]
    return img


def create_diffusion(timestep_respacing: str, noise_schedule: str = "linear",
                     rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
  """The official `create_diffusion` with learn_sigma=True ("" keeps every step)."""
  return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps]),
                         get_named_beta_schedule(noise_schedule, diffusion_steps),
                         rescale_learned_sigmas)


# ------------------------------------------------------------------------------------------------
# train.py's step and sample.py's loop.

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
  ema_params = dict(ema.named_parameters())
  for name, param in model.named_parameters():
    ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def make_ema(model: nn.Module) -> nn.Module:
  """train.py's EMA copy: frozen, in eval mode, starting at the model's weights."""
  ema = copy.deepcopy(model).requires_grad_(False)
  return ema.eval()


def train_step(model: DiT, ema: DiT, opt: torch.optim.Optimizer, diffusion: SpacedDiffusion,
               x: torch.Tensor, y: torch.Tensor) -> float:
  """One official step on latents x [N, C, H, W] and labels y [N]; returns the loss."""
  t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
  loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
  opt.zero_grad()
  loss.backward()
  opt.step()
  update_ema(ema, model)
  return loss.item()


def sample(model: DiT, diffusion: SpacedDiffusion, y: torch.Tensor,
           cfg_scale: float = 4.0) -> torch.Tensor:
  """sample.py's guided loop for labels y [n]: [2n, C, H, W] latents, the first n the samples."""
  n, size = len(y), model.input_size
  z = torch.randn(n, model.in_channels, size, size)
  z = torch.cat([z, z], 0)
  y = torch.cat([y, torch.full_like(y, model.y_embedder.num_classes)], 0)
  with torch.no_grad():
    return diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                   model_kwargs=dict(y=y, cfg_scale=cfg_scale))


# ------------------------------------------------------------------------------------------------
# The benchmark.

def speed_model(args: argparse.Namespace) -> DiT:
  """The benchmarked model: official init plus normal(0.02) noise on every trained weight (so
  no zero adaLN gate makes the output trivial), as benchmarks/sampling_speed does."""
  torch.manual_seed(0)
  if args.tiny:  # the fixture's architecture, for tests
    model = DiT(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10,
                attention=args.attention)
  else:
    model = create_model(args.model, attention=args.attention)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(0.02 * torch.randn_like(p))
  return model


def time_training(model: DiT, args: argparse.Namespace) -> float:
  """img/s of train_step over args.steps after args.warmup steps (random latents)."""
  x = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size)
  y = torch.arange(args.batch) % model.y_embedder.num_classes
  ema = make_ema(model)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  diffusion = create_diffusion("")
  model.train()
  for _ in range(args.warmup):
    train_step(model, ema, opt, diffusion, x, y)
  start = time.perf_counter()
  for _ in range(args.steps):
    train_step(model, ema, opt, diffusion, x, y)
  return args.steps * args.batch / (time.perf_counter() - start)


def time_sampling(model: DiT, args: argparse.Namespace) -> float:
  """Seconds of the guided loop (cfg 4) for args.sample_images images, args.sample_steps steps;
  one guided model call first, so no first-call setup is timed."""
  model.eval()
  y = torch.arange(args.sample_images) % model.y_embedder.num_classes
  diffusion = create_diffusion(str(args.sample_steps))
  x = torch.randn(2 * len(y), model.in_channels, model.input_size, model.input_size)
  with torch.no_grad():
    model.forward_with_cfg(x, torch.full((len(x),), 999), torch.cat([y, y]), 4.0)
  start = time.perf_counter()
  out = sample(model, diffusion, y)
  seconds = time.perf_counter() - start
  if not torch.isfinite(out).all():
    raise RuntimeError("guided sampling produced non-finite latents")
  return seconds


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="S/2", help="variant, e.g. S/2 or XL/2 (256 px)")
  parser.add_argument("--batch", type=int, default=8, help="train batch")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed train steps first")
  parser.add_argument("--sample_images", type=int, default=4, help="images (the model sees 2x)")
  parser.add_argument("--sample_steps", type=int, default=50, help="DDPM steps")
  parser.add_argument("--threads", type=int, default=None, help="default: torch's")
  parser.add_argument("--attention", default="fused", choices=ATTENTION)
  parser.add_argument("--skip_train", action="store_true")
  parser.add_argument("--skip_sample", action="store_true")
  parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  model = speed_model(args)
  name = "tiny (8x8x4, depth 1)" if args.tiny else f"DiT-{args.model.removeprefix('DiT-')}"
  print("| | |\n|---|---|")
  print(f"| torch | {torch.__version__} |\n| threads | {torch.get_num_threads()} |")
  print(f"| CPU | {cpu_name()} |\n| model | {name}, float32, {args.attention} attention |",
        flush=True)
  if not args.skip_train:
    img_s = time_training(model, args)
    print(f"| train img/s (batch {args.batch}, {args.steps} steps after {args.warmup}) | "
          f"{img_s:.3g} |", flush=True)
  if not args.skip_sample:
    seconds = time_sampling(model, args)
    print(f"| guided sampling s ({args.sample_images} images, {args.sample_steps} DDPM steps, "
          f"cfg 4) | {seconds:.3g} ({args.sample_images / seconds:.3g} img/s) |", flush=True)


if __name__ == "__main__":
  main()
