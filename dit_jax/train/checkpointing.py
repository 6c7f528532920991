"""Orbax checkpoints of the train state, with the config inside, and preemption handling.

The format (items, saved config, process) is `dit_jax.checkpoints`'; this module manages the
writing: when to save, which steps to keep, background saves, preemption.
"""
import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dit_jax import checkpoints


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
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict[str, Any]:
    return checkpoints.read_config(self.manager, step)

  def check_compatible(self, model_arch: dict[str, Any]) -> None:
    """Refuses (before anything is written) a workdir whose checkpoints are another model's."""
    step = self.latest_step()
    if step is None:
      return
    saved = self.saved_config(step).get("model", {})
    diff = sorted(k for k in set(saved) | set(model_arch) if saved.get(k) != model_arch.get(k))
    if diff:
      details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {model_arch.get(k)!r}"
                          for k in diff)
      raise IncompatibleCheckpointError(
          f"workdir: {self.directory} holds checkpoints (step {step}) of a different model "
          f"({details}); use another --workdir. Nothing was written.")

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    return checkpoints.read_state(self.manager, step, abstract_state)

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
