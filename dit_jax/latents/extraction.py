"""Encodes every image of a dataset once with the VAE into a latent directory (`records` format).

Each image is center-cropped as training crops it (ADM), and both it and its horizontal mirror
are encoded, keeping the posterior moments (mean and logvar), not a sample: training then still
draws a fresh posterior sample every step and still flips half of the examples, exactly as
pixel-space training with an online VAE would.

Work is split in fixed chunks of `chunk_size` examples. Process `p` of `P` encodes the chunks `k`
with `k % P == p` on a 1-D mesh of its local devices (the batch sharded over them), and writes
each finished chunk whole or not at all (to a local disk or to Cloud Storage: `_write_chunk`); a
rerun skips the chunks that exist, so an interrupted run resumes by running the same command
again. Processes never wait for each other before the end,
which is why each has its own mesh: one mesh over every host's devices would make all hosts
step in lockstep, and they have different numbers of chunks left after an interruption.

Matmul/conv precision follows JAX's default (`JAX_DEFAULT_MATMUL_PRECISION=highest` for full
float32 on GPUs and TPUs).
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import fs, logs
from dit_jax.data import preprocess
from dit_jax.data.pipeline import WorkerPools
from dit_jax.data.sources import Source, source_from_config
from dit_jax.latents import records
from dit_jax.vae import AutoencoderKL, VAEConfig, load_diffusers_vae

logger = logging.getLogger(__name__)

# Data-config fields that decide which images are read; a rerun must agree on them.
_DATA_IDENTITY = ("name", "folder", "split", "channels")
# Plan fields a rerun must agree on. chunk_size is taken from the existing plan instead, with a
# warning: the chunk files are cut with it, and a rerun may legitimately change --batch_size
# (another machine), which rounds the requested chunk size differently.
_PLAN_IDENTITY = ("format", "num_examples", "num_classes", "latent_shape", "dtype", "image_size",
                  "vae_config", "vae_params_sha256")


@dataclasses.dataclass(frozen=True)
class ExtractionResult:
  """What one process did: the chunks it wrote and skipped, and whether the directory is done."""
  out_dir: str
  written: tuple[int, ...]
  skipped: tuple[int, ...]
  complete: bool  # metadata.json exists: every chunk of every process is written.


def params_fingerprint(params: Any) -> str:
  """sha256 of every parameter's path, dtype, shape and bytes: which VAE made the latents."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def check_not_complete(out_dir: str) -> None:
  """Raises FileExistsError when `out_dir` already holds a complete latent dataset, and
  NotADirectoryError when it is a file (makedirs would say only `File exists`)."""
  if fs.exists(out_dir) and not fs.is_dir(out_dir):
    raise NotADirectoryError(f"--out: {out_dir} is a file, not a directory")
  if fs.exists(fs.join(out_dir, records.METADATA_NAME)):
    raise FileExistsError(
        f"{out_dir} already holds a complete latent dataset ({records.METADATA_NAME} exists); "
        "refusing to overwrite it. Delete the directory or choose another --out.")


def _jsonable(obj: Any) -> Any:
  return json.loads(json.dumps(obj, default=str))


def _prepare_plan(out_dir: str, requested: dict[str, Any]) -> dict[str, Any]:
  """Writes `plan.json` on the first run; on a rerun checks the settings agree and adopts the
  existing chunk size (chunk files are only meaningful with the size they were cut with)."""
  fs.makedirs(out_dir)
  path = fs.join(out_dir, records.PLAN_NAME)
  if not fs.exists(path):
    records.write_json(path, requested)
    return requested
  existing = records.read_json(path)
  differences = [key for key in _PLAN_IDENTITY if existing.get(key) != requested.get(key)]
  differences += [f"data.{key}" for key in _DATA_IDENTITY
                  if existing.get("data", {}).get(key) != requested["data"].get(key)]
  if differences:
    details = "; ".join(
        f"{key}: {_lookup(existing, key)!r} then, {_lookup(requested, key)!r} now"
        for key in differences)
    raise ValueError(
        f"{out_dir} holds an unfinished extraction with other settings ({details}). Finish it "
        "with the same settings, or delete it / choose another --out.")
  if existing["chunk_size"] != requested["chunk_size"]:
    logger.warning("--chunk_size: %s was begun with chunks of %d examples; resuming with them "
                   "(this run's --chunk_size and --batch_size ask for %d, which applies only to "
                   "a new --out)", out_dir, existing["chunk_size"], requested["chunk_size"])
  return existing


