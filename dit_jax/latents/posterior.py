"""From stored posterior moments to the diffusion model's latents (a fresh draw every step)."""
import jax
import jax.numpy as jnp

from dit_jax.vae import sample_latent


def latents_from_moments(moments: jax.Array, rng: jax.Array, scaling_factor: float,
                         shift_factor: float | None = None) -> jax.Array:
  """`AutoencoderKL.encode_to_latents` for stored moments: sample, shift, scale.

  Sampling stays in the train step, not the extraction, so that every epoch sees a new draw
  from the posterior as DiT's online encoding does.

  Args:
    moments: `[batch, h, w, 2c]`, `concat([mean, logvar], -1)` (`LatentPipeline`'s "moments").
    rng: a PRNG key.
    scaling_factor: `LatentSource.scaling_factor` (0.18215 for the SD VAE).
    shift_factor: `LatentSource.shift_factor` (None for the SD VAE).

  Returns:
    float32 `[batch, h, w, c]`.
  """
  mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
  z = sample_latent(mean, logvar, rng)
  if shift_factor is not None:
    z = z - shift_factor
  return z * scaling_factor
