"""The training input pipeline: the batch of step `s` is a pure function of (seed, s).

Each process reads only its rows of the global batch (`sampler.process_slice`), preprocesses them
on a thread pool (PIL releases the GIL while decoding and resizing), and `to_global` assembles
the per-process rows into global `jax.Array`s. Resuming at step `s` is `iterate(start_step=s)`:
no iterator state needs checkpointing.
"""
import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from dit_jax.data import preprocess
from dit_jax.data import sampler
from dit_jax.data.sources import Source

Batch = dict[str, np.ndarray]
# encode(params, images [batch, H, W, C] in [-1, 1], rng) -> the model's x_0 (VAE latents).
Encode = Callable[[Any, jax.Array, jax.Array], jax.Array]


def image_channels(source: Source) -> int:
  """Channels of a source's images: its `image_shape`'s, else 3 (a folder decodes to RGB; so do
  the tfds datasets of varying sizes that DiT trains on)."""
  shape = getattr(source, "image_shape", None)
  return 3 if shape is None else int(shape[-1])


class BatchOrder:
  """Which examples, and which flips, make up this process's rows of every step's batch.

  A pure function of (seed, step): the order is a per-epoch permutation, the flips are keyed by
  global example position, so a resumed run and any process layout see the same batches.
  """

  def __init__(self, num_examples: int, *, global_batch_size: int, seed: int, random_flip: bool,
               process_index: int | None = None, process_count: int | None = None):
    """process_index / process_count: None takes `jax.process_index()` / `jax.process_count()`."""
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.random_flip = random_flip
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_batch_size = sampler.local_batch_size(global_batch_size, self.process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} outside [0, {self.process_count})")
    self._permutations = sampler.EpochPermutations(num_examples, seed)

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch of `step`: int64 `[global_batch_size]`."""
    return sampler.global_batch_indices(step, self.global_batch_size, self.num_examples,
                                        self.seed, self._permutations)

  def local_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's (dataset indices int64 `[L]`, flips bool `[L]`) for `step`."""
    rows = sampler.process_slice(np.arange(self.global_batch_size), self.process_index,
                                 self.process_count)
    indices = self.global_indices(step)[rows]
    if self.random_flip:
      # Keyed by global example position, so the flips do not depend on the process layout.
      flips = preprocess.flip_mask(self.seed, step * self.global_batch_size + rows)
    else:
      flips = np.zeros(len(rows), bool)
    return indices, flips


class WorkerPools:
  """Threads that read examples, and threads that prepare whole batches ahead of the consumer.

  Two pools: a batch task waits on example tasks, so one shared pool could deadlock once every
  worker holds a batch waiting for example tasks queued behind it.
  """

  def __init__(self, num_threads: int, prefetch: int, name: str):
    if prefetch < 0 or num_threads < 0:
      raise ValueError(f"prefetch ({prefetch}) and num_threads ({num_threads}) must be >= 0")
    self.prefetch = prefetch
    self._examples = (concurrent.futures.ThreadPoolExecutor(
        num_threads, thread_name_prefix=f"{name}_example") if num_threads else None)
    self._batches = (concurrent.futures.ThreadPoolExecutor(
        prefetch, thread_name_prefix=f"{name}_batch") if prefetch else None)
    self._closed = False

  def map(self, fn: Callable[..., Any], *iterables: Any) -> list[Any]:
    """[fn(*args) ...] in order, on the example threads (or here without any)."""
    if self._closed:
      raise RuntimeError("the pipeline is closed")
    if self._examples is None:
      return list(map(fn, *iterables))
    return list(self._examples.map(fn, *iterables))

  def batches(self, make_batch: Callable[[int], Any], start_step: int,
              num_steps: int | None) -> Iterator[tuple[int, Any]]:
    return ordered_prefetch(make_batch, start_step, num_steps, self._batches, self.prefetch)

  def close(self) -> None:
    """Waits for running tasks, drops queued ones. Idempotent."""
    self._closed = True
    for pool in (self._batches, self._examples):
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


