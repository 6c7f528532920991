"""Large-scale sample generation into an ADM-evaluator `.npz`, resumable in chunks: the parts
folder `<npz>.parts/` (locked, with the settings its parts were sampled with) and the loop that
fills and joins it."""
import dataclasses
import io
import json
import math
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from dit_jax import fs, logs
from dit_jax.generate import SamplingSpec, sharded_sampler, to_images
from dit_jax.models import DiT
from dit_jax.train import workdir_lock

SETTINGS_NAME = "settings.json"  # in `<npz>.parts/`: what its parts were sampled with


def npz_settings(spec: SamplingSpec, num_samples: int, batch_size: int,
                 **more: Any) -> dict[str, Any]:
  """What determines the samples of a `generate_npz` run, flat and JSON-able, keyed by
  sample.py's flag names: recorded in its parts folder so that a resume with other settings is
  refused rather than mixed in. `more`: what the caller knows besides (sample.py: the
  checkpoint, its step, the weights, the VAE)."""
  settings = {
      "sampler": spec.sampler, "num_steps": int(spec.num_steps),
      "cfg_scale": float(spec.cfg_scale), "guidance_channels": spec.guidance_channels,
      "eta": float(spec.eta), "clip_denoised": bool(spec.clip_denoised), "seed": int(spec.seed),
      "batch_size": int(batch_size), "num_samples": int(num_samples),
      **dataclasses.asdict(spec.options), **more}
  if spec.process is not None:  # the checkpoint's, unless the caller built one
    settings.update({f"process.{k}": v for k, v in spec.process.to_dict().items()})
  return json.loads(json.dumps(settings))  # as the settings file reads back


# How a differing setting is named to the user: the flag that sets it.
_FLAG_OF = {"guidance_channels": "--guidance", "checkpoint": "--checkpoint", "step": "--step"}
_FLAGS = ("sampler", "num_steps", "cfg_scale", "eta", "clip_denoised", "seed", "batch_size",
          "num_samples", "use_ema", "vae", "atol", "rtol", "diffusion_form", "diffusion_norm",
          "last_step", "last_step_size")


def _flag_name(key: str) -> str:
  return _FLAG_OF.get(key, f"--{key}" if key in _FLAGS else key)


class NpzParts:
  """The parts folder `<npz>.parts/` of one `generate_npz` run, held by it from construction to
  `release()`.

  Why: two runs on one `--npz` would write each other's chunks (a mixture, and a crash when
  one removes what the other reads), and a resume with other flags would mix old chunks with
  new ones. So the folder is locked (`workdir_lock`: host, pid and start time; a dead run's
  lock is taken over, a `gs://` folder gets a lease) and records the settings its parts were
  sampled with (SETTINGS_NAME); a run with other settings is refused while any part exists
  (with none, its settings replace the record: nothing could mix). Parts are never deleted or
  replaced, except by the run that completes the `.npz` from them.
  """

  def __init__(self, out_path: str, settings: Mapping[str, Any]):
    """Locks the folder and records `settings` (`npz_settings`), or raises a one-line error
    naming `--npz`: ValueError (another run holds it, or its parts have other settings),
    FileExistsError (the `.npz` is already there). Creates nothing on a refusal."""
    self.out_path, self.dir = out_path, out_path + ".parts"
    self.settings = json.loads(json.dumps(dict(settings)))
    self._lock = None
    self._check_settings()  # first without the lock: a mismatch writes not even a lock file
    created = not fs.exists(self.dir)
    try:
      self._lock = workdir_lock.lock_workdir(self.dir)
    except workdir_lock.WorkdirBusyError as e:
      raise ValueError(
          f"--npz: {out_path} is being written by another run"
          f"{f' ({e.holder})' if e.holder else ''}, which holds {self.dir}; wait for it "
          "to end, or give another --npz. Nothing was written.") from None
    try:
      if fs.exists(out_path):  # completed by a run that held the lock a moment ago
        raise FileExistsError(f"--npz: {out_path} already exists; refusing to overwrite it")
      if self._check_settings() and jax.process_index() == 0:
        fs.write_text(self.settings_path, json.dumps(self.settings, indent=1) + "\n")
    except BaseException:
      self.release(remove=created)
      raise

  @property
  def settings_path(self) -> str:
    return fs.join(self.dir, SETTINGS_NAME)

  def _parts(self) -> list[str]:
    if not fs.is_dir(self.dir):
      return []
    return [n for n in fs.listdir(self.dir) if n.startswith("part_") and n.endswith(".npz")]

  def _check_settings(self) -> bool:
    """Raises ValueError if the folder holds parts of other settings (or of unknown ones);
    returns whether the settings file needs (re)writing: absent, or of a run that left no
    parts (nothing would be mixed)."""
    recorded = None
    if fs.exists(self.settings_path):
      try:
        recorded = json.loads(fs.read_text(self.settings_path))
      except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None  # not ours: treated as unknown settings
    if recorded == self.settings:
      return False
    parts = self._parts()
    if not parts:
      return True
    how = (f"resume with the flags it was started with, or delete {self.dir} or give another "
           "--npz to start afresh. Nothing was written.")
    if not isinstance(recorded, dict):
      raise ValueError(f"--npz: {self.dir} holds {len(parts)} parts without a record of the "
                       f"settings they were sampled with ({SETTINGS_NAME}), so they cannot be "
                       f"resumed safely; delete {self.dir} or give another --npz. Nothing was "
                       "written.")
    def show(settings, key):
      return repr(settings[key]) if key in settings else "unset"
    differ = [f"{_flag_name(k)} {show(recorded, k)} there, {show(self.settings, k)} now"
              for k in sorted(set(recorded) | set(self.settings), key=_order(self.settings))
              if show(recorded, k) != show(self.settings, k)]
    raise ValueError(f"--npz: {self.dir} holds {len(parts)} parts sampled with other settings "
                     f"({'; '.join(differ)}); {how}")

  def update_settings(self, settings: Mapping[str, Any]) -> None:
    """Replaces the settings of the folder this run holds (sample.py: the step whose weights
    it loaded, known only after it locked the folder); refused, as in the constructor, while
    the folder holds parts of other settings."""
    self.settings = json.loads(json.dumps(dict(settings)))
    if self._check_settings() and jax.process_index() == 0:
      fs.write_text(self.settings_path, json.dumps(self.settings, indent=1) + "\n")

  def abandon(self) -> None:
    """For a run that fails before sampling: unlocks the folder and, unless it holds parts
    (another run's, to resume), removes the settings file, the lock and the folder."""
    if jax.process_index() == 0 and not self._parts() and fs.exists(self.settings_path):
      fs.remove(self.settings_path)
    self.release(remove=True)

  def complete(self, num_chunks: int) -> None:
    """After the `.npz` is written: deletes the parts, the settings and the lock (this run's
    own files), and the folder unless something else appeared in it."""
    for i in range(num_chunks):
      fs.remove(_part_path(self.dir, i))
    fs.remove(self.settings_path)
    self.release(remove=True)

  def release(self, remove: bool = False) -> None:
    """Unlocks the folder; `remove`: also deletes the lock file and the folder if that leaves
    it empty (a run that takes the lock after this sees the `.npz` and stops)."""
    if self._lock is not None:
      self._lock.release()
      self._lock = None
      if remove:
        lock_path = fs.join(self.dir, workdir_lock.LOCK_NAME)
        if fs.exists(lock_path):
          fs.remove(lock_path)
    if remove and jax.process_index() == 0 and fs.is_dir(self.dir):
      try:
        fs.remove_empty_dir(self.dir)
      except OSError:
        pass  # another run's lock, created since: that run sees the .npz and stops


