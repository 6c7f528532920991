"""The pure training step: hybrid diffusion loss, AdamW update, EMA."""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from dit_jax.diffusion import GaussianDiffusion
from dit_jax.latents.posterior import latents_from_moments
from dit_jax.models import LABEL_DROPOUT_RNG, DiT
from dit_jax.train.state import TrainState, ema_update

LATENT_RNG_TAG = 3  # fold_in tag of the posterior-sampling key (t, noise, dropout use a split)


def model_inputs(batch: dict[str, jax.Array], rng: jax.Array, vae: Any = None,
                 vae_params: Any = None, latent_scale: float = 1.0) -> jax.Array:
  """The diffusion model's x_0 for a batch [batch, H, W, C].

  `moments` (pre-extracted latents: the VAE posterior's mean and log-variance, concatenated on
  the channel axis) are sampled and scaled by the VAE's scaling factor; `images` are encoded on
  the fly when a VAE is given, else used as they are (pixel space).
  """
  if "moments" in batch:
    return latents_from_moments(batch["moments"], rng, latent_scale)
  if vae is not None:
    return vae.encode_to_latents(vae_params, batch["images"], rng)
  return batch["images"]


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               vae_params: Any = None, *, model: DiT, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
               ema_decay: float, vae: Optional[Any] = None, latent_scale: float = 1.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a global batch.

  Args:
    state: the current TrainState (donated by the caller's jit).
    batch: `labels` [batch] int and either `images` [batch, H, W, C] in [-1, 1] or `moments`
      [batch, h, w, 2 * latent channels] (see `model_inputs`).
    rng: the run's base key; this step's randomness is `fold_in(rng, state.step)`, so a resumed
      run draws exactly what an uninterrupted one would.
    vae_params, vae: the VAE (an `AutoencoderKL` module and its params) to encode images on the
      fly; None in pixel space or with pre-extracted latents.
    latent_scale: the VAE's scaling_factor (0.18215), applied to sampled pre-extracted latents.
  Returns:
    (new state, scalar metrics: loss, mse, vb, grad_norm, param_norm, learning_rate).
  """
  labels = batch["labels"]
  step_rng = jax.random.fold_in(rng, state.step)
  x_start = model_inputs(batch, jax.random.fold_in(step_rng, LATENT_RNG_TAG), vae, vae_params,
                         latent_scale)
  t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  # t uniform over all steps of the (unspaced) training process.
  t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)

  def loss_fn(params):
    def model_fn(x, timesteps, y):
      return model.apply({"params": params}, x, timesteps, y, train=True,
                         rngs={LABEL_DROPOUT_RNG: dropout_rng})
    terms = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": labels},
                                      noise=noise)
    return terms["loss"].mean(), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_update(state.ema_params, params, ema_decay))
  metrics = {
      "loss": loss,
      "mse": terms["mse"].mean(),
      "vb": terms["vb"].mean() if "vb" in terms else jnp.zeros(()),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32),
  }
  return new_state, metrics
