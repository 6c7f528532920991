"""The checkpoint format, defined here and nowhere else: item names, saved config, process, step.

Layout: an orbax `CheckpointManager` directory whose step directories hold
  - `config` (JSON): `model` = `DiT.arch_config()`, so that a later tool rebuilds the model from
    the checkpoint alone; `process` = the process (`Process.to_dict`) the weights were trained
    for, which sampling must use; a training checkpoint adds `run` (the whole run config), an
    imported one where its weights came from;
  - `params`: a parameter tree in the unscanned layout (`save_params`: `python -m
    dit_jax.convert` writes one at step 0), or `state`: a TrainState (a training checkpoint,
    written through `write_state` by `dit_jax.train.checkpointing`), whose `params` or
    `ema_params` load alone, without the optimizer state.
Checkpoints written before the process was recorded: a training checkpoint's process is read
from its `run.diffusion`, an imported one's is the official process.
"""
import contextlib
import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from dit_jax import fs
from dit_jax.diffusion import OFFICIAL_PROCESS, DiffusionProcess, Process, process_from_dict
from dit_jax.models import DiT, model_from_config, stack_block_params, unstack_block_params

# Item names of a step directory.
PARAMS_ITEM = "params"  # a parameter tree (convert output)
STATE_ITEM = "state"  # a TrainState (training checkpoint)
CONFIG_ITEM = "config"  # JSON: saved_config()


def saved_config(model: DiT, process: Process, **extra: Any) -> dict[str, Any]:
  """The `config` item: the architecture, the process, and `extra` (`run`, `source`, ...)."""
  return {"model": model.arch_config(), "process": process.to_dict(), **extra}


def process_of(config: dict[str, Any]) -> Process:
  """The process a checkpoint's `config` item records (older layouts included)."""
  if "process" in config:
    return process_from_dict(config["process"])
  if "diffusion" in config.get("run", {}):  # a training checkpoint from before `process`
    return DiffusionProcess.from_config(config["run"]["diffusion"])
  # An imported official checkpoint from before `process`: the official process.
  learn_sigma = config.get("model", {}).get("learn_sigma", OFFICIAL_PROCESS.learn_sigma)
  return dataclasses.replace(OFFICIAL_PROCESS, learn_sigma=bool(learn_sigma))


class _NoMissingMetadataWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def quiet_step_scan() -> Iterator[None]:
  """Opening a manager (or `reload`) reads every step's metadata, and orbax warns about each
  incomplete step folder; reading such a step reports it once (`first_readable`), so drop
  orbax's warning."""
  absl_logger, quiet = logging.getLogger("absl"), _NoMissingMetadataWarning()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax writes it last: a step folder without it is
# a save that did not finish


def _check_complete(manager: ocp.CheckpointManager, step: int) -> None:
  """Refuses a step folder that orbax never finished (it would log a warning of its own)."""
  path = fs.join(manager.directory, str(step))
  if fs.is_dir(path) and not fs.listdir(path):
    raise ValueError("an empty folder")
  if fs.is_dir(path) and not fs.exists(fs.join(path, STEP_METADATA)):
    raise ValueError(f"no {STEP_METADATA}: a save that did not finish")


def finished_steps(directory: str) -> list[int]:
  """The steps of `directory` whose save finished, as the disk has them (orbax's own list
  forgets a step it meant to rotate out as soon as a newer save starts, even one that fails)."""
  if not fs.is_dir(directory):
    return []
  return sorted(int(name) for name in fs.listdir(directory)
                if name.isdigit() and fs.exists(fs.join(directory, name, STEP_METADATA)))


def write_state(manager: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any],
                force: bool = False) -> bool:
  """Starts saving a training checkpoint (state and config); False if the manager skipped it."""
  return manager.save(step, force=force, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(config)}))


