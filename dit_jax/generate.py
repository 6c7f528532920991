"""Sample grids and large-scale sample generation (ADM-evaluator `.npz`), resumable in chunks."""
import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import images as image_io
from dit_jax.models import DiT
from dit_jax.sampling import make_sample_fn


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """How to sample: the sampler, its steps and guidance. Defaults: the paper's FID setting."""
  sampler: str = "ddpm"  # "ddpm" | "ddim" | "dpm-solver++"
  num_steps: int = 250
  cfg_scale: float = 1.5  # 4.0 for pictures, 1.5 for FID, 1.0 unguided
  guidance_channels: Optional[int] = 3  # 3: the official quirk; None: all latent channels
  eta: float = 0.0  # DDIM noise
  clip_denoised: bool = False  # True for pixel-space models
  seed: int = 0


def _sample_fn(model: DiT, spec: SamplingSpec, batch: int) -> Callable[..., jax.Array]:
  devices = jax.devices()
  if batch % len(devices):
    raise ValueError(f"--batch_size: {batch} is not divisible by the {len(devices)} devices")
  mesh = Mesh(np.asarray(devices), ("batch",))
  return make_sample_fn(
      model, sampler=spec.sampler, num_steps=spec.num_steps, cfg_scale=spec.cfg_scale,
      guidance_channels=spec.guidance_channels, eta=spec.eta, clip_denoised=spec.clip_denoised,
      batch_sharding=NamedSharding(mesh, PartitionSpec("batch")),
      out_sharding=NamedSharding(mesh, PartitionSpec()))


def vae_decoder(vae_dir: str) -> Callable[[np.ndarray], np.ndarray]:
  """Latents (scaled by the VAE's scaling_factor) -> images in [-1, 1], jitted once.

  vae_dir: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors),
  e.g. the files of stabilityai/sd-vae-ft-ema.
  """
  from dit_jax.vae import AutoencoderKL, load_diffusers_vae

  config, params = load_diffusers_vae(vae_dir)
  vae = AutoencoderKL(config)
  decode = jax.jit(lambda p, z: vae.decode_latents(p, z))  # params as an argument, not constants
  return lambda latents: np.asarray(decode(params, latents))


def to_images(samples: np.ndarray, decode: Optional[Callable[[np.ndarray], np.ndarray]] = None
              ) -> np.ndarray:
  """Model outputs [N, H, W, C] -> uint8 RGB [N, H', W', 3]; latents go through `decode`."""
  if decode is not None:
    samples = np.asarray(decode(samples))
  elif samples.shape[-1] not in (1, 3):
    raise ValueError(f"samples have {samples.shape[-1]} channels (latents): decoding them to "
                     "images needs the VAE")
  pixels = image_io.to_uint8(samples)
  return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def sample_grid(model: DiT, params: Any, spec: SamplingSpec, classes: Sequence[int],
                per_class: int, decode: Optional[Callable] = None) -> tuple[np.ndarray, np.ndarray]:
  """Samples per_class images of each class; returns (uint8 [N, H, W, 3], grid, one row a class)."""
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  if np.any(labels < 0) or np.any(labels >= model.num_classes):
    raise ValueError(f"--classes: class ids must be in [0, {model.num_classes})")
  n = len(labels)
  padded = -(-n // jax.device_count()) * jax.device_count()
  labels = np.concatenate([labels, labels[: padded - n]])
  out = _sample_fn(model, spec, padded)(params, labels, jax.random.key(spec.seed))
  pixels = to_images(np.asarray(out)[:n], decode)
  upscale = max(1, 64 // pixels.shape[1])
  return pixels, image_io.make_grid(pixels, rows=len(classes), upscale=upscale, pad_value=128)


def generate_npz(model: DiT, params: Any, spec: SamplingSpec, num_samples: int, out_path: str,
                 batch_size: int = 64, decode: Optional[Callable] = None,
                 keep_parts: bool = False, progress: bool = True) -> str:
  """Generates `num_samples` images with random labels into an ADM-evaluator `.npz`.

  `arr_0`: uint8 [N, H, W, 3]; `arr_1`: int labels [N]. Work is done in chunks of `batch_size`
  (sharded over every device); chunk i depends only on (seed, i), and each finished chunk is
  written to `<out_path>.parts/`, so an interrupted run resumes where it stopped without
  duplicated or missing samples. An existing `out_path` is never overwritten.
  """
  if os.path.exists(out_path):
    raise FileExistsError(f"--npz: {out_path} already exists; refusing to overwrite it")
  if num_samples <= 0:
    raise ValueError(f"--num_samples: must be positive, got {num_samples}")
  parts_dir = out_path + ".parts"
  os.makedirs(parts_dir, exist_ok=True)
  num_chunks = math.ceil(num_samples / batch_size)
  sample = _sample_fn(model, spec, batch_size)
  base = jax.random.key(spec.seed)
  bar = _progress(num_samples, progress)
  for i in range(num_chunks):
    part = os.path.join(parts_dir, f"part_{i:06d}.npz")
    if not os.path.exists(part):
      rng = jax.random.fold_in(base, i)
      # Uniformly random classes, as the official sample_ddp.py draws them.
      labels = np.asarray(jax.random.randint(jax.random.fold_in(rng, 0), (batch_size,), 0,
                                             model.num_classes), np.int32)
      images = to_images(np.asarray(sample(params, labels, jax.random.fold_in(rng, 1))), decode)
      if jax.process_index() == 0:
        _atomic_savez(part, images=images, labels=labels)
    bar.update(min(batch_size, num_samples - i * batch_size))
  bar.close()
  if jax.process_index() == 0:
    parts = [np.load(os.path.join(parts_dir, f"part_{i:06d}.npz")) for i in range(num_chunks)]
    images = np.concatenate([p["images"] for p in parts])[:num_samples]
    labels = np.concatenate([p["labels"] for p in parts])[:num_samples]
    _atomic_savez(out_path, arr_0=images, arr_1=labels)
    if not keep_parts:
      for i in range(num_chunks):
        os.remove(os.path.join(parts_dir, f"part_{i:06d}.npz"))
      os.rmdir(parts_dir)
  return out_path


def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # readers never see a half-written file


class _NoBar:
  def update(self, n: int) -> None:
    del n

  def close(self) -> None:
    pass


def _progress(total: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return _NoBar()
  from tqdm import tqdm  # a progress bar with img/s and ETA
  return tqdm(total=total, unit="img", desc="sampling", smoothing=0.1)