def _lookup(plan: Mapping[str, Any], key: str) -> Any:
  if key.startswith("data."):
    return plan.get("data", {}).get(key[len("data."):])
  return plan.get(key)


def _encode_pairs(vae: AutoencoderKL, dtype: str, params: Any, images: jax.Array) -> jax.Array:
  """Posterior moments of images and of their mirrors.

  Args:
    images: float32 `[batch, size, size, channels]` in [-1, 1].

  Returns:
    `[batch, 2, size / f, size / f, 2 * latent_channels]` in `dtype`: (original, flipped),
    each `concat([mean, logvar], -1)`.
  """
  batch = images.shape[0]
  # Pairs adjacent along the batch axis, so each device mirrors its own rows (no transfer).
  pairs = jnp.stack([images, images[:, :, ::-1]], axis=1).reshape((2 * batch,) + images.shape[1:])
  mean, logvar = vae.apply({"params": params}, pairs, method=AutoencoderKL.encode)
  moments = jnp.concatenate([mean, logvar], axis=-1)
  return moments.reshape((batch, 2) + moments.shape[1:]).astype(dtype)


def _load_example(source: Source, image_size: int, channels: int,
                  index: int) -> tuple[np.ndarray, int]:
  """uint8 `[image_size, image_size, channels]` (the training crop) and the label."""
  image, label = source.get(int(index))
  image = preprocess.center_crop_arr(image, image_size)
  if image.shape[-1] == 1 and channels == 3:
    image = np.repeat(image, 3, axis=-1)  # grayscale data through an RGB VAE.
  if image.shape[-1] != channels:
    raise ValueError(f"example {index} has {image.shape[-1]} channels, the VAE expects "
                     f"{channels}")
  return image, label


def _write_chunk(out_dir: str, chunk: int, chunk_records: Sequence[bytes]) -> None:
  """Writes a chunk whole or not at all. ArrayRecord's writer opens only local files, so it
  writes a temporary file (beside the chunk, or for a `gs://` out_dir in a local folder) that
  `fs.move_to` renames or uploads."""
  local_dir = out_dir if fs.is_local(out_dir) else fs.cache_dir(out_dir)
  os.makedirs(local_dir, exist_ok=True)
  tmp = os.path.join(local_dir, records.chunk_name(chunk) + ".tmp")
  if os.path.exists(tmp):
    os.remove(tmp)  # left by an interrupted run.
  writer = array_record_module.ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  for record in chunk_records:
    writer.write(record)
  writer.close()
  fs.move_to(tmp, records.chunk_path(out_dir, chunk))


