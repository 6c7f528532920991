"""A run's input pipeline: pixels, images encoded by the VAE on the fly, or extracted latents.

Whatever the mode, the loop and the train step see the same `Inputs`: batches on the host, the
spec of a global batch (the loop derives the batch shardings from it) and a pure `x0` that the
step calls on the batch (with `frozen`, the VAE's params, passed to the jitted step as an
argument rather than baked into it as constants).
"""
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from dit_jax.data import InputPipeline, source_from_config
from dit_jax.data.pipeline import image_channels
from dit_jax.latents import LatentPipeline, LatentSource
from dit_jax.models import DiT


class Inputs(Protocol):
  """What `InputPipeline` and `LatentPipeline` offer a run."""

  source: Any  # len() and num_classes, for the start-up summary
  frozen: Any  # x0's parameters (the VAE's when encoding on the fly), else None

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a global batch, `labels` [batch] among them."""

  def x0(self, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any = None) -> jax.Array:
    """The model's x_0 `[batch, H, W, C]` from a global batch; pure, called in the train step."""

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """`(step, this process's rows of the batch of step)`, from `start_step` on."""

  def __enter__(self) -> "Inputs":
    ...

  def __exit__(self, *exc_info: Any) -> None:
    ...


def make_inputs(config: Any, model: DiT) -> Inputs:
  """The batches of a run: pre-extracted latents, images encoded on the fly, or pixels."""
  threads = dict(num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  if config.latents_dir:
    source = LatentSource(config.latents_dir, cache_dir=config.latents_cache_dir or None)
    expected = (model.input_size, model.input_size, model.in_channels)
    if tuple(source.latent_shape) != expected:
      raise ValueError(f"config.latents_dir: {config.latents_dir} holds latents of shape "
                       f"{list(source.latent_shape)}, the model takes {list(expected)}")
    _check_classes(source.num_classes, model)
    return LatentPipeline(source, global_batch_size=config.batch_size, seed=config.seed,
                          random_flip=config.data.random_flip, **threads)
  source = source_from_config(config.data)
  _check_classes(source.num_classes, model)
  pipeline = dict(image_size=config.data.image_size, global_batch_size=config.batch_size,
                  seed=config.seed, random_flip=config.data.random_flip, **threads)
  channels = image_channels(source)
  if model.in_channels == channels and not config.vae.path:  # pixel space
    if config.data.image_size != model.input_size:
      raise ValueError(f"config.data.image_size: {config.data.image_size} must equal "
                       f"config.model.input_size ({model.input_size}) in pixel space")
    return InputPipeline(source, **pipeline)
  if not config.vae.path:
    raise ValueError(
        f"config.model.in_channels: {model.in_channels}, but the data has {channels} channels. "
        "Latent-space training needs the Stable Diffusion VAE: pre-extracted latents "
        "(config.latents_dir, made by python -m dit_jax.latents.extract) or config.vae.path "
        "(encode on the fly).")
  from dit_jax.vae import AutoencoderKL, load_diffusers_vae
  vae_config, vae_params = load_diffusers_vae(config.vae.path)
  factor = vae_config.downsample_factor
  if (config.data.image_size // factor, vae_config.latent_channels) != (
      model.input_size, model.in_channels):
    raise ValueError(f"config.vae.path: its {factor}x, {vae_config.latent_channels}-channel "
                     f"latents of {config.data.image_size}px images do not fit a model of "
                     f"input {model.input_size} x {model.in_channels}")
  return InputPipeline(source, encode=AutoencoderKL(vae_config).encode_to_latents,
                       encode_params=vae_params, **pipeline)


def element_spec_from_config(config: Any, model: DiT) -> dict[str, jax.ShapeDtypeStruct]:
  """The `element_spec` that `make_inputs(config, model)` would have, from the config alone (no
  data read): for checking a config, or laying a run out before its data is at hand."""
  batch = config.batch_size
  labels = jax.ShapeDtypeStruct((batch,), np.int32)
  if config.latents_dir:  # the posterior's moments: mean and log-variance, 2x channels
    side, channels = model.input_size, 2 * model.in_channels
    return {"moments": jax.ShapeDtypeStruct((batch, side, side, channels), np.float32),
            "labels": labels}
  # Pixels (the model's channels: make_inputs refuses data of others), or images that the VAE
  # encodes in the step (RGB unless config.data.channels says otherwise).
  channels = (config.data.channels or 3) if config.vae.path else model.in_channels
  side = config.data.image_size
  return {"images": jax.ShapeDtypeStruct((batch, side, side, channels), np.float32),
          "labels": labels}


def _check_classes(num_classes: int, model: DiT) -> None:
  if num_classes != model.num_classes:
    raise ValueError(f"config.model.num_classes: {model.num_classes}, but the data has "
                     f"{num_classes} classes")
