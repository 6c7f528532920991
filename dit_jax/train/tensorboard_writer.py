"""TensorBoard event files without TensorFlow: the events `tf.summary` wrote for clu's writers.

A run's scalars (`train/loss`, ...), its sample grids and its config (TensorBoard's HPARAMS tab)
go to one event file per writer, `LOGDIR/events.out.tfevents.<time>.<host>.<pid>.<n>.v2`, in
TensorFlow 2's format, which TensorBoard shows as it showed clu's `SummaryWriter`:
  - a scalar: a float32 tensor summary of the "scalars" plugin;
  - an image: a string tensor `[width, height, png, ...]` of the "images" plugin, uint8 pixels
    encoded as PNG (`images.encode_png`, the encoder of the grids saved beside it);
  - hyperparameters: the hparams plugin's session start at step 0 (`hparams_pb`).
Each event is a TFRecord (length, masked CRC-32C, data, masked CRC-32C). The protos, the plugins'
metadata and the record framing are the `tensorboard` package's own pure-Python parts; nothing
here imports TensorFlow, whose import cost every training process seconds of CPU.

Writing happens off the training thread, as it did behind clu's `AsyncMultiWriter`: `write_*`
checks its arguments, queues them and returns; one background thread builds the events (the PNG
encoding included) and appends them in order. An error there (a full disk) is raised once, by
the next call, and the writer writes nothing more. `flush()` returns when everything queued is
in the file; `close()` flushes, closes the file and ends the thread.

The file is opened through `dit_jax.fs`. A local file is flushed after every write call, so
TensorBoard follows a run as it goes. A Cloud Storage object cannot be appended to: epath with
TensorFlow's GCS client uploads it whole at each flush, so there the writer flushes at most every
`flush_secs` (and at `flush()` and `close()`); through gcsfs the object appears at `close()`.
"""
import concurrent.futures
import itertools
import os
import socket
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from dit_jax import fs
from dit_jax import images as image_io


def scalars_summary(scalars: Mapping[str, float]) -> summary_pb2.Summary:
  """One float32 tensor summary of the "scalars" plugin per tag, as `tf.summary.scalar`."""
  summary = summary_pb2.Summary()
  for tag, value in scalars.items():
    summary.value.extend(scalar_summary.scalar_pb(tag, value).value)
  return summary


def images_summary(images: Mapping[str, np.ndarray]) -> summary_pb2.Summary:
  """Per tag, uint8 `[num_images, height, width, channels]` as `tf.summary.image` writes them:
  the strings `[width, height, PNG of each image]`, with the "images" plugin's metadata."""
  summary = summary_pb2.Summary()
  for tag, batch in images.items():
    _, height, width, _ = batch.shape
    strings = [str(width).encode(), str(height).encode(), *map(image_io.encode_png, batch)]
    summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(strings),
                      metadata=image_metadata.create_summary_metadata(display_name=None,
                                                                      description=None))
  return summary


