"""The order in which examples are read: a pure function of (seed, step).

Example position `p = step * global_batch_size + j` (row `j` of the global batch) lives in epoch
`e = p // num_examples` at `permutation(seed, e)[p % num_examples]`. Because nothing depends on
what was read before, resuming at step `s` replays exactly the batches an uninterrupted run would
have seen from step `s` on, and batches cross epoch boundaries without a seam.
"""
import collections
import threading

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the dataset in one epoch.

  Args:
    seed: the data seed.
    epoch: epoch number, >= 0.
    num_examples: dataset size `n`.

  Returns:
    int64 `[n]`, a permutation of `0..n-1`.
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


class EpochPermutations:
  """`epoch_permutation` with the last few epochs memoised.

  A permutation of ImageNet (1.28M) costs tens of milliseconds: computing it once per epoch, not
  once per batch, matters. Only a couple are kept, since a batch spans at most two epochs unless
  the batch is larger than the dataset. Thread-safe (the prefetch threads share one).
  """

  def __init__(self, num_examples: int, seed: int, cache_size: int = 2):
    if num_examples <= 0:
      raise ValueError(f"the dataset is empty (num_examples={num_examples})")
    self.num_examples = num_examples
    self.seed = seed
    self._cache_size = max(1, cache_size)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __call__(self, epoch: int) -> np.ndarray:
    """Permutation of epoch `epoch`: int64 `[num_examples]`."""
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is not None:
        self._cache.move_to_end(epoch)
        return perm
    # Computed outside the lock: two threads may both compute an epoch (same result), but no
    # thread waits on another's 30 ms permutation.
    perm = epoch_permutation(self.seed, epoch, self.num_examples)
    perm.flags.writeable = False  # shared between threads and callers.
    with self._lock:
      self._cache[epoch] = perm
      self._cache.move_to_end(epoch)
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return perm


def global_batch_indices(step: int, global_batch_size: int, num_examples: int, seed: int,
                         permutations: EpochPermutations | None = None) -> np.ndarray:
  """Dataset indices of the global batch of step `step`.

  Args:
    step: training step, >= 0.
    global_batch_size: `B`, the batch summed over all processes.
    num_examples: dataset size `n`.
    seed: the data seed.
    permutations: an `EpochPermutations(num_examples, seed)` to reuse across calls (a fresh one
      is made if None; same result, slower).

  Returns:
    int64 `[global_batch_size]`: row `j` holds the index of example position `step * B + j`.
  """
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
  if permutations is None:
    permutations = EpochPermutations(num_examples, seed)
  elif (permutations.num_examples, permutations.seed) != (num_examples, seed):
    raise ValueError("permutations were made for another dataset size or seed")
  positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
  epochs = positions // num_examples
  offsets = positions % num_examples
  indices = np.empty(global_batch_size, np.int64)
  for epoch in np.unique(epochs):  # one or two epochs unless B > n.
    rows = epochs == epoch
    indices[rows] = permutations(int(epoch))[offsets[rows]]
  return indices


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows of the global batch each process reads; `B` must divide evenly."""
  if process_count <= 0:
    raise ValueError(f"process_count must be > 0, got {process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"config.batch_size={global_batch_size} (the global batch) must be a positive multiple "
        f"of the number of processes ({process_count})")
  return global_batch_size // process_count


def process_slice(global_indices: np.ndarray, process_index: int,
                  process_count: int) -> np.ndarray:
  """The contiguous rows of the global batch that process `process_index` reads.

  Process `i` gets rows `[i * L, (i + 1) * L)` with `L = B // process_count`, the order in which
  `jax.make_array_from_process_local_data` lays process-local rows out along a batch axis sharded
  over all devices.

  Args:
    global_indices: `[B]` (or `[B, ...]`), the whole global batch.
    process_index: this process, `0 <= process_index < process_count`.
    process_count: number of processes.

  Returns:
    `[L]` (or `[L, ...]`), a view of `global_indices`.
  """
  size = local_batch_size(len(global_indices), process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return global_indices[process_index * size:(process_index + 1) * size]
