"""Sampling from a trained model: its settings (`SamplingSpec`, flags), compiled sampling over
the devices, and class grids. Large-scale `.npz` generation: `dit_jax.npz_samples`."""
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import samplers
from dit_jax import images as image_io
from dit_jax.diffusion import Process, process_from_config
from dit_jax.models import DiT
from dit_jax.samplers.guidance import make_sample_fn
from dit_jax.samplers.loop import SamplerOptions


SAMPLE_RNG_TAG = 1_000_003  # fold_in tag: sample noise never collides with a train step's rng
GRID_PER_CLASS = 8  # grid columns: samples of each class (one row per class)
GRID_MIN_SIDE = 64  # small images are magnified (nearest neighbour) to at least this many pixels


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """How to sample: the process, the sampler, its steps and guidance. Defaults: the paper's FID
  setting."""
  sampler: str = "ddpm"  # a name of dit_jax.samplers.SAMPLERS
  num_steps: int = 250
  cfg_scale: float = 1.5  # 4.0 for pictures, 1.5 for FID, 1.0 unguided
  guidance_channels: Optional[int] = 3  # 3: the official quirk; None: all latent channels
  eta: float = 0.0  # DDIM noise
  clip_denoised: bool = False  # True for pixel-space models
  seed: int = 0
  # The model's process (its checkpoint records it); None: the official diffusion.
  process: Optional[Process] = None
  options: SamplerOptions = SamplerOptions()  # the flow samplers' settings


def spec_from_config(config: Any) -> SamplingSpec:
  """The sampling settings of a training config (`config.sample`, the process, seed).

  An unknown `config.sample.sampler`, one of the other process's, or bad
  `config.sample.options` are refused here, naming the key.
  """
  cfg = config.sample
  process = process_from_config(config)
  samplers.get(cfg.sampler, "config.sample.sampler", process)
  options = SamplerOptions.from_settings(cfg.options, "config.sample.options.")
  return SamplingSpec(sampler=cfg.sampler, num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale,
                      guidance_channels=cfg.guidance_channels, eta=cfg.eta,
                      clip_denoised=cfg.clip_denoised, seed=config.seed, process=process,
                      options=options)


def sampler_from_flags(process: Process, sampler: Optional[str], num_steps: Optional[int],
                       options: Mapping[str, Any]) -> tuple[str, int, SamplerOptions]:
  """sample.py's sampler, model evaluations and options for a checkpoint's process.

  None takes the process's default (`samplers.default_for`: ddpm at 250 steps for a diffusion,
  ode-heun at 50 evaluations for a flow); options set to None keep SiT's defaults. Raises a
  one-line ValueError naming the flag (`--sampler`, `--num_steps`, `--atol`, ...): a sampler
  of the other process, steps outside the process, a bad option.
  """
  default_sampler, default_steps = samplers.default_for(process)
  sampler = default_sampler if sampler is None else sampler
  num_steps = default_steps if num_steps is None else num_steps
  samplers.get(sampler, "--sampler", process)
  options = SamplerOptions.from_settings(options, "--")
  if process.kind == "diffusion" and not 1 <= num_steps <= process.diffusion_steps:
    raise ValueError(f"--num_steps: {num_steps} is not in [1, {process.diffusion_steps}], the "
                     "steps of the model's process")
  if num_steps < 1:
    raise ValueError(f"--num_steps: must be positive, got {num_steps}")
  return sampler, num_steps, options


def spec_from_flags(process: Process, in_channels: int, *, sampler: Optional[str],
                    num_steps: Optional[int], options: Mapping[str, Any], cfg_scale: float,
                    guidance: str, eta: float, seed: int,
                    clip_denoised: Optional[bool]) -> SamplingSpec:
  """sample.py's sampling settings for a checkpoint's process and image channels (both from
  its config, before its weights load), or a one-line ValueError naming the flag
  (`sampler_from_flags`). `guidance` "official" guides the first 3 channels of a model with 3
  or more, as the official code does; clipping defaults to pixel-space models (1 or 3
  channels)."""
  sampler, num_steps, sampler_options = sampler_from_flags(process, sampler, num_steps, options)
  return SamplingSpec(
      process=process, sampler=sampler, num_steps=num_steps, options=sampler_options,
      cfg_scale=cfg_scale,
      guidance_channels=3 if guidance == "official" and in_channels >= 3 else None,
      eta=eta, seed=seed,
      clip_denoised=in_channels in (1, 3) if clip_denoised is None else clip_denoised)


