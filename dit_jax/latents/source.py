"""A pre-extracted latent directory read by index, like the image sources of `dit_jax.data`."""
import hashlib
import json
import logging
import os
import threading
from typing import Any

import numpy as np
from array_record.python import array_record_module

from dit_jax import cli, fs
from dit_jax.latents import records
from dit_jax.vae import VAEConfig

logger = logging.getLogger(__name__)

# The local folder under which a `gs://` latent directory is copied (see `LatentSource`).
CACHE_ENV = "DIT_LATENTS_CACHE"


class LatentSource:
  """Example `index` of a latent directory: its posterior moments (optionally mirrored), label.

  Readers are opened lazily, one per chunk file, and shared by all threads (ArrayRecord readers
  are thread-safe; grain shares them the same way). Use as a context manager or call `close()`.

  A `gs://` directory is copied to a local folder first, as ArrayRecord's reader opens only local
  files: every process copies it to its own disk (training reads every chunk in random order).
  The folder is `cache_dir`, else $DIT_LATENTS_CACHE, else `dit_jax_cache` in the system's
  temporary directory, each holding one folder per URL and metadata (`fs.cache_dir`: a
  re-extraction into the same URL gets a new one). A complete copy is reused, and a partial one
  completed (`fs.copy_to_local`).
  """

  def __init__(self, directory: str | os.PathLike[str], cache_dir: str | None = None):
    """Opens `directory/metadata.json`, checks that every chunk file exists, and copies a
    `gs://` directory to `cache_dir` (see the class docstring).

    Raises:
      FileNotFoundError: the directory, its metadata or a chunk file is missing (the message
        names the directory and the command that creates or finishes it).
      ValueError: a chunk file is damaged: ArrayRecord cannot read it, or it holds another
        number of records than it should (the message names it and the fix).
      OSError: the local copy of a `gs://` directory does not fit on the disk (ENOSPC).
    """
    directory = os.fspath(directory)
    self.directory = directory
    command = records.EXTRACT_COMMAND.format(python=cli.python_command(), directory=directory)
    if not fs.is_dir(directory):
      raise FileNotFoundError(
          f"latent directory {directory!r} does not exist. Create it with:\n    {command}")
    metadata_path = fs.join(directory, records.METADATA_NAME)
    if not fs.exists(metadata_path):
      raise FileNotFoundError(
          f"latent directory {directory!r} is incomplete (no {records.METADATA_NAME}: the "
          f"extraction was interrupted or is still running). Finish it by rerunning the same "
          f"command:\n    {command}")
    metadata = records.read_json(metadata_path)
    if metadata.get("format") != records.FORMAT:
      raise ValueError(f"{metadata_path}: format {metadata.get('format')!r}, expected "
                       f"{records.FORMAT!r}")
    self.metadata: dict[str, Any] = metadata
    self.num_examples = int(metadata["num_examples"])
    self.num_classes = int(metadata["num_classes"])
    # (h, w, c): the latents the diffusion model sees; moments are (h, w, 2c).
    self.latent_shape: tuple[int, int, int] = tuple(metadata["latent_shape"])
    self.moments_shape = self.latent_shape[:2] + (2 * self.latent_shape[2],)
    self.dtype: str = metadata["dtype"]
    self.image_size = int(metadata["image_size"])
    self.chunk_size = int(metadata["chunk_size"])
    self.scaling_factor = float(metadata["scaling_factor"])
    self.shift_factor: float | None = metadata.get("shift_factor")
    self.num_chunks = records.num_chunks(self.num_examples, self.chunk_size)
    names = [records.chunk_name(k) for k in range(self.num_chunks)]
    present = set(fs.listdir(directory))  # one listing: one request on Cloud Storage
    missing = [fs.join(directory, name) for name in names if name not in present]
    if missing:
      raise FileNotFoundError(
          f"latent directory {directory!r} lacks {len(missing)} of its {self.num_chunks} chunk "
          f"files (first: {missing[0]}). Delete {records.METADATA_NAME} and rerun the "
          f"extraction to rebuild them:\n    {command}")
    # Where the chunk files are read: the directory itself, or a local copy of a URL's.
    self.local_dir = directory if fs.is_local(directory) else _local_copy(
        directory, names, metadata, cache_dir)
    self._command = command
    self._check_chunks()
    self._readers: list[Any] = [None] * self.num_chunks
    self._lock = threading.Lock()

  @property
  def vae_config(self) -> VAEConfig:
    """The VAE that made the latents (decode samples with the same one)."""
    return VAEConfig.from_dict(self.metadata["vae_config"])

  def __len__(self) -> int:
    return self.num_examples

  def _chunk_records(self, chunk: int) -> int:
    return min(self.chunk_size, self.num_examples - chunk * self.chunk_size)

  def _damaged(self, chunk: int, what: str) -> ValueError:
    path = records.chunk_path(self.local_dir, chunk)
    return ValueError(
        f"latent chunk {path} is damaged ({what}). Delete it and {records.METADATA_NAME} from "
        f"{self.directory} and rerun the extraction, which rebuilds the missing chunks:\n"
        f"    {self._command}")

  def _open(self, chunk: int) -> Any:
    """A reader of chunk `chunk`, once it holds the number of records it should."""
    try:
      reader = array_record_module.ArrayRecordReader(
          records.chunk_path(self.local_dir, chunk), records.READER_OPTIONS)
      count = reader.num_records()
    except (RuntimeError, OSError) as e:  # ArrayRecord's own message names no file
      raise self._damaged(chunk, f"ArrayRecord cannot read it: {str(e) or type(e).__name__}") from e
    if count != self._chunk_records(chunk):
      try:
        reader.close()
      except RuntimeError:  # a truncated file's reader may also fail to close
        pass
      raise self._damaged(chunk, f"{count} records, expected {self._chunk_records(chunk)}")
    return reader

  def _check_chunks(self) -> None:
    """Opens every chunk once, before any training: a truncated or foreign file is refused
    here, naming it, and not when a batch first reads it (ArrayRecord reads only a file's
    footer to open it: about a millisecond a chunk)."""
    for chunk in range(self.num_chunks):
      self._open(chunk).close()

  def _reader(self, chunk: int) -> Any:
    reader = self._readers[chunk]
    if reader is None:
      with self._lock:  # two threads must not both open (and leak) a reader.
        reader = self._readers[chunk]
        if reader is None:
          reader = self._open(chunk)
          self._readers[chunk] = reader
    return reader

  def read(self, index: int) -> tuple[np.ndarray, int]:
    """The stored record of example `index`: moments `[2, h, w, 2c]` (original, flipped) in the
    stored dtype (a read-only view), and the label.

    Raises:
      ValueError: the example's chunk file is damaged (the message names it and the fix).
    """
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"example {index} outside [0, {self.num_examples})")
    chunk, position = divmod(index, self.chunk_size)
    reader = self._reader(chunk)
    try:
      record = reader.read([position])[0]
      return records.decode_record(record, self.latent_shape, self.dtype)
    except (RuntimeError, ValueError) as e:
      raise self._damaged(chunk, f"example {index}: {e}") from e

  def get(self, index: int, flip: bool = False) -> tuple[np.ndarray, int]:
    """Example `index`: float32 moments `[h, w, 2c]` (`concat([mean, logvar], -1)` of the
    image, or of its mirror when `flip`) and the label."""
    pair, label = self.read(index)
    return pair[int(bool(flip))].astype(np.float32), label

  def close(self) -> None:
    """Closes the open readers (later reads reopen them)."""
    with self._lock:
      readers, self._readers = self._readers, [None] * self.num_chunks
    for reader in readers:
      if reader is not None:
        reader.close()

  def __enter__(self) -> "LatentSource":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _local_copy(directory: str, names: list[str], metadata: dict[str, Any],
                cache_dir: str | None) -> str:
  """A local folder holding the chunk files `names` of the `gs://` latent directory."""
  # A re-extraction into the same URL (other metadata) is another copy.
  version = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()
  local = fs.cache_dir(directory, cache_dir or os.environ.get(CACHE_ENV), version)
  logger.info("latents: ArrayRecord reads only local files: copying %s to %s (files already "
               "there are kept)", directory, local)
  copied = fs.copy_to_local(directory, names, local)
  if copied:
    logger.info("latents: copied %d of the %d chunk files of %s to %s", len(copied),
                 len(names), directory, local)
  else:
    logger.info("latents: reusing the complete local copy of %s in %s", directory, local)
  return local
