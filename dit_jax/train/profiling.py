"""`config.profile_steps`: a `jax.profiler` trace of a few training steps, into the workdir.

`profile_steps = (first, count)` traces steps `first .. first + count - 1`, numbered as
`metrics.jsonl` and the checkpoints number them (step n is the n-th optimizer step, also after a
resume). The trace holds those steps only: the previous steps' device work is waited for before
it starts, and the last step's after, so the first step's compilation is in it only when
`first` is the run's first step (asked for). It lands in
`WORKDIR/profile/plugins/profile/<timestamp>/` (`*.xplane.pb` for TensorBoard's profile plugin,
`perfetto_trace.json.gz` for ui.perfetto.dev), a new folder per trace, never over an earlier
one. It holds every XLA op (by compiled module: `jit_train_step`) and JAX's and XLA's host
events, but not Python function calls (see `_options`). The profiler writes local files only
(its Perfetto export, and a `gs://` workdir's client aside), so the trace is written to a local
temporary folder and moved into the workdir by `dit_jax.fs`, on local disks and Cloud Storage
alike.

Only process 0 traces: every process runs the same SPMD program, so one process's trace shows
the step; the others' would multiply the files on a shared workdir and, on one host, collide
in name (the profiler names its files after the host).
"""
import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import jax

from dit_jax import fs

PROFILE_DIR = "profile"  # under the workdir: the TensorBoard run that holds the traces
_USAGE = "expected (first step, number of steps), e.g. --config.profile_steps=10,3; () is off"


@dataclasses.dataclass(frozen=True)
class Window:
  """Steps `first .. last` (1-based, as metrics.jsonl numbers them) are traced."""
  first: int
  count: int

  @property
  def last(self) -> int:
    return self.first + self.count - 1


def window_from_config(value: Any, num_steps: int) -> Optional[Window]:
  """The window of `config.profile_steps`; None when off (`()`, or empty on a command line).

  Raises ValueError (one line naming the key) for anything but two positive integers whose
  window starts within the run.
  """
  if value is None or tuple(value) in ((), ("",), (None,)):
    return None
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise ValueError(f"config.profile_steps: {_USAGE}; got {value!r}")
  first, count = value
  if first < 1 or count < 1:
    raise ValueError(f"config.profile_steps: the first step and the number of steps must be "
                     f"positive (steps count from 1, as in metrics.jsonl); got {value!r}")
  if first > num_steps:
    raise ValueError(f"config.profile_steps: starts at step {first}, after the run's last step "
                     f"(config.num_steps={num_steps})")
  return Window(first, count)


def _options() -> jax.profiler.ProfileOptions:
  """Every XLA op and JAX's and XLA's host events (dispatch, transfers, compiler passes), but no
  Python function calls: those are ~8000 events per step of even a one-block model, and a
  compilation's make the trace viewers' 1M-event cut drop the steps themselves."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


class StepTracer:
  """Traces the steps of a window; a context manager around the training loop.

  The loop calls `before_step(n, state)` before dispatching step n and `after_step(n, metrics)`
  after. Leaving the context (the run's end, a SIGTERM stop, an error) stops a trace still
  running, after its last dispatched step finished, and moves it into the workdir.
  """

  def __init__(self, window: Optional[Window], workdir: str, first_step: int):
    """first_step: the number of the run's first step (1 for a new run, N + 1 after resuming
    from step N). A window starting before it is not traced: it would hold this run's
    compilation instead of the steps asked for."""
    self.window = window
    self.workdir = workdir
    self.saved: Optional[str] = None  # the workdir folder of the trace, once written
    self._local: Optional[str] = None  # the temporary folder of the running trace
    self._annotation: Optional[jax.profiler.StepTraceAnnotation] = None
    self._last_metrics: Any = None
    if window is not None and window.first < first_step:
      logging.warning("config.profile_steps: steps %d-%d begin before this run's first step %d;"
                      " not tracing", window.first, window.last, first_step)
      self.window = None
    if jax.process_index() != 0:
      self.window = None

  def before_step(self, number: int, state: Any) -> None:
    """Starts the trace before the window's first step (once `state` is computed, so that no
    earlier step runs inside it); marks each step of the window for the profile's step view."""
    if self.window is None or not self.window.first <= number <= self.window.last:
      return
    if number == self.window.first:
      jax.block_until_ready(state)
      local = tempfile.mkdtemp(prefix="dit_profile_")
      try:
        jax.profiler.start_trace(local, create_perfetto_trace=True,
                                 profiler_options=_options())
      except RuntimeError as e:  # one trace per process: a caller's own trace is running
        logging.warning("config.profile_steps: not tracing: %s", e)
        shutil.rmtree(local, ignore_errors=True)
        self.window = None
        return
      self._local = local
      logging.info("Profile: tracing steps %d-%d", self.window.first, self.window.last)
    if self._local is not None:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=number)
      self._annotation.__enter__()

  def after_step(self, number: int, metrics: Any) -> None:
    """Ends the step's mark; stops the trace after the window's last step has finished."""
    if self._local is None:
      return
    self._end_annotation()
    # Only the metrics are held: the state is donated to the next step. All outputs of one
    # executable become ready together, so waiting for the metrics waits for the whole step.
    self._last_metrics = metrics
    if number == self.window.last:
      self.stop()

  def stop(self) -> None:
    """Waits for the last traced step, stops the trace and moves it into the workdir (the
    local copy is deleted)."""
    if self._local is None:
      return
    local, self._local = self._local, None
    try:
      self._end_annotation()
      try:
        jax.block_until_ready(self._last_metrics)
      finally:
        self._last_metrics = None
        jax.profiler.stop_trace()
      self.saved = move_trace(local, self.workdir)
      logging.info("Profile: %s (tensorboard --logdir %s, profile tab; or its "
                   "perfetto_trace.json.gz at ui.perfetto.dev)", self.saved, self.workdir)
    finally:
      shutil.rmtree(local, ignore_errors=True)

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      annotation, self._annotation = self._annotation, None
      annotation.__exit__(None, None, None)

  def __enter__(self) -> "StepTracer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.stop()
      return
    try:  # keep the trace of a failing run, but never hide its error
      self.stop()
    except Exception:  # pylint: disable=broad-except
      logging.exception("Profile: could not save the trace")


def move_trace(logdir: str, workdir: str) -> str:
  """Copies the trace that `jax.profiler` wrote under the local `logdir`
  (`plugins/profile/<timestamp>/`) into a new folder of the same name under
  `WORKDIR/profile/plugins/profile/` (`<timestamp>_2`, ... when a trace of the same second is
  there: one is never replaced), each file whole or not at all; returns that folder."""
  sessions = os.path.join(logdir, "plugins", "profile")
  (session,) = os.listdir(sessions)
  root = fs.join(workdir, PROFILE_DIR, "plugins", "profile")
  name, n = session, 1
  while fs.exists(fs.join(root, name)):
    n += 1
    name = f"{session}_{n}"
  target = fs.join(root, name)
  fs.makedirs(target)
  for file in sorted(os.listdir(os.path.join(sessions, session))):
    fs.copy_file(os.path.join(sessions, session, file), fs.join(target, file), overwrite=False)
  return target
