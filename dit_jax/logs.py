"""What a run prints: our own lines at INFO, the libraries' only from WARNING up.

The entry points call `setup()` first thing in `main()`. What it cuts, each at its source:
- orbax (several lines per file operation of every checkpoint), clu, tfds and grain INFO: they
  all log through absl's one Python logger, "absl", so its level is the per-library knob;
- JAX's backend probing at INFO ("Unable to initialize backend 'tpu'") and TensorFlow's Python
  INFO: the "jax" and "tensorflow" loggers;
- TensorFlow's C++ INFO: `TF_CPP_MIN_LOG_LEVEL=1` keeps its warnings and errors. TensorFlow
  2.21 ignores it for what it logs while loading (the oneDNN notice, twice, each after absl's
  "before absl::InitializeLog()" notice: abseil logs everything until initialized, see
  tensorflow/tensorflow#100442), so `import_tensorflow()` imports TensorFlow itself and drops
  exactly those INFO lines of the import, passing anything else through.
- the tracebacks of abandoned orbax reads: when a restore fails (a damaged checkpoint), the
  reads still in flight complete on the event loop orbax has closed ("RuntimeError: Event loop
  is closed") or fail in coroutines nobody awaits any more, each printing a traceback through
  `sys.unraisablehook`, hundreds of lines hiding the real error. `setup` drops exactly those;
  the restore's own error is reported, in one line, where it is caught; and the tracebacks
  orbax logs from its threads for a failed save (`OrbaxFailureTracebacks`), which it raises to
  the run, which reports it in one line.
Our modules log with the standard `logging` (the root logger, which absl's handler prints), so
their INFO lines stay. `--verbosity=1` (absl's flag; debug) leaves every library as it was.

TensorFlow is imported only by the code that needs it, through `import_tensorflow()`: tfds
(`dit_jax.data.tfds_source`, `dit_jax.data.prepare`) and `gs://` paths while TensorFlow is
installed (`dit_jax.fs`: epath reaches Cloud Storage through TensorFlow's client). Training on
digits or an image folder, sampling and the TensorBoard events (`dit_jax.train.tensorboard_writer`)
never import it: its import costs a process about 5 s of CPU.
"""
import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable, Iterator, Optional

# absl (orbax, clu, tfds, grain log through it), JAX, TensorFlow, and the Cloud Storage clients
# of gs:// paths (fsspec logs a line per file it opens).
LIBRARY_LOGGERS = ("absl", "jax", "tensorflow", "fsspec", "gcsfs", "google")
# An absl C++ INFO line (`I0000 00:00:1795745603.357494 3130 port.cc:153] ...`) and the notice
# abseil prints before its first line when nothing initialized its logging.
_CPP_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] ")
_ABSL_PREINIT = ("WARNING: All log messages before absl::InitializeLog() is called are written "
                 "to STDERR")
# One import of TensorFlow at a time: each redirects the process's stderr while it runs.
_TENSORFLOW_IMPORT = threading.Lock()


def setup(verbose: Optional[bool] = None, tensorflow: bool = False) -> None:
  """Keeps the console to what a user reads. Call it before TensorFlow or JAX is imported.

  Args:
    verbose: keep the libraries' INFO lines too. Default: whether absl's `--verbosity` was
      raised to debug (>= 1).
    tensorflow: also import TensorFlow now (`import_tensorflow`), for a program that uses it
      from the start (`dit_jax.data.prepare`: tfds builds datasets with it). The others leave
      it to the code that needs it.
  """
  if verbose is None:
    verbose = _verbosity_raised()
  if not verbose:
    _quiet_libraries()
  if tensorflow:
    import_tensorflow(verbose)


