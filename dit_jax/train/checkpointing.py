"""Orbax checkpoints of the train state, with the config inside, and preemption handling.

The format (items, saved config, process) is `dit_jax.checkpoints`'; this module manages the
writing: when to save, which steps to keep, background saves, preemption.
"""
import logging
import signal
import sys
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dit_jax import checkpoints, cli, fs
from dit_jax.diffusion import Process
from dit_jax.train import resume_check


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step here, then renames it
UNREADABLE_DIR = "unreadable_checkpoints"  # in the workdir: steps that failed to restore


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a different model."""


class CheckpointWriteError(cli.WriteError):
  """A checkpoint could not be written (a full disk, a quota, a lost mount): the run stops."""


class Checkpointer:
  """Async orbax CheckpointManager keeping the last `keep` plus every `keep_period`-th step."""

  def __init__(self, directory: str, *, keep: int, keep_period: Optional[int],
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, create=True,
        # Created in save(): a folder that cannot be created fails there, at once. Created in
        # the background, its failure left orbax's other save threads waiting for it, so that
        # the process hung at exit for AsyncOptions.timeout_secs (20 minutes).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.directory = directory
    self.skipped: dict[int, str] = {}  # steps that failed to read: step -> why
    self._in_flight: Optional[int] = None  # the step of the save last started
    self._failed = False  # a save failed: reported once, the run stops
    self._remove_unfinished_saves()
    with checkpoints.quiet_step_scan():
      self.manager = ocp.CheckpointManager(directory, options=options)

  def _remove_unfinished_saves(self) -> None:
    """Deletes the temporary folders of saves that never finished (a killed run's)."""
    if jax.process_index() != 0 or not fs.is_dir(self.directory):
      return
    for name in fs.listdir(self.directory):
      if TMP_SUFFIX in name:
        path = fs.join(self.directory, name)
        fs.remove_tree(path)
        logging.warning("checkpoint: removed %s, the temporary folder of a save that did not "
                        "finish", path)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict[str, Any]:
    return checkpoints.read_config(self.manager, step)

  def check_compatible(self, model_arch: dict[str, Any], process: Optional[Process] = None
                       ) -> Optional[tuple[int, dict[str, Any]]]:
    """Refuses (before anything is written) a workdir whose checkpoints are another model's,
    or (given `process`) were trained for another process (`resume_check.check_process`,
    said first: the process may explain the architecture's differences).

    Returns (step, config item) of the newest step whose config reads; None without steps.
    """
    if not self.manager.all_steps():
      return None
    step, config = checkpoints.first_readable(self.manager.all_steps(), self.saved_config,
                                              self.skipped, self.directory)
    if process is not None:
      resume_check.check_process(config, step, process, self.directory)
    saved = config.get("model", {})
    diff = sorted(k for k in set(saved) | set(model_arch) if saved.get(k) != model_arch.get(k))
    if diff:
      details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {model_arch.get(k)!r}"
                          for k in diff)
      raise IncompatibleCheckpointError(
          f"workdir: {self.directory} holds checkpoints (step {step}) of a different model "
          f"({details}); use another --workdir. Nothing was written.")
    return step, config

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    return checkpoints.read_state(self.manager, step, abstract_state)

  def restore_newest(self, abstract_state: Any) -> tuple[Optional[int], Any]:
    """(step, state) of the newest step that restores; (None, None) when there is none.

    Steps that fail (on any process) are reported in one line each and skipped; the unreadable
    steps newer than the one restored are moved aside to `<workdir>/unreadable_checkpoints/`,
    never deleted, so that the run can save those steps again.
    """
    if not self.manager.all_steps():
      return None, None

    def read(step: int) -> Any:
      try:
        state, error = self.restore(step, abstract_state), None
      except Exception as e:  # pylint: disable=broad-except
        state, error = None, e
      if not _on_every_process(error is None):
        raise error or RuntimeError("another process could not read it")
      return state

    step, state = checkpoints.first_readable(self.manager.all_steps(), read, self.skipped,
                                             self.directory)
    self._set_aside(sorted(s for s in self.skipped if s > step), step)
    return step, state

  def _set_aside(self, steps: list[int], resumed: int) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      aside = fs.join(fs.path(self.directory).parent, UNREADABLE_DIR)
      fs.makedirs(aside)
      for step in steps:
        target = fs.join(aside, str(step))
        while fs.exists(target):  # an earlier one of the same step
          target += "+"
        fs.rename(fs.join(self.directory, str(step)), target)
        logging.warning("checkpoint: moved the unreadable step %d to %s; training resumes from "
                        "step %d", step, target, resumed)
    for step in steps:
      del self.skipped[step]  # gone from the directory: a new save of the step will be read
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dit_jax: unreadable checkpoints set aside")
    with checkpoints.quiet_step_scan():
      self.manager.reload()

  def save(self, step: int, state: Any, config: dict[str, Any], force: bool = False) -> bool:
    """Starts saving `step` (in the background when async); False if the manager skipped it.

    Raises CheckpointWriteError if this save, or the one before it, failed to write.
    """
    self.wait()  # the save before (orbax would wait for it too): its failure is its own
    self._in_flight = step
    try:
      saved = checkpoints.write_state(self.manager, step, state, config, force=force)
      if not self.manager.is_saving_in_progress():  # a synchronous save: it has ended
        self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  (any failure: the save is lost)
      raise self._write_error(e) from e
    if saved:
      logging.info("Checkpoint: %s", fs.join(self.directory, str(step)))
    return saved

  def failure(self) -> Optional[CheckpointWriteError]:
    """The error of a background save that failed, if one has; never waits for a save."""
    if self._in_flight is None or self.manager.is_saving_in_progress():
      return None
    try:
      self.manager.wait_until_finished()  # returns at once: nothing is in progress
    except Exception as e:  # pylint: disable=broad-except
      return self._write_error(e)
    return None

  def check(self) -> None:
    """Raises CheckpointWriteError if a background save has failed; never waits for one."""
    error = self.failure()
    if error is not None:
      raise error from error.__cause__

  def _write_error(self, error: BaseException) -> CheckpointWriteError:
    self._failed = True
    write_error = CheckpointWriteError(self._failure_message(error))
    write_error.__cause__ = error
    return write_error

  def _failure_message(self, error: BaseException) -> str:
    good = [s for s in checkpoints.finished_steps(self.directory) if s != self._in_flight]
    kept = (f"the last checkpoint is step {max(good)}" if good else
            "no checkpoint was written before it")
    return (f"checkpoint: could not write step {self._in_flight} to "
            f"{fs.join(self.directory, str(self._in_flight))} "
            f"({checkpoints.reason(error)}); stopping; {kept}")

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def close(self) -> None:
    """Waits for pending saves and releases the manager. Idempotent.

    After a failed save (already reported) the error is not raised again.
    """
    if self.manager is None:
      return
    manager, self.manager = self.manager, None
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not self._failed:
        self.manager = manager
        raise self._write_error(e) from e
    manager.close()


def _on_every_process(ok: bool) -> bool:
  """True when `ok` holds on every process (all of them call this together)."""
  return not any_process(not ok)[0]


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag, true if it is true on any process (all of them call this together)."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  gathered = np.asarray(multihost_utils.process_allgather(np.array(flags, bool)))
  return tuple(bool(f) for f in gathered.reshape(-1, len(flags)).any(axis=0))


class PreemptionHandler:
  """Turns SIGTERM (a preemption) and a first Ctrl-C (SIGINT) into a request to checkpoint and
  stop, agreed on by every process. A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: Optional[str] = None  # of the first signal received
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("Ctrl-C: checkpointing at the end of this step, then stopping (Ctrl-C again to "
            "stop now)", file=sys.stderr, flush=True)

  @property
  def requested(self) -> bool:
    """Whether this process got SIGTERM or SIGINT (`any_process` makes every process agree)."""
    return self.signal_name is not None

  def close(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
