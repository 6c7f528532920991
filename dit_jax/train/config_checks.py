"""The checks of a training config and workdir that `loop.setup` runs before the first write.

A value that is only used late (the sample grids, the final digits grade, the first checkpoint)
would otherwise fail minutes or hours into a run, after files were written, with a traceback;
here it is refused up front as a one-line ValueError naming the config field (or the file).
Nothing here writes, compiles or reads data.
"""
import json
import math
import os
from typing import Any

import numpy as np

from dit_jax import cli, fs, samplers
from dit_jax.diffusion import Process, schedules
from dit_jax.models import DiT
from dit_jax.samplers.loop import SamplerOptions

MAX_SEED = 2**63 - 1  # jax.random.key takes a C long; numpy's generators no negative seed


def check_config(config: Any, model: DiT, process: Process) -> None:
  """Refuses values that training, checkpointing, sampling or grading cannot use."""
  check_counts(config)
  if config.eval.digits and (model.input_size, model.in_channels, model.num_classes) != (8, 1, 10):
    raise ValueError("config.eval.digits: grading needs an 8x8x1, 10-class digits model")
  check_training(config)
  check_checkpointing(config.checkpoint)
  check_diffusion(config, process)
  check_sampling(config, model, process)
  check_resume_changes(config)


def check_counts(config: Any) -> None:
  """The run's step and batch counts: positive."""
  for key, value in (("checkpoint.every_steps", config.checkpoint.every_steps),
                     ("log_every_steps", config.log_every_steps),
                     ("batch_size", config.batch_size), ("num_steps", config.num_steps)):
    if value <= 0:
      raise ValueError(f"config.{key}: must be positive, got {value}")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(valid: bool, key: str, what: str, value: Any) -> None:
  if not valid:
    raise ValueError(f"config.{key}: must be {what}, got {value!r}")


def _finite(value: Any) -> bool:
  return _number(value) and math.isfinite(value)


def check_training(config: Any) -> None:
  """The seed, the optimizer and the EMA: values optax would take and turn into NaNs."""
  _require(_integer(config.seed) and 0 <= config.seed <= MAX_SEED, "seed",
           f"an integer in [0, {MAX_SEED}]", config.seed)
  opt = config.optimizer
  for key, valid, what in (
      ("learning_rate", _finite(opt.learning_rate) and opt.learning_rate >= 0,
       "a finite number >= 0"),
      ("weight_decay", _finite(opt.weight_decay) and opt.weight_decay >= 0,
       "a finite number >= 0"),
      # Adam's moment decays: 1 would never move the moments from zero.
      ("b1", _finite(opt.b1) and 0 <= opt.b1 < 1, "in [0, 1)"),
      ("b2", _finite(opt.b2) and 0 <= opt.b2 < 1, "in [0, 1)"),
      # 0 divides by zero where a gradient has always been zero.
      ("eps", _finite(opt.eps) and opt.eps > 0, "a finite number > 0"),
      ("warmup_steps", _integer(opt.warmup_steps) and opt.warmup_steps >= 0,
       "an integer >= 0 (0: no warmup)"),
      ("grad_clip_norm", _finite(opt.grad_clip_norm) and opt.grad_clip_norm >= 0,
       "a finite number >= 0 (0: no clipping)")):
    _require(valid, f"optimizer.{key}", what, getattr(opt, key))
  _require(_finite(config.ema_decay) and 0 <= config.ema_decay <= 1, "ema_decay", "in [0, 1]",
           config.ema_decay)


def check_checkpointing(checkpoint: Any) -> None:
  """`keep` 0 would delete every checkpoint the run writes (orbax's max_to_keep)."""
  _require(_integer(checkpoint.keep) and checkpoint.keep >= 1, "checkpoint.keep",
           "an integer >= 1 (the last checkpoints kept)", checkpoint.keep)
  period = checkpoint.keep_period
  _require(period is None or (_integer(period) and period >= 0), "checkpoint.keep_period",
           "an integer >= 0 (0: keep no permanent ones)", period)


def check_diffusion(config: Any, process: Process) -> None:
  """The diffusion's schedule and steps (a flow's settings are checked by FlowProcess)."""
  if process.kind != "diffusion":
    return
  if process.noise_schedule not in schedules.NOISE_SCHEDULES:
    raise ValueError(f"config.diffusion.noise_schedule: {process.noise_schedule!r} is not one "
                     f"of {', '.join(schedules.NOISE_SCHEDULES)}")
  steps = config.diffusion.diffusion_steps
  _require(_integer(steps) and steps >= 1, "diffusion.diffusion_steps", "a positive integer",
           steps)