def read_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """A training checkpoint's state, onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
  _check_complete(manager, step)
  restored = manager.restore(
      step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE_ITEM]


def read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """A step's `config` item."""
  _check_complete(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{CONFIG_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[CONFIG_ITEM])


def _unscanned(params: dict[str, Any]) -> dict[str, Any]:
  return unstack_block_params(params) if "blocks" in params else params


def save_params(directory: str, params: dict[str, Any], model: DiT, step: int = 0,
                process: Optional[Process] = None,
                extra_config: Optional[dict[str, Any]] = None) -> str:
  """Writes `params` (either block layout), the model config and the process; refuses to
  overwrite.

  process: what the weights were trained for; None: the official process (imported weights).
  Returns the absolute checkpoint directory.
  """
  if process is None:
    process = dataclasses.replace(OFFICIAL_PROCESS, learn_sigma=model.learn_sigma)
  directory = fs.absolute(directory)
  if fs.exists(directory) and fs.listdir(directory):
    raise FileExistsError(f"--out: {directory} already exists and is not empty; refusing to "
                          "overwrite it")
  config = saved_config(model, process, **(extra_config or {}))
  params = jax.tree.map(np.asarray, _unscanned(params))
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params),
                                                  CONFIG_ITEM: ocp.args.JsonSave(config)}))
    manager.wait_until_finished()
  return directory


def _manager_dir(directory: str) -> str:
  """A convert output or a checkpoints folder as given; a training workdir's `checkpoints`."""
  directory = fs.absolute(directory)
  nested = fs.join(directory, "checkpoints")
  return nested if fs.is_dir(nested) else directory


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager for reading, that knows every item a checkpoint of ours may hold.

  Items are read through the manager, which knows the step's layout (`_CHECKPOINT_METADATA`
  is a file of the step directory, not of each item), and with their handlers registered, so
  orbax can read an item's metadata and restore one item without the others.
  """
  if not fs.is_dir(directory):
    raise FileNotFoundError(f"checkpoint: no directory {directory}")
  handlers = {item: ocp.PyTreeCheckpointHandler() for item in (PARAMS_ITEM, STATE_ITEM)}
  handlers[CONFIG_ITEM] = ocp.JsonCheckpointHandler()
  # Not `read_only=True`: that only adds warnings about the saves this manager never makes.
  options = ocp.CheckpointManagerOptions(create=False)
  with quiet_step_scan():
    return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


class UnreadableCheckpointError(ValueError):
  """No step of a checkpoint directory (or not the step asked for) can be read."""


# How tensorstore ends the message of a failed file operation: `... "PATH": ... MESSAGE
# [os_error_code='27']`. The OS's message and the file say more than the pages before them.
_OS_ERROR = re.compile(r'"([^"]+)": (?:[^"]*: )?([^":]+?) \[os_error_code=\'?(\d+)')


def reason(error: BaseException) -> str:
  """One short line saying why a step failed to read or write (orbax messages run to pages; the
  first cause is the tensorstore error that names the file, e.g. OUT_OF_RANGE)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  os_error = _OS_ERROR.search(text)
  if os_error is not None and len(text) > 240:
    path, message, code = os_error.groups()
    text = f"{message} (errno {code}): {path}"
  return text if len(text) <= 240 else text[:237] + "..."


def first_readable(steps: Sequence[int], read: Callable[[int], Any], skipped: dict[int, str],
                   where: str) -> tuple[int, Any]:
  """`(step, read(step))` of the newest step that reads; the others are reported and skipped.

  A step that fails (an empty or incomplete step folder, a truncated or missing file) is
  reported in one line and recorded in `skipped` (step -> reason), so that a later call with
  the same `skipped` neither reads nor reports it again. Nothing is deleted.
  """
  for step in sorted(set(steps) - set(skipped), reverse=True):
    try:
      return step, read(step)
    except Exception as e:  # pylint: disable=broad-except  (any failure: the step is unusable)
      skipped[step] = reason(e)
      logging.warning("checkpoint: step %d of %s cannot be read (%s); skipping it", step, where,
                      skipped[step])
  if not skipped:
    raise FileNotFoundError(f"checkpoint: {where} holds no checkpoint steps")
  raise UnreadableCheckpointError(
      f"checkpoint: no step of {where} can be read: "
      + "; ".join(f"step {s}: {r}" for s, r in sorted(skipped.items(), reverse=True)))


