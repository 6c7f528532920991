"""Orbax checkpoints of the train state, with the config inside, and preemption handling.

The format (items, saved config, process) is `dit_jax.checkpoints`'; this module manages the
writing: when to save, which steps to keep, background saves, preemption.
"""
import logging
import os
import shutil
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dit_jax import checkpoints


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step here, then renames it
UNREADABLE_DIR = "unreadable_checkpoints"  # in the workdir: steps that failed to restore


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a different model."""


class Checkpointer:
  """Async orbax CheckpointManager keeping the last `keep` plus every `keep_period`-th step."""

  def __init__(self, directory: str, *, keep: int, keep_period: Optional[int],
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, create=True)
    self.directory = directory
    self.skipped: dict[int, str] = {}  # steps that failed to read: step -> why
    self._remove_unfinished_saves()
    with checkpoints.quiet_step_scan():
      self.manager = ocp.CheckpointManager(directory, options=options)

  def _remove_unfinished_saves(self) -> None:
    """Deletes the temporary folders of saves that never finished (a killed run's)."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if TMP_SUFFIX in name:
        path = os.path.join(self.directory, name)
        shutil.rmtree(path)
        logging.warning("checkpoint: removed %s, the temporary folder of a save that did not "
                        "finish", path)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict[str, Any]:
    return checkpoints.read_config(self.manager, step)

  def check_compatible(self, model_arch: dict[str, Any]) -> Optional[tuple[int, dict[str, Any]]]:
    """Refuses (before anything is written) a workdir whose checkpoints are another model's.

    Returns (step, config item) of the newest step whose config reads; None without steps.
    """
    if not self.manager.all_steps():
      return None
    step, config = checkpoints.first_readable(self.manager.all_steps(), self.saved_config,
                                              self.skipped, self.directory)
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
      aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):  # an earlier one of the same step
          target += "+"
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("checkpoint: moved the unreadable step %d to %s; training resumes from "
                        "step %d", step, target, resumed)
    for step in steps:
      del self.skipped[step]  # gone from the directory: a new save of the step will be read
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dit_jax: unreadable checkpoints set aside")
    with checkpoints.quiet_step_scan():
      self.manager.reload()

  def save(self, step: int, state: Any, config: dict[str, Any], force: bool = False) -> bool:
    """Starts saving `step` (in the background when async); False if the manager skipped it."""
    saved = checkpoints.write_state(self.manager, step, state, config, force=force)
    if saved:
      logging.info("Checkpoint: %s", os.path.join(self.directory, str(step)))
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager. Idempotent."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def _on_every_process(ok: bool) -> bool:
  """True when `ok` holds on every process (all of them call this together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class PreemptionHandler:
  """Turns SIGTERM into a request to checkpoint and stop, agreed on by every process."""

  def __init__(self):
    self._requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def should_stop(self) -> bool:
    """True on every process once any process got SIGTERM."""
    if jax.process_count() == 1:
      return self._requested
    flags = multihost_utils.process_allgather(np.array(self._requested))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