def check_sampling(config: Any, model: DiT, process: Process) -> None:
  """What the sample grids (`config.sample`) and the digits grade (`config.eval`) will use.

  Values that are never valid are refused always; those valid for some models (the classes,
  the guided channels) only where the run samples with them.
  """
  sample = config.sample
  samplers.get(sample.sampler, "config.sample.sampler", process)
  options = SamplerOptions.from_settings(sample.options, "config.sample.options.")
  _require(_integer(sample.every_steps) and sample.every_steps >= 0, "sample.every_steps",
           "an integer >= 0 (0: no sample grids)", sample.every_steps)
  _require(_integer(sample.num_steps) and sample.num_steps >= 1, "sample.num_steps",
           "a positive integer", sample.num_steps)
  _require(_finite(sample.cfg_scale), "sample.cfg_scale", "a finite number", sample.cfg_scale)
  _require(_finite(sample.eta), "sample.eta", "a finite number", sample.eta)
  for key in ("num_samples", "batch_size"):
    value = config.eval[key]
    _require(_integer(value) and value >= 1, f"eval.{key}", "a positive integer", value)
  # As Reporter.sample_grid: latents become pictures only through the VAE.
  grids = sample.every_steps > 0 and (model.in_channels in (1, 3) or bool(config.vae.path))
  if not (grids or config.eval.digits):
    return
  _check_num_steps(sample.num_steps, sample.sampler, process, options)
  if sample.cfg_scale != 1.0:  # guided: the model's forward_with_cfg
    if model.class_dropout_prob <= 0:
      raise ValueError(f"config.sample.cfg_scale: guidance ({sample.cfg_scale}) needs the null "
                       "class, which a model trained with model.class_dropout_prob=0 lacks; "
                       "use 1.0")
    channels = sample.guidance_channels
    _require(channels is None or (_integer(channels) and 1 <= channels <= model.in_channels),
             "sample.guidance_channels", f"in [1, {model.in_channels}] (the model's channels) "
             "or None (all of them)", channels)
  if not grids:
    return
  classes = sample.classes
  if (not isinstance(classes, (tuple, list)) or not classes
      or not all(_integer(c) and 0 <= c < model.num_classes for c in classes)):
    raise ValueError(f"config.sample.classes: must be class ids in [0, {model.num_classes}), "
                     f"e.g. '(0,1,2)', got {classes!r}")
  _require(_integer(sample.per_class) and sample.per_class >= 1, "sample.per_class",
           "a positive integer", sample.per_class)


def _check_num_steps(num_steps: Any, sampler: str, process: Process,
                     options: SamplerOptions) -> None:
  """The sampler's steps (a positive integer), as the sampler would refuse them."""
  if process.kind == "diffusion":
    total = process.diffusion_steps
    if num_steps > total:
      raise ValueError(f"config.sample.num_steps: {num_steps} is more than the process's "
                       f"{total} steps (config.diffusion.diffusion_steps)")
    if sampler == "ddim":  # a single integer stride (samplers/ddim.py's "ddimN" respacing)
      try:
        schedules.space_timesteps(total, f"ddim{num_steps}")
      except ValueError as e:
        raise ValueError(f"config.sample.num_steps: ddim {e}") from None
  elif sampler == "sde-euler" and options.last_step != "none" and num_steps < 2:
    raise ValueError(f"config.sample.num_steps: sde-euler with last_step "
                     f"{options.last_step!r} takes at least 2 evaluations, got {num_steps}")


def check_resume_changes(config: Any) -> None:
  """Each key `config.resume_changes` accepts must exist: a typo would accept nothing."""
  for key in (k.strip() for k in str(config.resume_changes).split(",")):
    if key:
      try:
        cli.check_config_key(config, key, "config.resume_changes")
      except cli.UserError as e:
        raise ValueError(str(e)) from None


# What the run writes in its workdir: folders, and files it appends to.
OUTPUT_DIRS = ("checkpoints", "samples", "eval", "profile")
OUTPUT_FILES = ("metrics.jsonl", "config_history.jsonl")


def check_outputs(workdir: str) -> None:
  """Refuses a workdir whose outputs cannot be written or read back; writes nothing.

  Local paths only, but for the config history, which a resumed run reads on any file system:
  a folder that is a file, a file that is a folder, one that is not writable. Otherwise the
  first checkpoint, grid or metrics row would fail mid-run (a failed background save even hangs
  at exit).
  """
  from dit_jax.train import resume_check  # pylint: disable=import-outside-toplevel
  check_history(fs.join(workdir, resume_check.HISTORY))
  if not fs.is_local(workdir) or not os.path.isdir(workdir):
    return  # a new local workdir: check_workdir found its ancestor writable
  for name in OUTPUT_DIRS + OUTPUT_FILES:
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    wants_dir = name in OUTPUT_DIRS
    if os.path.isdir(path) != wants_dir:
      raise ValueError(f"workdir: {path} is a {'file' if wants_dir else 'directory'}; the run "
                       f"writes a {'directory' if wants_dir else 'file'} there: move it away")
    if not os.access(path, (os.W_OK | os.X_OK) if wants_dir else os.W_OK):
      raise ValueError(f"workdir: cannot write in {path} (permission denied)")


def check_history(path: str) -> None:
  """`config_history.jsonl` must hold JSON rows with a config, as `resume_check.record` reads."""
  if not fs.exists(path):
    return
  if fs.is_dir(path):
    raise ValueError(f"workdir: {path} is a directory; the run writes a file there: move it away")
  try:
    text = fs.read_text(path)
  except UnicodeDecodeError:
    raise ValueError(f"workdir: {path} is not text (a config history of JSON rows); repair or "
                     "move the file away") from None
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if not isinstance(row, dict) or "config" not in row:
      raise ValueError(f"workdir: {path} line {number} is not a config history row (JSON with "
                       "a config); repair or move the file away")
