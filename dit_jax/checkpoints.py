"""Orbax checkpoints of model parameters together with the model's architecture config.

Layout: an orbax `CheckpointManager` directory whose steps hold two items, `params` (the Flax
parameter tree, unscanned layout) and `config` (JSON: `{"model": DiT.arch_config(), ...}`), so
that a later tool rebuilds the model from the checkpoint alone. `python -m dit_jax.convert`
writes one at step 0. A training checkpoint (`dit_jax.train.checkpointing`) holds `state` (the
TrainState, whose `params` / `ema_params` load here) instead of `params`.
"""
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dit_jax.models import DiT, model_from_config, stack_block_params, unstack_block_params

# Item names of a step directory, defined once (dit_jax.train.checkpointing writes STATE_ITEM).
PARAMS_ITEM = "params"  # a parameter tree (convert output)
STATE_ITEM = "state"  # a TrainState (training checkpoint)
CONFIG_ITEM = "config"  # JSON: {"model": DiT.arch_config(), ...}


def _unscanned(params: dict[str, Any]) -> dict[str, Any]:
  return unstack_block_params(params) if "blocks" in params else params


def save_params(directory: str, params: dict[str, Any], model: DiT, step: int = 0,
                extra_config: Optional[dict[str, Any]] = None) -> str:
  """Writes `params` (either block layout) and the model config; refuses to overwrite.

  Returns the absolute checkpoint directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"--out: {directory} already exists and is not empty; refusing to "
                          "overwrite it")
  config = {"model": model.arch_config(), **(extra_config or {})}
  params = jax.tree.map(np.asarray, _unscanned(params))
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params),
                                                  CONFIG_ITEM: ocp.args.JsonSave(config)}))
    manager.wait_until_finished()
  return directory


def _manager_dir(directory: str) -> str:
  """A convert output or a checkpoints folder as given; a training workdir's `checkpoints`."""
  directory = os.path.abspath(directory)
  nested = os.path.join(directory, "checkpoints")
  return nested if os.path.isdir(nested) else directory


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager for reading, that knows every item a checkpoint of ours may hold.

  Items are read through the manager, which knows the step's layout (`_CHECKPOINT_METADATA`
  is a file of the step directory, not of each item), and with their handlers registered, so
  orbax can read an item's metadata and restore one item without the others.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint: no directory {directory}")
  handlers = {item: ocp.PyTreeCheckpointHandler() for item in (PARAMS_ITEM, STATE_ITEM)}
  handlers[CONFIG_ITEM] = ocp.JsonCheckpointHandler()
  # Not `read_only=True`: that only adds warnings about the saves this manager never makes.
  options = ocp.CheckpointManagerOptions(create=False)
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def _pick_step(manager: ocp.CheckpointManager, directory: str, step: Optional[int]) -> int:
  """`step` (default: the latest) if the directory holds it."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"checkpoint: {directory} holds no checkpoint steps")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"checkpoint: {directory} has no step {step}; it holds steps "
                            f"{sorted(steps)}")
  return step


def load_config(directory: str, step: Optional[int] = None) -> tuple[dict[str, Any], int]:
  """Reads the JSON config of a checkpoint directory; returns (config, step)."""
  directory = _manager_dir(directory)
  with _reader(directory) as manager:
    step = _pick_step(manager, directory, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{CONFIG_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[CONFIG_ITEM]), step


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


def load_params(directory: str, step: Optional[int] = None, use_ema: bool = True,
                **runtime: Any) -> tuple[DiT, dict[str, Any]]:
  """Rebuilds the model from a checkpoint and restores its parameters.

  Args:
    directory: a directory written by `save_params` / `python -m dit_jax.convert`, or a
      training workdir (its latest checkpoint; EMA weights unless use_ema=False).
    step: which step (default: the latest).
    **runtime: runtime model settings (dtype, scan_blocks, ...); the params are returned in
      the layout that `scan_blocks` asks for.
  Returns:
    (model, params) with params as host numpy arrays.
  """
  config, step = load_config(directory, step)
  if "model" not in config:
    raise ValueError(f"checkpoint: {directory} step {step} has no 'model' entry in its config")
  model = model_from_config(config["model"], **runtime)
  directory = _manager_dir(directory)
  with _reader(directory) as manager:
    if STATE_ITEM in manager.item_metadata(step):  # a training checkpoint
      params = _restore_numpy(manager, step, STATE_ITEM, "ema_params" if use_ema else "params")
    else:
      params = _restore_numpy(manager, step, PARAMS_ITEM)
  params = _unscanned(params)
  if model.scan_blocks:
    params = stack_block_params(params, model.depth)
  return model, params