def _order(settings: Mapping[str, Any]) -> Callable[[str], tuple[int, str]]:
  """Sorts keys as `settings` has them (the flags first), unknown ones last."""
  index = {k: i for i, k in enumerate(settings)}
  return lambda k: (index.get(k, len(index)), k)


def generate_npz(model: DiT, params: Any, spec: SamplingSpec, num_samples: int, out_path: str,
                 batch_size: int = 64, decode: Optional[Callable] = None,
                 keep_parts: bool = False, progress: bool = True,
                 parts: Optional[NpzParts] = None) -> str:
  """Generates `num_samples` images with random labels into an ADM-evaluator `.npz`.

  `arr_0`: uint8 [N, H, W, 3]; `arr_1`: int labels [N]. Work is done in chunks of `batch_size`
  (sharded over every device); chunk i depends only on (seed, i), and each finished chunk is
  written to `<out_path>.parts/`, so an interrupted run resumes where it stopped without
  duplicated or missing samples. The folder is held by one run at a time and refuses a resume
  with other settings (`NpzParts`; `parts`: the caller's, taken before it did other work,
  else taken here with `npz_settings`). An existing `out_path` is never overwritten. `out_path`
  may be a local path or a `gs://` URL (`dit_jax.fs`), its parts beside it.
  """
  if fs.exists(out_path):
    raise FileExistsError(f"--npz: {out_path} already exists; refusing to overwrite it")
  if num_samples <= 0:
    raise ValueError(f"--num_samples: must be positive, got {num_samples}")
  if batch_size <= 0:
    raise ValueError(f"--batch_size: must be positive, got {batch_size}")
  if parts is None:
    parts = NpzParts(out_path, npz_settings(spec, num_samples, batch_size))
  elif parts.out_path != out_path:
    raise ValueError(f"generate_npz: the parts of {parts.out_path}, not of {out_path}")
  try:
    parts_dir = parts.dir
    num_chunks = math.ceil(num_samples / batch_size)
    sample = sharded_sampler(model, spec, batch_size)
    base = jax.random.key(spec.seed)
    bar = logs.progress_bar(num_samples, "sampling", progress and jax.process_index() == 0)
    for i in range(num_chunks):
      if not fs.exists(_part_path(parts_dir, i)):
        rng = jax.random.fold_in(base, i)
        # Uniformly random classes, as the official sample_ddp.py draws them.
        labels = np.asarray(jax.random.randint(jax.random.fold_in(rng, 0), (batch_size,), 0,
                                               model.num_classes), np.int32)
        samples, _ = sample(params, labels, jax.random.fold_in(rng, 1))
        images = to_images(np.asarray(samples), decode)
        if jax.process_index() == 0:
          _write_npz(_part_path(parts_dir, i), images=images, labels=labels)
      bar.update(min(batch_size, num_samples - i * batch_size))
    bar.close()
    if jax.process_index() == 0:
      images, labels = [], []
      for i in range(num_chunks):  # each part's file bytes freed before the next is read
        with np.load(io.BytesIO(fs.read_bytes(_part_path(parts_dir, i)))) as part:
          images.append(part["images"])
          labels.append(part["labels"])
      _write_npz(out_path, overwrite=False, arr_0=np.concatenate(images)[:num_samples],
                 arr_1=np.concatenate(labels)[:num_samples])
      if not keep_parts:
        parts.complete(num_chunks)
  finally:
    parts.release()
  return out_path


def _part_path(parts_dir: str, chunk: int) -> str:
  return fs.join(parts_dir, f"part_{chunk:06d}.npz")


def _write_npz(path: str, overwrite: bool = True, **arrays: np.ndarray) -> None:
  """`np.savez` through `fs.write_bytes`: readers never see half a file, locally or on GCS."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  fs.write_bytes(path, buffer.getbuffer(), overwrite=overwrite)