# sample.py's flags that `check_flags` takes.
CHECKED_FLAGS = ("out", "per_class", "npz", "num_samples", "batch_size", "cfg_scale", "eta")


def check_flags(*, out: Optional[str], per_class: int, npz: Optional[str], num_samples: int,
                batch_size: int, cfg_scale: float, eta: float) -> None:
  """Refuses sample.py flags that no run can sample with, as a one-line ValueError naming the
  flag: called before the checkpoint is read, so that a typo costs no model load and no
  compile, and leaves nothing behind (an empty `.parts` folder, a half-made grid).

  A guidance scale below 1 is legal (it guides away from the class, as the math of CFG allows;
  1 is unguided), so only a non-finite one is refused; DDIM's noise scale `eta` must be a
  finite number >= 0 (a standard deviation's scale).
  """
  if out is not None and not out.lower().endswith(".png"):
    raise ValueError(f"--out: {out}: the grid is written as PNG; give a name ending in .png")
  if out is not None and per_class < 1:
    raise ValueError(f"--per_class: must be positive, got {per_class}")
  if npz is not None:
    if num_samples < 1:
      raise ValueError(f"--num_samples: must be positive (the samples --npz gets), got "
                       f"{num_samples}")
    if batch_size < 1:
      raise ValueError(f"--batch_size: must be positive, got {batch_size}")
    if batch_size % jax.device_count():
      raise ValueError(f"--batch_size: {batch_size} is not divisible by the "
                       f"{jax.device_count()} devices")
  if not math.isfinite(cfg_scale):
    raise ValueError(f"--cfg_scale: must be a finite number, got {cfg_scale}")
  if not (math.isfinite(eta) and eta >= 0):
    raise ValueError(f"--eta: must be a finite number >= 0, got {eta}")


def check_architecture(arch: Mapping[str, Any], classes: Optional[Sequence[str]],
                       vae: Optional[str]) -> list[int]:
  """sample.py's checks of the flags that depend on a checkpoint's architecture (its config's
  `model` entry), made before its weights are loaded: a latent model needs `--vae`; returns
  `--classes` as class ids (`parse_classes`). Raises a one-line ValueError naming the flag."""
  if not arch:
    raise ValueError("--checkpoint: its config has no 'model' entry (not a dit-jax checkpoint)")
  if arch.get("in_channels") not in (1, 3) and not vae:
    raise ValueError("--vae: this latent-space model needs the VAE to make images (a "
                     "diffusers folder, e.g. the files of stabilityai/sd-vae-ft-ema)")
  return parse_classes(classes or [], arch.get("num_classes", 0))


def parse_classes(classes: Sequence[str], num_classes: int) -> list[int]:
  """`--classes` as class ids (default: the first 10 or fewer), or a one-line ValueError that
  says which of the two ways they are wrong: not integers, or outside the model's classes."""
  if not classes:
    return list(range(min(10, num_classes)))
  try:
    ids = [int(c) for c in classes]
  except ValueError:
    raise ValueError(f"--classes: {','.join(classes)}: class ids must be integers, separated "
                     "by commas") from None
  if not all(0 <= c < num_classes for c in ids):
    raise ValueError(f"--classes: {','.join(classes)}: class ids must lie in [0, {num_classes})")
  return ids


def sample_key(seed: int) -> jax.Array:
  """The base key of a seed's samples: a grid's noise (training's and sample.py's alike, so that
  `sample.py --seed S` redraws the grids of a run with `config.seed = S`); training's digits
  grade folds the step into it."""
  return jax.random.fold_in(jax.random.key(seed), SAMPLE_RNG_TAG)


def default_mesh() -> Mesh:
  """Every device on one `batch` axis: how sample.py spreads its batches."""
  return Mesh(np.asarray(jax.devices()), ("batch",))


@functools.lru_cache(maxsize=16)  # one compile per (model, spec, batch, mesh), like jit's cache
def _compiled(model: DiT, spec: SamplingSpec, batch: int, mesh: Mesh) -> Callable[..., jax.Array]:
  return make_sample_fn(
      model, sampler=spec.sampler, num_steps=spec.num_steps, cfg_scale=spec.cfg_scale,
      guidance_channels=spec.guidance_channels, eta=spec.eta, clip_denoised=spec.clip_denoised,
      process=spec.process, options=spec.options, return_nfe=True,
      # The batch over every mesh axis; the result replicated, so every process can read it.
      batch_sharding=NamedSharding(mesh, PartitionSpec(mesh.axis_names)),
      out_sharding=NamedSharding(mesh, PartitionSpec()))


