"""Gaussian diffusion: forward process, model posterior and training losses.

A JAX port of the official DiT `diffusion/` package (itself from OpenAI's improved-diffusion /
guided-diffusion), keeping its public names. Differences in form, not in numbers:

* Arrays are NHWC (`[batch, height, width, channels]`); a model predicting its variance returns
  `2 * channels` channels on the LAST axis (eps-or-x0 first, variance values second).
* Respacing is not a subclass: every `GaussianDiffusion` carries a `timestep_map` (identity when
  not respaced) and the model is always called with `timestep_map[t]`, the original step numbers,
  exactly like the official `SpacedDiffusion` wrapper (DiT does not rescale timesteps).
* Randomness is explicit (`rng` keys).
* The samplers (`p_sample_loop`, `ddim_sample_loop`, DPM-Solver++) are not methods: they live
  in `dit_jax.samplers`, functions of a `GaussianDiffusion` that use only its public methods and
  tables (this module imports nothing of them).

The float64 numpy tables are read at trace time and become float32 constants, so a diffusion
object can simply be closed over inside `jax.jit`.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from dit_jax.diffusion.schedules import extract_into_tensor as _extract_into_tensor
from dit_jax.diffusion.schedules import get_named_beta_schedule, respace_betas, space_timesteps
from dit_jax.noise import standard_normal

# model_fn(x [N, H, W, C], timesteps [N] (original step numbers), **model_kwargs) -> output.
ModelFn = Callable[..., jax.Array]


class ModelMeanType(enum.Enum):
  """What the model predicts."""
  PREVIOUS_X = enum.auto()  # x_{t-1}
  START_X = enum.auto()  # x_0
  EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
  """Where the variance of p(x_{t-1} | x_t) comes from."""
  LEARNED = enum.auto()  # the model outputs the log variance
  FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
  FIXED_LARGE = enum.auto()  # beta_t
  LEARNED_RANGE = enum.auto()  # the model interpolates between the two in log space


class LossType(enum.Enum):
  MSE = enum.auto()  # raw MSE (plus the VB term when the variance is learned)
  RESCALED_MSE = enum.auto()  # raw MSE, VB term rescaled by num_timesteps / 1000
  KL = enum.auto()  # the variational bound
  RESCALED_KL = enum.auto()  # the variational bound times num_timesteps (full-VLB estimate)

  def is_vb(self) -> bool:
    return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion:
  """Utilities for training and sampling diffusion models (NHWC, jit-compatible).

  All methods take `t` as int `[N]` indices into THIS process (0 .. num_timesteps - 1). The
  samplers are functions of it in `dit_jax.samplers` (`ddpm.p_sample_loop(diffusion, ...)`).

  Attributes:
    num_timesteps: number of steps of this (possibly respaced) process.
    timestep_map: int64 `[num_timesteps]`, the original step number of each step; the model
      always sees these numbers.
    use_timesteps: `set(timestep_map)`.
    original_num_steps: number of steps of the process this one was respaced from.
    betas, alphas_cumprod, ...: float64 `[num_timesteps]` tables (names as in the reference).
  """

  def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType,
               model_var_type: ModelVarType, loss_type: LossType,
               timestep_map: Optional[np.ndarray] = None,
               original_num_steps: Optional[int] = None):
    if model_mean_type == ModelMeanType.PREVIOUS_X:
      # The DiT reference silently treats PREVIOUS_X as EPSILON when sampling; refuse instead.
      raise ValueError("model_mean_type: ModelMeanType.PREVIOUS_X is not supported")
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type

    betas = np.array(betas, dtype=np.float64)  # float64 for accurate tables
    if betas.ndim != 1:
      raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must lie in (0, 1]")
    if betas.shape[0] < 2:
      # The clipped posterior log variance borrows entry 1; the reference leaves that table empty
      # for one step, so no p_mean_variance works there either.
      raise ValueError("a diffusion process needs at least 2 steps")
    self.betas = betas
    self.num_timesteps = int(betas.shape[0])

    if timestep_map is None:
      timestep_map = np.arange(self.num_timesteps)
    self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
    if self.timestep_map.shape != (self.num_timesteps,):
      raise ValueError(f"timestep_map has shape {self.timestep_map.shape}, "
                       f"expected ({self.num_timesteps},)")
    self.use_timesteps = set(self.timestep_map.tolist())
    self.original_num_steps = (int(self.timestep_map[-1]) + 1 if original_num_steps is None
                               else int(original_num_steps))

    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

    # q(x_t | x_0) and its inversions.
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

    # The posterior q(x_{t-1} | x_t, x_0).
    self.posterior_variance = (
        betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
    # The posterior variance is 0 at t = 0; its log is clipped by repeating entry 1.
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = (
        betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = (
        (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))

  # ----------------------------------------------------------------------------------------------
  # Forward process and posterior.

  def q_mean_variance(self, x_start: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log variance of q(x_t | x_0), each of x_start's shape `[N, H, W, C]`."""
    mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
    log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) with the given standard normal noise (both `[N, H, W, C]`)."""
    if noise.shape != x_start.shape:
      raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
    return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

  def q_posterior_mean_variance(self, x_start: jax.Array, x_t: jax.Array, t: jax.Array
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0), each `[N, H, W, C]`."""
    if x_start.shape != x_t.shape:
      raise ValueError(f"x_start shape {x_start.shape} != x_t shape {x_t.shape}")
    shape = x_t.shape
    mean = (_extract_into_tensor(self.posterior_mean_coef1, t, shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, shape) * x_t)
    variance = _extract_into_tensor(self.posterior_variance, t, shape)
    log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, shape)
    return mean, variance, log_variance

  def _predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

  def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array,
                              pred_xstart: jax.Array) -> jax.Array:
    """The noise that takes x_0 = pred_xstart to x_t at step t (DDIM's eps, whatever the model
    predicts)."""
    return ((_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
             - pred_xstart)
            / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

  # ----------------------------------------------------------------------------------------------
  # The model's reverse step p(x_{t-1} | x_t).

  @property
  def _learns_variance(self) -> bool:
    return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

  def _call_model(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                  model_kwargs: Optional[Mapping[str, Any]]) -> jax.Array:
    """The one place the model is called: with the ORIGINAL step numbers `timestep_map[t]`."""
    original_t = jnp.asarray(self.timestep_map, dtype=jnp.int32)[t]
    return model_fn(x, original_t, **(model_kwargs or {}))

  def _split_output(self, model_output: jax.Array, x: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """`[N, H, W, 2C]` -> (eps-or-x0 `[N, H, W, C]`, variance values `[N, H, W, C]`)."""
    expected = x.shape[:-1] + (2 * x.shape[-1],)
    if model_output.shape != expected:
      raise ValueError(f"a learned-variance model must output shape {expected} (2x channels on "
                       f"the last axis), got {model_output.shape}")
    return jnp.split(model_output, 2, axis=-1)

  def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                      clip_denoised: bool = True,
                      denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
                      model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """Applies the model to get p(x_{t-1} | x_t) and a prediction of x_0.

    Args:
      model_fn: `model_fn(x, timesteps, **model_kwargs)`; see `ModelFn`.
      x: `[N, H, W, C]`, the state at step t.
      t: int `[N]`, indices into this process.
      clip_denoised: clip the x_0 prediction to [-1, 1].
      denoised_fn: applied to the x_0 prediction before clipping.
      model_kwargs: extra keyword arguments for the model (labels, cfg_scale, ...).

    Returns:
      dict of `[N, H, W, C]` arrays: mean, variance, log_variance, pred_xstart.
    """
    model_output = self._call_model(model_fn, x, t, model_kwargs)
    if self._learns_variance:
      model_output, var_values = self._split_output(model_output, x)
      if self.model_var_type == ModelVarType.LEARNED:
        # improved-diffusion's meaning; the DiT copy treats LEARNED like LEARNED_RANGE, but DiT
        # never builds a LEARNED process.
        log_variance = var_values
      else:
        # var_values in [-1, 1] spans [posterior variance, beta] in log space.
        min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      if self.model_var_type == ModelVarType.FIXED_LARGE:
        # Step 0 uses the posterior variance, for a better decoder likelihood.
        table = np.append(self.posterior_variance[1], self.betas[1:])
        log_table = np.log(table)
      else:
        table, log_table = self.posterior_variance, self.posterior_log_variance_clipped
      variance = _extract_into_tensor(table, t, x.shape)
      log_variance = _extract_into_tensor(log_table, t, x.shape)

    if self.model_mean_type == ModelMeanType.START_X:
      pred_xstart = model_output
    else:
      pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
    if denoised_fn is not None:
      pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  # ----------------------------------------------------------------------------------------------
  # Training.

  def _vb_terms_bpd(self, model_fn: ModelFn, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                    clip_denoised: bool = True,
                    model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """One term of the variational bound, in bits per dimension.

    Returns:
      dict: output `[N]` (the decoder NLL where t == 0, else KL(q(x_{t-1}|x_t,x_0) ||
      p(x_{t-1}|x_t))), and pred_xstart `[N, H, W, C]`.
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised,
                               model_kwargs=model_kwargs)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    output = jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)
    return {"output": output, "pred_xstart": out["pred_xstart"]}

  def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                      model_kwargs: Optional[Mapping[str, Any]] = None,
                      noise: Optional[jax.Array] = None,
                      rng: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Per-example training losses at steps t.

    Args:
      model_fn: `model_fn(x, timesteps, **model_kwargs)`.
      x_start: `[N, H, W, C]` clean data.
      t: int `[N]` indices into this process.
      model_kwargs: extra keyword arguments for the model.
      noise: `[N, H, W, C]` standard normal noise; drawn from `rng` when None.
      rng: PRNG key, used only when noise is None.

    Returns:
      dict of `[N]` arrays: "loss"; "mse" for the MSE losses; "vb" when the variance is learned
      (MSE losses) or for the KL losses (there "vb" is the unscaled bound term).
    """
    if noise is None:
      if rng is None:
        raise ValueError("training_losses needs noise or an rng key to draw it")
      noise = standard_normal(rng, x_start.shape, x_start.dtype)
    x_t = self.q_sample(x_start, t, noise)
    terms = {}

    if self.loss_type.is_vb():
      vb = self._vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False,
                              model_kwargs=model_kwargs)["output"]
      terms["vb"] = vb
      terms["loss"] = vb * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else vb
      return terms

    model_output = self._call_model(model_fn, x_t, t, model_kwargs)
    if self._learns_variance:
      model_output, var_values = self._split_output(model_output, x_t)
      # The VB term trains only the variance: the mean prediction is frozen for it.
      frozen_out = jnp.concatenate([jax.lax.stop_gradient(model_output), var_values], axis=-1)
      vb = self._vb_terms_bpd(lambda *_, **__: frozen_out, x_start, x_t, t,
                              clip_denoised=False)["output"]
      if self.loss_type == LossType.RESCALED_MSE:
        # The 1/1000 keeps the VB term from dominating the MSE (as in the reference).
        vb = vb * (self.num_timesteps / 1000.0)
      terms["vb"] = vb
    target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
    terms["mse"] = mean_flat((target - model_output) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms

  def loss_terms(self, model_fn: ModelFn, x_start: jax.Array, rng: jax.Array,
                 model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """`training_losses` at t uniform over this process's steps, with fresh noise (as the
    official train.py draws them): `t_rng, noise_rng = jax.random.split(rng)`."""
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, self.num_timesteps)
    noise = standard_normal(noise_rng, x_start.shape, x_start.dtype)
    return self.training_losses(model_fn, x_start, t, model_kwargs, noise=noise)


def spaced_diffusion(use_timesteps: Sequence[int] | set[int], *, betas: np.ndarray,
                     model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                     loss_type: LossType) -> GaussianDiffusion:
  """The process keeping only `use_timesteps` of the one defined by `betas`.

  The reference's `SpacedDiffusion(use_timesteps, **kwargs)` (also exported under that name), as
  a function returning a `GaussianDiffusion` with the matching `timestep_map`.
  """
  new_betas, timestep_map = respace_betas(betas, use_timesteps)
  return GaussianDiffusion(betas=new_betas, model_mean_type=model_mean_type,
                           model_var_type=model_var_type, loss_type=loss_type,
                           timestep_map=timestep_map, original_num_steps=len(betas))


SpacedDiffusion = spaced_diffusion


def create_diffusion(timestep_respacing: Optional[str | Sequence[int]],
                     noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
  """The diffusion process used by DiT (same arguments as the official `create_diffusion`).

  Args:
    timestep_respacing: `space_timesteps` spec ("250", "ddim50", "25,15,10", [..]); None or ""
      keeps all `diffusion_steps` steps.
    noise_schedule: "linear" or "squaredcos_cap_v2".
    use_kl: train on the (rescaled) variational bound.
    sigma_small: with a fixed variance, use the posterior variance instead of beta.
    predict_xstart: the model predicts x_0 instead of eps.
    learn_sigma: the model predicts its variance (LEARNED_RANGE, 2x output channels).
    rescale_learned_sigmas: use RESCALED_MSE.
    diffusion_steps: steps of the underlying process.
  """
  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if timestep_respacing is None or timestep_respacing == "":
    timestep_respacing = [diffusion_steps]
  if learn_sigma:
    model_var_type = ModelVarType.LEARNED_RANGE
  else:
    model_var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
  # Even the unspaced process goes through respacing, as in the reference: its betas are then
  # recomputed from alphas_cumprod, which changes them in the last bits.
  return spaced_diffusion(
      space_timesteps(diffusion_steps, timestep_respacing), betas=betas,
      model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
      model_var_type=model_var_type, loss_type=loss_type)
