"""What a run reports: TensorBoard events and console lines, sample grids, the digits grade.

The events are written without TensorFlow (`tensorboard_writer`), on a background thread.
"""
import json
import logging
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from clu import parameter_overview

from dit_jax import fs, generate
from dit_jax import images as image_io
from dit_jax.models import DiT
from dit_jax.train.metrics_log import MetricsLog
from dit_jax.train.step import OPTIMIZER_METRICS
from dit_jax.train.tensorboard_writer import TensorBoardWriter
from dit_jax.train.throughput import peak_flops


def _step_line(step: int, num_steps: int, scalars: dict[str, float],
               terms: Sequence[str] = ()) -> str:
  """`step 500/4000: loss 0.1129 (mse 0.1101, vb 0.0028), grad_norm 0.707, lr 0.001, 11.3
  steps/s, ETA 5m09s`; terms: the names of the loss's parts, whatever the process returns."""
  rate = scalars["train/steps_per_sec"]
  eta = int((num_steps - step) / rate) if rate > 0 else 0
  parts = [f"{name} {scalars[key]:.4g}" for name, key in (
      ("loss", "train/loss"), ("grad_norm", "train/grad_norm"), ("lr", "train/learning_rate"))
      if key in scalars]
  if terms and "train/loss" in scalars:
    parts[0] += " (" + ", ".join(f"{t} {scalars['train/' + t]:.4g}" for t in terms) + ")"
  parts.append(f"{rate:.3g} steps/s")
  if "train/mfu" in scalars:
    parts.append(f"MFU {scalars['train/mfu']:.1%}")
  return f"step {step}/{num_steps}: {', '.join(parts)}, ETA {eta // 60}m{eta % 60:02d}s"


def _flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat_hparams(value, f"{name}."))
    else:
      out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return out


