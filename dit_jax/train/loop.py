"""`train_and_evaluate(config, workdir)`: the training loop, importable from a notebook."""
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np

from dit_jax import checkpoints as params_io
from dit_jax import cli, fs
from dit_jax.data import to_global
from dit_jax.diffusion import Process, process_from_config
from dit_jax.models import DiT, build_model, model_from_config
from dit_jax.train import config_checks, profiling
from dit_jax.train import sharding as shd
from dit_jax.train import resume_check
from dit_jax.train import state as state_lib
from dit_jax.train.checkpointing import (Checkpointer, CheckpointWriteError, PreemptionHandler,
                                         any_process)
from dit_jax.train.inputs import Inputs, make_inputs
from dit_jax.train.step import jit_train_step
from dit_jax.train.throughput import peak_flops, train_flops_per_image
from dit_jax.train.workdir_lock import LeaseLock, WorkdirLock, lock_workdir


@dataclasses.dataclass
class Run:
  """What a run is built from, validated before any expensive work."""
  model: DiT
  process: Process  # the training objective, recorded in the checkpoints
  inputs: Inputs
  tx: Any
  lr_schedule: Any
  layout: state_lib.Layout
  checkpointer: Checkpointer
  rng: jax.Array  # the train step's base key (each step folds in its number)
  init_rng: jax.Array
  lock: Optional[WorkdirLock | LeaseLock]  # the workdir's, held by process 0 for the whole run
  resumed_config: Optional[dict[str, Any]]  # the config item of the checkpoint resumed from
  profile: Optional[profiling.Window]  # the steps to trace (config.profile_steps)