class Reader:
  """Reads one checkpoint directory: a training workdir, its `checkpoints`, a convert output.

  With no step asked for, the newest step that reads is used; each step that does not is
  reported once (per reader) and skipped. An explicit step that does not read is an error.
  """

  def __init__(self, directory: str):
    self.directory = _manager_dir(directory)
    self.manager = _reader(self.directory)
    self.skipped: dict[int, str] = {}

  def __enter__(self) -> "Reader":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.manager.close()

  def _read(self, step: Optional[int], read: Callable[[int], Any]) -> tuple[int, Any]:
    steps = self.manager.all_steps()
    if step is None:
      return first_readable(steps, read, self.skipped, self.directory)
    if step not in steps:
      raise FileNotFoundError(f"checkpoint: {self.directory} has no step {step}; it holds "
                              f"steps {sorted(steps)}")
    try:
      return step, read(step)
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f"checkpoint: step {step} of {self.directory} cannot "
                                      f"be read ({reason(e)})") from e

  def config(self, step: Optional[int] = None) -> tuple[dict[str, Any], int]:
    """(the config item, its step)."""
    step, config = self._read(step, functools.partial(read_config, self.manager))
    return config, step

  def load_for_sampling(self, step: Optional[int] = None, use_ema: bool = True,
                        **runtime: Any) -> tuple[DiT, Process, dict[str, Any]]:
    """See the module-level `load_for_sampling`."""
    return self.load_step_for_sampling(step, use_ema, **runtime)[1]

  def load_step_for_sampling(self, step: Optional[int] = None, use_ema: bool = True,
                             **runtime: Any) -> tuple[int, tuple[DiT, Process, dict[str, Any]]]:
    """`(the step read, load_for_sampling's result)`. With no step asked for, the newest whose
    weights read: older than `config()`'s when only the newest step's weights are damaged."""
    return self._read(step, functools.partial(self._load, use_ema=use_ema, runtime=runtime))

  def _load(self, step: int, use_ema: bool, runtime: dict[str, Any]
            ) -> tuple[DiT, Process, dict[str, Any]]:
    config = read_config(self.manager, step)
    if "model" not in config:
      raise ValueError("no 'model' entry in its config")
    model = model_from_config(config["model"], **runtime)
    if STATE_ITEM in self.manager.item_metadata(step):  # a training checkpoint
      params = _restore_numpy(self.manager, step, STATE_ITEM,
                              "ema_params" if use_ema else "params")
    else:
      params = _restore_numpy(self.manager, step, PARAMS_ITEM)
    params = _unscanned(params)
    if model.scan_blocks:
      params = stack_block_params(params, model.depth)
    return model, process_of(config), params


def load_config(directory: str, step: Optional[int] = None) -> tuple[dict[str, Any], int]:
  """Reads the JSON config of a checkpoint directory; returns (config, step)."""
  with Reader(directory) as reader:
    return reader.config(step)


def _restore_numpy(manager: ocp.CheckpointManager, step: int, item: str,
                   subtree: Optional[str] = None) -> Any:
  """One pytree item (or its top-level `subtree`) as host numpy arrays, whatever mesh saved it."""
  tree = manager.item_metadata(step)[item].tree
  if subtree is not None:
    tree = {subtree: tree[subtree]}  # e.g. only the EMA weights of a TrainState
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=subtree is not None)}))[item]
  return restored if subtree is None else restored[subtree]


def load_for_sampling(directory: str, step: Optional[int] = None, use_ema: bool = True,
                      **runtime: Any) -> tuple[DiT, Process, dict[str, Any]]:
  """Rebuilds the model and its process from a checkpoint and restores its weights.

  Args:
    directory: a directory written by `save_params` / `python -m dit_jax.convert`, or a
      training workdir (EMA weights unless use_ema=False).
    step: which step (default: the newest that reads; damaged newer ones are reported and
      skipped, never deleted).
    use_ema: training checkpoints: the EMA weights, else the raw ones. Only those are read,
      never the optimizer state.
    **runtime: runtime model settings (dtype, scan_blocks, ...); the params are returned in
      the layout that `scan_blocks` asks for.
  Returns:
    (model, process, params): the process the weights were trained for (sample with it,
    respaced as the sampler likes), params as host numpy arrays.
  """
  with Reader(directory) as reader:
    return reader.load_for_sampling(step, use_ema, **runtime)


def load_params(directory: str, step: Optional[int] = None, use_ema: bool = True,
                **runtime: Any) -> tuple[DiT, dict[str, Any]]:
  """`load_for_sampling` without the process: the model and its weights (to fine-tune, export)."""
  model, _, params = load_for_sampling(directory, step, use_ema, **runtime)
  return model, params