class Reporter:
  """Metric writing, the console lines, EMA sample grids and the digits grade for one run.

  The console gets a start-up summary, one line per log step and one per grid: the metrics go
  to TensorBoard (`TensorBoardWriter`, by process 0, with `config.tensorboard`) and to
  metrics.jsonl.
  """

  def __init__(self, config: Any, workdir: str, model: DiT, start_step: int,
               out_sharding: Any = None, decode: Optional[Any] = None):
    """out_sharding: a sharding on the run's mesh (samples are spread over that mesh and come
    back replicated, so every process can read them); decode: latents -> images in [-1, 1]
    (the VAE) for latent-space models."""
    self.config, self.workdir, self.model = config, workdir, model
    self.mesh = getattr(out_sharding, "mesh", None)
    self.decode = decode
    self.spec = generate.spec_from_config(config)
    self.is_chief = jax.process_index() == 0
    self.writer = (TensorBoardWriter(workdir) if self.is_chief and config.tensorboard
                   else None)
    self._last_time, self._last_step = time.time(), start_step
    # Rows an earlier run logged after start_step (its last checkpoint) are dropped.
    self.metrics = MetricsLog(workdir, start_step, enabled=self.is_chief)
    self._sample_rng = generate.sample_key(config.seed)

  def start(self, params: Any, pipeline: Any = None) -> None:
    """Logs the start-up summary (model, mesh, data); the parameter table at debug level."""
    # Shapes only: parameters sharded over several processes are not all addressable here.
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    leaves = jax.tree.leaves(shapes)
    count = sum(int(np.prod(p.shape)) for p in leaves)
    size = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in leaves)
    m = self.model
    logging.info("Model: DiT, %s parameters (%.1f MB); depth %d, hidden %d, %d heads, patch %d, "
                 "input %dx%dx%d, %d classes", f"{count:,}", size / 1e6, m.depth, m.hidden_size,
                 m.num_heads, m.patch_size, m.input_size, m.input_size, m.in_channels,
                 m.num_classes)
    if logging.getLogger().isEnabledFor(logging.DEBUG):
      logging.debug("Parameters:\n%s", parameter_overview.get_parameter_overview(
          jax.tree.map(lambda p: np.zeros((), p.dtype) if not p.shape else p, shapes),
          include_stats=False))
    if self.mesh is not None:
      logging.info("Mesh: %s over %d devices (%d processes)",
                   ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items()), self.mesh.size,
                   jax.process_count())
    if pipeline is not None:
      source, cfg = pipeline.source, self.config
      name = cfg.latents_dir or (cfg.data.folder if cfg.data.name == "folder" else cfg.data.name)
      logging.info("Data: %s, %s examples, %d classes; batch %d, %d steps (%.1f epochs)", name,
                   f"{len(source):,}", source.num_classes, cfg.batch_size, cfg.num_steps,
                   cfg.num_steps * cfg.batch_size / max(len(source), 1))
    if self.writer is not None:
      self.writer.write_hparams(_flat_hparams(json.loads(self.config.to_json_best_effort())))

  def step(self, step: int, metrics: dict[str, float], flops_per_image: Optional[float]) -> None:
    """Called once per completed step with that step's (host) metrics."""
    if step % self.config.log_every_steps:
      return
    now = time.time()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    # The process's loss terms ("loss", its parts) and the step's optimizer metrics.
    terms = [k for k in metrics if k != "loss" and k not in OPTIMIZER_METRICS]
    scalars = {f"train/{k}": v for k, v in metrics.items()}
    scalars["train/steps_per_sec"] = steps_per_sec
    scalars["train/images_per_sec"] = steps_per_sec * self.config.batch_size
    if flops_per_image:
      achieved = scalars["train/images_per_sec"] * flops_per_image
      scalars["train/mfu"] = achieved / (peak_flops() * jax.device_count())
    self.metrics.append(step, scalars)  # first: of two refused writes, the record's is reported
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
    logging.info("%s", _step_line(step, self.config.num_steps, scalars, terms))

  def sample_grid(self, step: int, params: Any) -> Optional[str]:
    """The grid of `generate.sample_grid` for `config.sample.classes` (fixed noise across
    steps): what `sample.py` draws from this step's checkpoint with the same settings."""
    if self.model.in_channels not in (1, 3) and self.decode is None:
      return None  # latents need the VAE (config.vae.path) to become pictures
    _, grid = generate.sample_grid(self.model, params, self.spec, self.config.sample.classes,
                                   self.config.sample.per_class, self.decode, self.mesh)
    if self.writer is not None:
      self.writer.write_images(step, {"samples": grid[None]})
    if not self.is_chief:
      return None
    path = fs.join(self.workdir, "samples", f"step_{step:07d}.png")
    if fs.exists(path):
      logging.info("Samples: %s exists; not overwriting it", path)
      return path
    image_io.save_png(path, grid)
    logging.info("Samples: %s", path)
    return path

  def grade_digits(self, step: int, params: Any) -> dict[str, Any]:
    """Grades `config.eval.num_samples` guided EMA samples with a classifier of real digits."""
    from dit_jax.eval.digits import DigitsGrader  # scikit-learn only when grading.

    cfg = self.config.eval
    labels = np.arange(cfg.num_samples, dtype=np.int32) % self.model.num_classes
    rng = jax.random.fold_in(self._sample_rng, step)
    samples = generate.sample(self.model, params, self.spec, labels, rng, self.mesh,
                              batch_size=cfg.batch_size)
    grade = DigitsGrader(seed=self.config.seed).grade(samples, labels)
    results = {"eval/digits_accuracy": float(grade["accuracy"]),
               "eval/digits_frechet_distance": float(grade["frechet_distance"]),
               "eval/num_samples": int(grade["num_samples"])}
    self.metrics.append(step, results)  # first: of two refused writes, the record's is reported
    if self.writer is not None:
      self.writer.write_scalars(step, results)
    logging.info("Digits grade at step %d: accuracy %.4f, Frechet distance %.4f (%d samples)",
                 step, results["eval/digits_accuracy"], results["eval/digits_frechet_distance"],
                 results["eval/num_samples"])
    if self.is_chief:
      path = fs.join(self.workdir, "eval", f"digits_step_{step:07d}.json")
      if not fs.exists(path):
        per_class = list(map(float, grade["per_class_accuracy"]))
        fs.write_text(path, json.dumps({**results, "per_class_accuracy": per_class}))
    return results

  def close(self) -> None:
    """Writes what is still queued for TensorBoard (at the run's end, or its preemption)."""
    if self.writer is not None:
      self.writer.close()