def _existing(out_dir: str, chunks: Sequence[int]) -> list[int]:
  """The chunks of `chunks` whose files exist (one listing: one request on Cloud Storage)."""
  names = set(fs.listdir(out_dir)) if fs.is_dir(out_dir) else set()
  return [k for k in chunks if records.chunk_name(k) in names]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def extract_latents(source: Source, out_dir: str, *, vae_config: VAEConfig, vae_params: Any,
                    image_size: int, batch_size: int = 64, chunk_size: int = 1024,
                    dtype: str = "float32", data_config: Mapping[str, Any] | None = None,
                    num_threads: int = 8, process_index: int | None = None,
                    process_count: int | None = None,
                    devices: Sequence[jax.Device] | None = None,
                    progress: bool = True) -> ExtractionResult:
  """Encodes this process's share of `source` into `out_dir` (see the module docstring).

  Args:
    source: the images (`dit_jax.data.make_source`).
    out_dir: the latent directory (a local path or a `gs://` URL); created if needed; an
      unfinished one is resumed.
    vae_config, vae_params: the VAE (`dit_jax.vae.load_diffusers_vae`).
    image_size: side of the center crop, as in training (`config.data.image_size`).
    batch_size: images per encoder call on this process (a multiple of the local devices);
      each is encoded twice (with its mirror).
    chunk_size: examples per chunk file; rounded up to a multiple of `batch_size`. A resumed
      directory keeps the chunk size it was started with.
    dtype: stored moments, "float32" or "float16" (half the disk and read bandwidth).
    data_config: `config.data`, stored in the metadata (provenance and resume checks).
    num_threads: threads decoding and cropping images.
    process_index, process_count: this process and the number of processes (None: JAX's).
    devices: devices of the batch mesh; None: `jax.local_devices()`.
    progress: a tqdm bar (img/s, ETA) on process 0.

  Returns:
    An `ExtractionResult`; `complete` once metadata.json is written (by process 0, after all
    chunks exist).
  """
  out_dir = os.fspath(out_dir)
  check_not_complete(out_dir)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  devices = list(jax.local_devices() if devices is None else devices)
  records.storage_dtype(dtype)  # validates.
  if batch_size <= 0 or batch_size % len(devices):
    raise ValueError(f"--batch_size: {batch_size} is not a positive multiple of the "
                     f"{len(devices)} local devices")
  factor = vae_config.downsample_factor
  if image_size <= 0 or image_size % factor:
    raise ValueError(f"image_size {image_size} is not a positive multiple of the VAE's "
                     f"downsampling factor {factor}")
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError("the dataset is empty")
  latent_shape = [image_size // factor, image_size // factor, vae_config.latent_channels]
  requested = {
      "format": records.FORMAT,
      "num_examples": num_examples,
      "num_classes": int(source.num_classes),
      "latent_shape": latent_shape,
      "moments_shape": [2] + latent_shape[:2] + [2 * latent_shape[2]],
      "dtype": dtype,
      "record_bytes": records.record_bytes(tuple(latent_shape), dtype),
      "image_size": image_size,
      "chunk_size": -(-max(chunk_size, 1) // batch_size) * batch_size,
      "vae_config": vae_config.to_dict(),
      "scaling_factor": vae_config.scaling_factor,
      "shift_factor": vae_config.shift_factor,
      "vae_params_sha256": params_fingerprint(vae_params),
      "data": _jsonable(dict(data_config or {})),
  }
  plan = _prepare_plan(out_dir, _jsonable(requested))
  chunk_size = plan["chunk_size"]
  total_chunks = records.num_chunks(num_examples, chunk_size)
  mine = [k for k in range(total_chunks) if k % process_count == process_index]
  skipped = _existing(out_dir, mine)
  todo = sorted(set(mine) - set(skipped))
  if skipped:
    logger.info("%s: %d of this process's %d chunks exist, skipping them", out_dir,
                len(skipped), len(mine))

  if todo:
    _encode_chunks(source, out_dir, todo, vae_config=vae_config, vae_params=vae_params,
                   image_size=image_size, batch_size=batch_size, chunk_size=chunk_size,
                   num_examples=num_examples, dtype=dtype, num_threads=num_threads,
                   devices=devices, progress=progress and process_index == 0,
                   done=sum(_chunk_len(k, chunk_size, num_examples) for k in skipped))

  _barrier("dit_jax_latents_chunks_written")
  if process_index == 0:
    missing = sorted(set(range(total_chunks)) - set(_existing(out_dir, range(total_chunks))))
    if missing:
      logger.warning("%s: %d chunks are still missing (other processes' share?); "
                     "metadata.json not written", out_dir, len(missing))
    else:
      records.write_json(fs.join(out_dir, records.METADATA_NAME), plan)
  _barrier("dit_jax_latents_metadata_written")
  complete = fs.exists(fs.join(out_dir, records.METADATA_NAME))
  return ExtractionResult(out_dir, tuple(todo), tuple(skipped), complete)


def _chunk_len(chunk: int, chunk_size: int, num_examples: int) -> int:
  return min((chunk + 1) * chunk_size, num_examples) - chunk * chunk_size


def _encode_chunks(source: Source, out_dir: str, chunks: Sequence[int], *,
                   vae_config: VAEConfig, vae_params: Any, image_size: int, batch_size: int,
                   chunk_size: int, num_examples: int, dtype: str, num_threads: int,
                   devices: Sequence[jax.Device], progress: bool, done: int) -> None:
  """Encodes and writes `chunks`: images load on threads while the devices encode."""
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(vae_params, replicated)
  # One compiled shape: the last batch of a chunk is padded, and the padding dropped.
  encode = jax.jit(functools.partial(_encode_pairs, AutoencoderKL(vae_config), dtype),
                   in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
  # (chunk, example indices, last batch of the chunk?) for every batch, in order.
  work = []
  for chunk in chunks:
    stop = min((chunk + 1) * chunk_size, num_examples)
    starts = range(chunk * chunk_size, stop, batch_size)
    work.extend((chunk, np.arange(start, min(start + batch_size, stop)), start + batch_size >= stop)
                for start in starts)
  load = functools.partial(_load_example, source, image_size, vae_config.in_channels)
  mine = sum(_chunk_len(k, chunk_size, num_examples) for k in chunks)
  bar = logs.progress_bar(done + mine, "encoding latents", progress, initial=done)
  chunk_records: list[bytes] = []

  def finish(chunk: int, labels: list[int], moments: jax.Array, last: bool) -> None:
    moments = np.asarray(moments)[:len(labels)]  # waits for the device.
    chunk_records.extend(records.encode_record(m, label, dtype)
                         for m, label in zip(moments, labels))
    bar.update(len(labels))
    if last:
      _write_chunk(out_dir, chunk, chunk_records)
      chunk_records.clear()

  pending = None
  # The training pipeline's threads: examples load on one pool, 2 batches ahead on the other.
  workers = WorkerPools(num_threads, 2, "dit_jax_latents")
  try:
    batches = workers.batches(lambda k: workers.map(load, work[k][1]), 0, len(work))
    for (chunk, _, last), (_, examples) in zip(work, batches):
      images = np.stack([image for image, _ in examples])
      if len(images) < batch_size:
        images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(images), 0)])
      moments = encode(params, jax.device_put(preprocess.to_float(images), batch_sharding))
      # Fetch the previous batch only now: the devices work while the host prepares the next.
      if pending is not None:
        finish(*pending)
      pending = (chunk, [label for _, label in examples], moments, last)
    if pending is not None:
      finish(*pending)
  finally:
    workers.close()
  bar.close()


def extract_from_config(config: Any, vae_dir: str, out_dir: str, *, batch_size: int = 64,
                        chunk_size: int = 1024, dtype: str = "float32",
                        progress: bool = True) -> ExtractionResult:
  """`extract_latents` for a training config: `config.data` picks the dataset and the crop.

  Args:
    config: a training config (`configs/*.py`); reads `config.data` (`source_from_config`'s
      fields, `image_size`, `num_threads`).
    vae_dir: a diffusers AutoencoderKL folder (`config.json` + weights).
    out_dir, batch_size, chunk_size, dtype, progress: as in `extract_latents`.
  """
  check_not_complete(out_dir)  # before loading anything.
  data = config.data
  if not data.image_size:
    raise ValueError("config.data.image_size is not set (the side of the center crop)")
  vae_config, vae_params = load_diffusers_vae(vae_dir)
  data_dict = data.to_dict() if hasattr(data, "to_dict") else dict(data)
  return extract_latents(source_from_config(data), out_dir, vae_config=vae_config,
                         vae_params=vae_params, image_size=int(data.image_size),
                         batch_size=batch_size, chunk_size=chunk_size, dtype=dtype,
                         data_config=data_dict, num_threads=data.num_threads,
                         progress=progress)