def sharded_sampler(model: DiT, spec: SamplingSpec, batch: int,
                    mesh: Optional[Mesh] = None) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Jitted `(params, labels [batch], rng) -> ([batch, H, W, C], model evaluations)`, the batch
  sharded over mesh."""
  mesh = default_mesh() if mesh is None else mesh
  if batch % mesh.size:
    raise ValueError(f"--batch_size: {batch} is not divisible by the {mesh.size} devices")
  return _compiled(model, dataclasses.replace(spec, seed=0), batch, mesh)


def sample(model: DiT, params: Any, spec: SamplingSpec, labels: np.ndarray, rng: jax.Array,
           mesh: Optional[Mesh] = None, batch_size: Optional[int] = None,
           return_nfe: bool = False) -> Any:
  """Samples [N, H, W, C] in the model's space (pixels or latents) for labels [N], any N.

  The batch is padded to a multiple of the mesh's devices; with the default threefry keys a
  sample's noise depends on its index only, so the padding does not change the others. With
  `batch_size`, at most that many at a time: the chunk starting at sample i is drawn with the
  key `jax.random.fold_in(rng, i)` (training's digits grade). With `return_nfe`, returns
  `(samples, nfe)`: the model evaluations per chain (the mean over chunks: an adaptive solver's
  differ).
  """
  if batch_size is not None:
    chunks = [sample(model, params, spec, labels[i:i + batch_size], jax.random.fold_in(rng, i),
                     mesh, return_nfe=True) for i in range(0, len(labels), batch_size)]
    samples = np.concatenate([chunk for chunk, _ in chunks])
    return (samples, float(np.mean([nfe for _, nfe in chunks]))) if return_nfe else samples
  mesh = default_mesh() if mesh is None else mesh
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  padded = -(-n // mesh.size) * mesh.size
  labels = np.concatenate([labels, np.resize(labels, padded - n)])
  samples, nfe = sharded_sampler(model, spec, padded, mesh)(params, labels, rng)
  samples = np.asarray(samples)[:n]
  return (samples, float(nfe)) if return_nfe else samples


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
  """Model outputs [N, H, W, C] -> uint8 RGB [N, H', W', 3]; latents go through `decode`.

  RGB always, gray included: pixel-space digits have 1 channel, decoded latents 3, and one
  colour format lets every grid, `.npz` and PNG look alike (and the ADM evaluator wants 3).
  """
  if decode is not None:
    samples = np.asarray(decode(samples))
  elif samples.shape[-1] not in (1, 3):
    raise ValueError(f"samples have {samples.shape[-1]} channels (latents): decoding them to "
                     "images needs the VAE")
  pixels = image_io.to_uint8(samples)
  return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def grid_image(pixels: np.ndarray, num_rows: int) -> np.ndarray:
  """The one grid layout: uint8 RGB [N, H, W, 3] (row-major, one row per class) -> [H', W', 3].

  Cells are magnified to at least GRID_MIN_SIDE pixels and separated by 1 pixel of gray (128).
  """
  upscale = max(1, GRID_MIN_SIDE // pixels.shape[1])
  return image_io.make_grid(pixels, rows=num_rows, upscale=upscale, pad_value=128)


def sample_grid(model: DiT, params: Any, spec: SamplingSpec, classes: Sequence[int],
                per_class: int = GRID_PER_CLASS, decode: Optional[Callable] = None,
                mesh: Optional[Mesh] = None, return_nfe: bool = False) -> tuple[Any, ...]:
  """Samples per_class images of each class; returns (uint8 RGB [N, H, W, 3], grid_image),
  and the model evaluations per chain with `return_nfe`.

  Training (`Reporter.sample_grid`) and sample.py both draw their grids here: the same params,
  classes, per_class and spec (seed included) give the same picture.
  """
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  if np.any(labels < 0) or np.any(labels >= model.num_classes):
    raise ValueError(f"--classes: class ids must be in [0, {model.num_classes})")
  samples, nfe = sample(model, params, spec, labels, sample_key(spec.seed), mesh,
                        return_nfe=True)
  pixels = to_images(samples, decode)
  grid = grid_image(pixels, num_rows=len(classes))
  return (pixels, grid, nfe) if return_nfe else (pixels, grid)