def _check_images(images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  checked = {}
  for tag, batch in images.items():
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
      raise ValueError(f"images {tag!r}: uint8 [num_images, height, width, 1|3|4] expected, got "
                       f"{batch.dtype} {batch.shape}")
    checked[tag] = batch
  return checked


class TensorBoardWriter:
  """Scalars, images and hyperparameters of one run, written to a new event file in `logdir`
  by a background thread (see the module docstring)."""

  def __init__(self, logdir: str, flush_secs: float = 60.0):
    """Creates the event file (a local path or a `gs://` URL) and its first event.

    flush_secs: on Cloud Storage, the least time between two uploads of the file (a local file
      is flushed after every write call).
    """
    self.path = self._new_file_name(logdir)
    self._local = fs.is_local(self.path)
    self._flush_secs = flush_secs
    fs.makedirs(logdir)
    self._file = fs.path(self.path).open("wb")
    self._records = RecordWriter(self._file)
    self._last_flush = time.monotonic()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="TensorBoardWriter")
    self._error: Optional[Exception] = None  # the thread's first error: it writes no more
    self._raised = False  # whether a call raised it already
    self._closed = False
    self._write(lambda: event_pb2.Event(
        wall_time=time.time(), file_version="brain.Event:2",
        source_metadata=event_pb2.SourceMetadata(writer="dit_jax.train.tensorboard_writer")))

  @staticmethod
  def _new_file_name(logdir: str) -> str:
    """`events.out.tfevents.<seconds>.<host>.<pid>.<n>.v2`, TensorFlow's name for the file, with
    the smallest n that no file in `logdir` has (a run resumed in the same second)."""
    prefix = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    names = (fs.join(logdir, f"{prefix}.{n}.v2") for n in itertools.count())
    return next(name for name in names if not fs.exists(name))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """`scalars` (tag -> number), as float32, at `step`."""
    scalars, wall_time = dict(scalars), time.time()
    self._write(lambda: event_pb2.Event(wall_time=wall_time, step=step,
                                        summary=scalars_summary(scalars)))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images` (tag -> uint8 `[num_images, height, width, 1|3|4]`) at `step`."""
    images, wall_time = _check_images(images), time.time()
    self._write(lambda: event_pb2.Event(wall_time=wall_time, step=step,
                                        summary=images_summary(images)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Hyperparameters (name -> bool, int, float or str) for TensorBoard's HPARAMS tab."""
    hparams, wall_time = dict(hparams), time.time()
    self._write(lambda: event_pb2.Event(wall_time=wall_time, step=0,
                                        summary=hparams_summary.hparams_pb(hparams)))

  def flush(self) -> None:
    """Returns when every event queued so far is in the file (uploaded, on Cloud Storage)."""
    self._check()
    self._pool.submit(self._guarded, self._flush_file).result()
    self._check()

  def close(self) -> None:
    """Flushes, closes the file (even after an error) and ends the thread; again: nothing."""
    if self._closed:
      return
    self._closed = True
    self._pool.submit(self._close_file)
    self._pool.shutdown(wait=True)
    self._check()

  def _write(self, make_event: Callable[[], event_pb2.Event]) -> None:
    """Queues the event that `make_event` builds (on the thread) to be appended."""
    self._check()
    if self._closed:
      raise ValueError(f"TensorBoard writer of {self.path} is closed")
    self._pool.submit(self._guarded, self._append, make_event)

  def _check(self) -> None:
    """Raises the thread's error, once (only the calling thread reads or sets `_raised`)."""
    if self._error is not None and not self._raised:
      self._raised = True
      raise self._error

  def _guarded(self, work: Callable[..., None], *args: Any) -> None:
    """Runs `work` on the thread unless an earlier error stopped the writer; keeps its error."""
    if self._error is not None:
      return
    try:
      work(*args)
    except Exception as e:  # pylint: disable=broad-except  # raised by the next call
      self._error = e

  def _append(self, make_event: Callable[[], event_pb2.Event]) -> None:
    self._file_op(self._records.write, make_event().SerializeToString())
    if self._local or time.monotonic() - self._last_flush >= self._flush_secs:
      self._flush_file()

  def _flush_file(self) -> None:
    self._file_op(self._file.flush)
    self._last_flush = time.monotonic()

  def _close_file(self) -> None:
    """Closes the file; an error closing it counts only if the writer had none."""
    try:
      self._file_op(self._file.close)
    except Exception as e:  # pylint: disable=broad-except  # raised by close()
      if self._error is None:
        self._error = e

  def _file_op(self, op: Callable[..., None], *args: Any) -> None:
    """`op(*args)` on the file, an OSError naming it (a failed write alone does not)."""
    try:
      op(*args)
    except OSError as e:
      if e.filename:
        raise
      raise OSError(e.errno, e.strerror, self.path) from e
