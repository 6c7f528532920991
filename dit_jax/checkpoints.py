"""Orbax checkpoints of model parameters together with the model's architecture config.

Layout: an orbax `CheckpointManager` directory whose steps hold two items, `params` (the Flax
parameter tree, unscanned layout) and `config` (JSON: `{"model": DiT.arch_config(), ...}`), so
that a later tool rebuilds the model from the checkpoint alone. `python -m dit_jax.convert`
writes one at step 0.
"""
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dit_jax.models import DiT, model_from_config, stack_block_params, unstack_block_params


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
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               config=ocp.args.JsonSave(config)))
    manager.wait_until_finished()
  return directory


def _manager_dir(directory: str) -> str:
  """A convert output or a checkpoints folder as given; a training workdir's `checkpoints`."""
  directory = os.path.abspath(directory)
  nested = os.path.join(directory, "checkpoints")
  return nested if os.path.isdir(nested) else directory


def load_config(directory: str, step: Optional[int] = None) -> tuple[dict[str, Any], int]:
  """Reads the JSON config of a checkpoint directory; returns (config, step)."""
  directory = _manager_dir(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint: no directory {directory}")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"checkpoint: {directory} holds no checkpoint steps")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"checkpoint: {directory} has no step {step} (it has steps "
                              f"{sorted(manager.all_steps())})")
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(restored["config"]), step


def restore_numpy(path: str) -> Any:
  """Restores one saved pytree item as host numpy arrays, whatever mesh saved it."""
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


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
  step_dir = os.path.join(_manager_dir(directory), str(step))
  if os.path.isdir(os.path.join(step_dir, "state")):  # a training checkpoint
    state = restore_numpy(os.path.join(step_dir, "state"))
    params = state["ema_params" if use_ema else "params"]
  else:
    params = restore_numpy(os.path.join(step_dir, "params"))
  params = _unscanned(params)
  if model.scan_blocks:
    params = stack_block_params(params, model.depth)
  return model, params