def setup(config: Any, workdir: str) -> Run:
  """Validates the config against data and workdir and builds the pieces of a run.

  Every check runs before the first write (the workdir's lock, then the checkpoint directory),
  so a refused run leaves nothing behind.
  """
  model = build_model(config.model)
  process = process_from_config(config)
  config_checks.check_config(config, model, process)  # the counts, and values used late
  profile = profiling.window_from_config(config.profile_steps, config.num_steps)
  mesh = shd.make_mesh(config.mesh.axis_names, config.mesh.axis_sizes)
  rules = shd.rules_from_config(config.axis_rules, mesh.axis_names)
  check_batch_size(config.batch_size, mesh, rules)
  check_workdir(workdir)
  config_checks.check_outputs(workdir)  # e.g. a read-only checkpoints/ (a save would hang)
  checkpoint_dir = fs.join(workdir, "checkpoints")
  resuming = fs.is_dir(checkpoint_dir) and any(n.isdigit() for n in fs.listdir(checkpoint_dir))
  if config.init_from and not resuming:  # a resumed run no longer reads init_from
    check_init_from(config.init_from, model, process)
  inputs = make_inputs(config, model)
  tx, lr_schedule = state_lib.make_optimizer(config.optimizer)
  layout = state_lib.make_layout(model, tx, inputs.element_spec, mesh, rules)
  # The first write: the workdir's lock, refused (naming the holder) while another run lives.
  lock = lock_workdir(workdir)
  try:
    # The checkpoint directory is created only where no checkpoints exist, so the compatibility
    # check below refuses only a directory it did not touch.
    checkpointer = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep,
                                keep_period=config.checkpoint.keep_period,
                                async_save=config.checkpoint.async_save)
    found = checkpointer.check_compatible(model.arch_config(), process)
    if found is not None:  # resuming: refuses changes that alter training, unless accepted
      resume_check.check_resume(found[1], found[0], config, checkpoint_dir)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  rng, init_rng = jax.random.split(jax.random.key(config.seed))
  return Run(model, process, inputs, tx, lr_schedule, layout, checkpointer, rng, init_rng, lock,
             found[1] if found else None, profile)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, rules: tuple) -> None:
  """The global batch must split evenly over the mesh axes that the `batch` axis maps to."""
  spec = shd.batch_sharding(mesh, rules, 1).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if batch_size % shards:
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"config.batch_size: {batch_size} does not split over the {shards} "
                     f"data-parallel devices (mesh axes {sizes}); use a multiple of {shards}")
  if batch_size % jax.process_count():  # each process reads its own rows of the batch
    raise ValueError(f"config.batch_size: {batch_size} does not split over the "
                     f"{jax.process_count()} processes")


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that is (under) a file or cannot be written; writes nothing.

  A Cloud Storage workdir's bucket must exist; its permissions show at the first write, the
  workdir lock, before anything else is written.
  """
  if not fs.is_local(workdir):
    if not fs.exists(fs.bucket_of(workdir)):
      raise ValueError(f"workdir: no bucket {fs.bucket_of(workdir)} (or no access to it)")
    return
  existing = workdir
  while not os.path.exists(existing):  # the workdir, or the ancestor that makedirs starts at
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"workdir: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    raise ValueError(f"workdir: cannot write in {existing} "
                     f"({'read-only file system' if read_only else 'permission denied'})")


def check_init_from(directory: str, model: DiT, process: Process) -> None:
  """`config.init_from` must be a checkpoint of the configured architecture (reads its JSON)."""
  try:
    saved, _ = params_io.load_config(directory)
  except FileNotFoundError as e:
    raise ValueError(f"config.init_from: {e}") from e
  if "model" not in saved:
    raise ValueError(f"config.init_from: {directory} has no model config")
  source = model_from_config(saved["model"]).arch_config()
  if source != model.arch_config():
    raise ValueError(f"config.init_from: {directory} holds {source}, the config asks for "
                     f"{model.arch_config()}")
  if params_io.process_of(saved) != process:  # allowed: fine-tuning to another process
    logging.warning("config.init_from: %s was trained for another diffusion process (%s); "
                    "fine-tuning for %s", directory, params_io.process_of(saved).describe(),
                    process.describe())


def initial_state(run: Run, config: Any) -> state_lib.TrainState:
  """Latest checkpoint, else `init_from` weights, else a fresh init: created already sharded."""
  step, state = run.checkpointer.restore_newest(run.layout.abstract_state)
  if step is not None:
    logging.info("Resuming from %s step %d", run.checkpointer.directory, step)
    return state
  if config.init_from:
    # setup checked that it holds this architecture.
    _, params = params_io.load_params(config.init_from, scan_blocks=run.model.scan_blocks)
    from_params = functools.partial(state_lib.state_from_params, tx=run.tx)
    return jax.jit(from_params, out_shardings=run.layout.state)(params)
  return state_lib.init_sharded(run.model, run.tx, run.layout, run.init_rng)


def compile_step(run: Run, config: Any):
  """The jitted `(state, global batch, rng, frozen) -> (state, metrics)`; the state donated."""
  return jit_train_step(run.layout, model=run.model, process=run.process, x0=run.inputs.x0,
                        tx=run.tx, lr_schedule=run.lr_schedule, ema_decay=config.ema_decay)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates at the end.

  Returns the last logged training metrics and the final evaluation, if any.
  """
  with cli.user_errors():  # setup only validates: its failures are the user's to fix
    if not str(workdir or "").strip():  # fs.absolute would make it the current directory
      raise ValueError("workdir: empty; name the run's directory (--workdir)")
    # A local path (or a shared mount; orbax wants it absolute) or a gs:// URL.
    workdir = fs.absolute(workdir)
    run = setup(config, workdir)
  try:
    with cli.write_errors():  # a full disk: one line naming the file, the run stops
      return _train(run, config, workdir)
  finally:  # saves in flight end before the workdir is released
    run.checkpointer.close()
    if run.lock is not None:
      run.lock.release()


