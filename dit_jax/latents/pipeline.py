"""Training batches of pre-extracted latents, with `dit_jax.data.InputPipeline`'s contract.

The order, the process rows and the flips come from the image pipeline's own `BatchOrder`, so
for the same seed a latent run sees the same examples, mirrored the same way, as an image run
with an online VAE.
"""
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from dit_jax.data.pipeline import BatchOrder, WorkerPools
from dit_jax.latents.posterior import latents_from_moments
from dit_jax.latents.source import LatentSource

Batch = dict[str, np.ndarray]


class LatentPipeline:
  """Deterministic, resumable batches of posterior moments; a pure function of (seed, step).

    with LatentPipeline(LatentSource(directory), global_batch_size=256, seed=0,
                        random_flip=True) as pipeline:
      for step, batch in pipeline.iterate(start_step):
        batch = to_global(batch, sharding)  # dit_jax.data.to_global
        latents = pipeline.x0(batch, rng)  # inside the train step
  """

  def __init__(self, source: LatentSource, *, global_batch_size: int, seed: int,
               random_flip: bool, process_index: int | None = None,
               process_count: int | None = None, num_threads: int = 8, prefetch: int = 2):
    """Sets the pipeline up; reads nothing yet.

    Args:
      source: the latent directory (`LatentSource`).
      global_batch_size: examples per step summed over all processes (`config.batch_size`).
      seed: data seed: fixes the order and the flips (as in `InputPipeline`).
      random_flip: use the mirrored moments of half of the examples.
      process_index: this process; None: `jax.process_index()`.
      process_count: number of processes; None: `jax.process_count()`.
      num_threads: threads reading records; 0 reads in the calling thread.
      prefetch: batches prepared ahead of the consumer in `iterate`; 0 prepares none.
    """
    self.source = source
    self.order = BatchOrder(len(source), global_batch_size=global_batch_size, seed=seed,
                            random_flip=random_flip, process_index=process_index,
                            process_count=process_count)
    self.workers = WorkerPools(num_threads, prefetch, "dit_jax_latents")

  # x0 needs no parameters: the train step's `frozen` argument is None.
  frozen = None

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a global batch (`to_global(local_batch(step))`)."""
    batch = self.order.global_batch_size
    return {"moments": jax.ShapeDtypeStruct((batch,) + self.source.moments_shape, np.float32),
            "labels": jax.ShapeDtypeStruct((batch,), np.int32)}

  def x0(self, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any = None) -> jax.Array:
    """The model's x_0 from a global batch, inside the train step (pure): a fresh posterior
    sample of the moments, shifted and scaled as the VAE's `encode_to_latents` does."""
    del frozen
    return latents_from_moments(batch["moments"], rng, self.source.scaling_factor,
                                self.source.shift_factor)

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch of `step`: int64 `[global_batch_size]`."""
    return self.order.global_indices(step)

  def local_batch(self, step: int) -> Batch:
    """This process's rows of the batch of `step`.

    Returns:
      "moments": float32 `[local_batch, h, w, 2c]`, `concat([mean, logvar], -1)` (unscaled;
        see `latents_from_moments`); "labels": int32 `[local_batch]`.
    """
    examples = self.workers.map(self.source.get, *self.order.local_rows(step))
    return {"moments": np.stack([moments for moments, _ in examples]),
            "labels": np.asarray([label for _, label in examples], np.int32)}

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[tuple[int, Batch]]:
    """Yields `(step, local_batch(step))` for `step = start_step, start_step + 1, ...`.

    Up to `prefetch` batches are read in the background and yielded in step order.

    Args:
      start_step: the first step (the checkpoint's step when resuming).
      num_steps: how many batches; None: without end.
    """
    return self.workers.batches(self.local_batch, start_step, num_steps)

  def close(self) -> None:
    """Stops the worker threads and closes the source's readers. Idempotent."""
    self.workers.close()
    self.source.close()

  def __enter__(self) -> "LatentPipeline":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