def _quiet_libraries() -> None:
  """What `setup` cuts (see the module docstring)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # 1: warnings and errors
  sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, AbandonedReadFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(AbandonedReadFilter())
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, OrbaxFailureTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(OrbaxFailureTracebacks())
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  # A failed save's other writes, never started, are garbage-collected as the process ends.
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=r"coroutine '[\w.<>]*write_fragment' was never awaited")


def import_tensorflow(verbose: Optional[bool] = None) -> Any:
  """TensorFlow for the code that needs it (see the module docstring); None if not installed.

  Imported on the first call without its load-time INFO lines (unless `verbose`, as in `setup`),
  and on every call with the GPUs hidden from it: they are JAX's, and TensorFlow would take their
  memory the moment it ran an operation. Call it before anything else imports TensorFlow (tfds
  or epath would, with its INFO lines and the GPUs in view); hiding the GPUs from a TensorFlow
  that already placed operations on them fails (RuntimeError).
  """
  with _TENSORFLOW_IMPORT:
    if "tensorflow" not in sys.modules:
      if importlib.util.find_spec("tensorflow") is None:
        return None
      if verbose is None:
        verbose = _verbosity_raised()
      if verbose:
        import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      else:
        _import_tensorflow_without_info()
  tf = sys.modules["tensorflow"]
  if tf is None:  # made unimportable (sys.modules["tensorflow"] = None), as some tests do
    return None
  tf.config.set_visible_devices([], "GPU")  # a no-op when already hidden
  return tf


@contextlib.contextmanager
def without_warnings(logger: str) -> Iterator[None]:
  """Drops `logger`'s warnings in the block, unless it logs below WARNING (verbose runs): for a
  library that warns about what the calling code then reports in its own error."""
  log = logging.getLogger(logger)
  level = log.level
  if level >= logging.WARNING:
    log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def _verbosity_raised() -> bool:
  """Whether absl's `--verbosity` was raised to debug (>= 1): every library's INFO lines kept."""
  from absl import flags
  return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
  """The one progress bar of long jobs (sampling, latent extraction): images, img/s, ETA.

  A tqdm bar (`update(n)`, `close()`) on stderr; when not `enabled` (another process than the
  first, or `progress=False`) the same object, silent.
  """
  from tqdm import tqdm  # only the programs with long jobs need it
  return tqdm(total=total, initial=initial, unit="img", desc=desc, smoothing=0.1,
              disable=not enabled)


def _abandoned_read(unraisable: Any) -> bool:
  """An error of a read that a failed orbax restore left behind (see the module docstring)."""
  value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  return code is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename


class AbandonedReadFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" for orbax's abandoned reads and writes.

  When one item of a checkpoint fails to restore, orbax abandons its other reads; their futures
  fail too and, when garbage-collected, asyncio logs each at ERROR with a traceback (the one
  line that reports the unreadable step has already said why). A save that fails (a full disk)
  leaves its other writes' tasks the same way; the save's error is reported in one line too.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    # asyncio names the kind: Future, Task, _GatheringFuture.
    if "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
      return True
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    if "tensorstore_spec" in str(error) or "OCDBT database" in str(error):  # orbax's storage
      return False
    tb = error.__traceback__
    while tb is not None:
      if f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


class OrbaxFailureTracebacks(logging.Filter):
  """Drops the tracebacks orbax logs for a failed background save, from each of its threads.

  A save that fails (a full disk) is logged with its traceback by every layer it passes
  through (the write thread, the commit thread, the finalize thread, `wait_until_finished`),
  and then raised to the caller, where the run reports it in one line naming the file
  (`dit_jax.train.checkpointing`). Orbax's records without a traceback stay.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    in_orbax = f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname
    return not (in_orbax and record.levelno >= logging.ERROR and record.exc_info)


def _without_closed_loop_errors(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """`hook`, minus the errors of reads that a failed restore abandoned."""
  if getattr(hook, "drops_closed_loop_errors", False):
    return hook  # setup called twice

  def filtered(unraisable: Any) -> None:
    if not _abandoned_read(unraisable):
      hook(unraisable)

  filtered.drops_closed_loop_errors = True
  return filtered


def _import_tensorflow_without_info() -> None:
  """Imports TensorFlow with file descriptor 2 captured, then writes back all but its INFO."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        if line != _ABSL_PREINIT and not _CPP_INFO.match(line):
          print(line, file=sys.stderr)