class InputPipeline:
  """Deterministic, resumable batches of center-cropped, flipped, [-1, 1] images.

  Use as a context manager (or call `close()`) so the worker threads shut down:

    with InputPipeline(source, image_size=256, global_batch_size=256, seed=0,
                       random_flip=True) as pipeline:
      for step, batch in pipeline.iterate(start_step):
        batch = to_global(batch, sharding)
  """

  def __init__(self, source: Source, *, image_size: int, global_batch_size: int, seed: int,
               random_flip: bool, process_index: int | None = None,
               process_count: int | None = None, num_threads: int = 8, prefetch: int = 2,
               encode: Encode | None = None, encode_params: Any = None):
    """Sets the pipeline up; reads nothing yet.

    Args:
      source: where examples come from (`sources.make_source`).
      image_size: side of the square images produced (ADM center crop).
      global_batch_size: examples per step summed over all processes (`config.batch_size`).
      seed: data seed: fixes the order and the flips.
      random_flip: mirror half of the examples (False for digits: a mirrored digit is another
        symbol).
      process_index: this process; None: `jax.process_index()`.
      process_count: number of processes; None: `jax.process_count()`.
      num_threads: threads decoding and resizing examples; 0 decodes in the calling thread.
      prefetch: batches prepared ahead of the consumer in `iterate`.
      encode: what `x0` makes of the images in the train step, e.g. the VAE's
        `encode_to_latents` (latent-space training, encoding on the fly); None: pixel space.
      encode_params: its parameters, the train step's `frozen` argument.
    """
    self.source = source
    self.image_size = image_size
    self.encode = encode
    self.frozen = encode_params
    self.order = BatchOrder(len(source), global_batch_size=global_batch_size, seed=seed,
                            random_flip=random_flip, process_index=process_index,
                            process_count=process_count)
    self.workers = WorkerPools(num_threads, prefetch, "dit_jax_data")

  @property
  def num_skipped(self) -> int:
    """Unreadable files the source skipped so far (0 for sources that cannot skip)."""
    return int(getattr(self.source, "num_skipped", 0))

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a global batch (`to_global(local_batch(step))`)."""
    batch, size = self.order.global_batch_size, self.image_size
    shape = (batch, size, size, image_channels(self.source))
    return {"images": jax.ShapeDtypeStruct(shape, np.float32),
            "labels": jax.ShapeDtypeStruct((batch,), np.int32)}

  def x0(self, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any = None) -> jax.Array:
    """The model's x_0 from a global batch, inside the train step (pure; `frozen`: the
    `encode_params` given as a jit argument): the images, or `encode(frozen, images, rng)`."""
    if self.encode is None:
      return batch["images"]
    return self.encode(frozen, batch["images"], rng)

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch of `step`: int64 `[global_batch_size]`."""
    return self.order.global_indices(step)

  def _example(self, index: int, flip: bool) -> tuple[np.ndarray, int]:
    image, label = self.source.get(int(index))
    image = preprocess.center_crop_arr(image, self.image_size)
    if flip:
      image = preprocess.horizontal_flip(image)
    return image, label

  def local_batch(self, step: int) -> Batch:
    """This process's rows of the batch of `step` (a pure function of seed and step).

    Returns:
      "images": float32 `[local_batch, image_size, image_size, channels]` in [-1, 1];
      "labels": int32 `[local_batch]`.
    """
    examples = self.workers.map(self._example, *self.order.local_rows(step))
    images = np.stack([image for image, _ in examples])
    return {"images": preprocess.to_float(images),
            "labels": np.asarray([label for _, label in examples], np.int32)}

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[tuple[int, Batch]]:
    """Yields `(step, local_batch(step))` for `step = start_step, start_step + 1, ...`.

    Up to `prefetch` batches are prepared in the background; they are yielded in step order,
    so what comes out does not depend on thread timing. Closing the generator (or the
    pipeline) cancels the batches not started yet.

    Args:
      start_step: the first step (the checkpoint's step when resuming).
      num_steps: how many batches; None: without end.
    """
    return self.workers.batches(self.local_batch, start_step, num_steps)

  def close(self) -> None:
    """Stops the worker threads (waits for running tasks, drops queued ones). Idempotent."""
    self.workers.close()

  def __enter__(self) -> "InputPipeline":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def ordered_prefetch(make_batch: Callable[[int], Any], start_step: int,
                     num_steps: int | None,
                     pool: concurrent.futures.ThreadPoolExecutor | None,
                     prefetch: int) -> Iterator[tuple[int, Any]]:
  """Yields `(step, make_batch(step))` in step order, preparing up to `prefetch` ahead in `pool`.

  The order and content do not depend on thread timing; closing the generator cancels the
  batches not started yet. Without a pool every batch is made in the caller's thread.
  """
  steps = (itertools.count(start_step) if num_steps is None
           else iter(range(start_step, start_step + num_steps)))
  if pool is None:
    for step in steps:
      yield step, make_batch(step)
    return
  pending: collections.deque[tuple[int, concurrent.futures.Future[Any]]] = collections.deque()
  try:
    for step in steps:
      pending.append((step, pool.submit(make_batch, step)))
      if len(pending) > prefetch:
        done_step, future = pending.popleft()
        yield done_step, future.result()
    while pending:
      done_step, future = pending.popleft()
      yield done_step, future.result()
  finally:
    for _, future in pending:
      future.cancel()


def to_global(local_batch: Mapping[str, np.ndarray],
              sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]
              ) -> dict[str, jax.Array]:
  """Assembles every process's rows into global arrays of `global_batch_size` rows.

  Args:
    local_batch: this process's `local_batch(step)`: arrays `[local_batch, ...]`.
    sharding: one sharding for all arrays (e.g. `NamedSharding(mesh, P("data"))`, the batch axis
      over all devices) or one per key.

  Returns:
    The same keys, `jax.Array`s `[global_batch, ...]` laid out as `sharding` says.
  """
  out = {}
  for key, value in local_batch.items():
    key_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(key_sharding, np.asarray(value))
  return out