def _train(run: Run, config: Any, workdir: str) -> dict[str, Any]:
  """The loop of `train_and_evaluate`, on a set-up run that holds its workdir."""
  from dit_jax.train import reporting  # tensorboard's protos, the samplers: only the loop's.

  with cli.user_errors(params_io.UnreadableCheckpointError):  # every step damaged
    state = initial_state(run, config)
  start_step = int(state.step)
  resume_check.record(workdir, start_step, config, run.resumed_config)
  if start_step >= config.num_steps:
    logging.info("config.num_steps=%d: the checkpoint is at step %d already; nothing to "
                 "train%s", config.num_steps, start_step,
                 f", grading step {start_step}" if config.eval.digits else "")
  p_step = compile_step(run, config) if start_step < config.num_steps else None
  decode = None
  if config.vae.path and run.model.in_channels not in (1, 3):
    from dit_jax.generate import vae_decoder
    decode = vae_decoder(config.vae.path)
  reporter = reporting.Reporter(config, workdir, run.model, start_step,
                                out_sharding=shd.replicated(run.layout.mesh), decode=decode)
  reporter.start(state.params, run.inputs)  # the start-up summary
  preemption = PreemptionHandler()
  saved_config = params_io.saved_config(run.model, run.process,
                                        run=json.loads(config.to_json_best_effort()))
  flops = train_flops_per_image(run.model) if peak_flops() else None
  check = functools.partial(_check_finite, checkpointer=run.checkpointer)
  tracer = profiling.StepTracer(run.profile, workdir, first_step=start_step + 1)

  def report(step_metrics: tuple[int, Any]) -> dict[str, float]:
    """Stops on a non-finite step, else logs its metrics (a metrics.jsonl row); returns them."""
    values = check(*step_metrics)
    reporter.step(step_metrics[0], values, flops)
    return values

  last = {}
  pending: Optional[tuple[int, Any]] = None  # (step, its metrics), read one step late
  saved = start_step
  try:
    with run.inputs, tracer:  # the tracer stops a trace still running when the loop ends
      for step, local_batch in run.inputs.iterate(start_step, config.num_steps - start_step):
        done = step + 1  # the step taken now, numbered as metrics.jsonl and checkpoints are
        tracer.before_step(done, state)
        state, metrics = p_step(state, to_global(local_batch, run.layout.batch), run.rng,
                                run.inputs.frozen)
        tracer.after_step(done, metrics)
        if pending is not None:  # reading the previous step's loss overlaps with this step
          last = report(pending)
        pending = (done, metrics)
        if done % config.checkpoint.every_steps == 0 or done == config.num_steps:
          # Never checkpoint a non-finite state; the step's row is written before its
          # checkpoint, so that a resumed run finds every row up to the checkpoint.
          last, pending = report(pending), None
          saved = done if run.checkpointer.save(done, state, saved_config) else saved
        if config.sample.every_steps and (done % config.sample.every_steps == 0
                                          or done == config.num_steps):
          reporter.sample_grid(done, state.ema_params)
        # Every process stops at the same step: at SIGTERM or Ctrl-C, or when a save failed (a
        # full disk).
        failure = run.checkpointer.failure()
        preempted, failed = any_process(preemption.requested, failure is not None)
        if failed:
          raise failure or CheckpointWriteError(
              "checkpoint: another process could not write its part of the checkpoint; "
              f"stopping at step {done}")
        if preempted:
          logging.warning("%s: checkpointing step %d and stopping",
                          preemption.signal_name or "another process's signal", done)
          if pending is not None:
            last, pending = report(pending), None
          if saved != done:
            run.checkpointer.save(done, state, saved_config, force=True)
          return {"stopped_at": done, **last}
    if pending is not None:
      last = report(pending)
    run.checkpointer.wait()
    results = {"step": int(state.step), **last}
    if config.eval.digits:
      results.update(reporter.grade_digits(int(state.step), state.ema_params))
    return results
  finally:
    preemption.close()
    reporter.close()


def _check_finite(step: int, metrics: Any, checkpointer: Checkpointer) -> dict[str, float]:
  """The host values of a step's metrics; stops the run if its loss or its gradient (hence its
  update) is not finite, naming the step (as metrics.jsonl does) and the last good checkpoint."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = [k for k in ("loss", "grad_norm") if k in values and not np.isfinite(values[k])]
  if bad:
    checkpointer.wait()  # a save in flight was of an earlier, finite state
    good = checkpointer.latest_step()
    kept = ("no checkpoint was written before it" if good is None else
            f"the last good checkpoint is step {good} "
            f"({fs.join(checkpointer.directory, str(good))})")
    raise FloatingPointError(f"non-finite {bad[0]} {values[bad[0]]} at step {step}: stopping; "
                             f"{kept}")
  return values
