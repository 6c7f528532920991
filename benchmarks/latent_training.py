"""Training speed from stored latents vs encoding images with the VAE inside every step.

  python -m benchmarks.latent_training [--image-size 64] [--batch 8] [--variant S/2]

Both paths run the same jitted `train_step` on the same DiT; the only difference is the input:
pre-extracted posterior moments (sampled in the step) or images that the Stable Diffusion VAE
(its released architecture, random weights: speed does not depend on the values) encodes on the
fly. Needs only jax/flax/optax/numpy (no TensorFlow, no ml_collections).
"""
import argparse
import functools
import time
import types

import jax
import jax.numpy as jnp

from dit_jax.diffusion import OFFICIAL_PROCESS
from dit_jax.latents.posterior import latents_from_moments
from dit_jax.models import create_model
from dit_jax.train import state as state_lib
from dit_jax.train.step import train_step
from dit_jax.vae import AutoencoderKL, VAEConfig

SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
              latent_channels=4, in_channels=3, out_channels=3,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def steps_per_second(step, state, batch, rng, vae_params, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  state, metrics = step(state, batch, rng, vae_params)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch, rng, vae_params)
  jax.block_until_ready(metrics)
  return repeats / (time.perf_counter() - start), compile_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variant", default="S/2")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  vae_config = VAEConfig.from_dict(SD_VAE)
  vae = AutoencoderKL(vae_config)
  vae_params = vae.init_params(jax.random.key(0), image_size=args.image_size)
  latent = args.image_size // vae_config.downsample_factor
  model = create_model(args.variant, input_size=latent, num_classes=1000)
  optimizer = types.SimpleNamespace(learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999,
                                    eps=1e-8, warmup_steps=0, grad_clip_norm=0.0)
  tx, schedule = state_lib.make_optimizer(optimizer)
  common = dict(model=model, tx=tx, lr_schedule=schedule, ema_decay=0.9999,
                process=OFFICIAL_PROCESS)
  rng = jax.random.key(1)
  labels = jnp.arange(args.batch) % 1000
  images = jax.random.uniform(rng, (args.batch, args.image_size, args.image_size, 3),
                              minval=-1, maxval=1)
  moments = jax.random.normal(rng, (args.batch, latent, latent, 8))
  results = {}
  # The x0 of LatentPipeline and of InputPipeline with the VAE as its encoder.
  def from_moments(batch, rng, frozen):
    del frozen
    return latents_from_moments(batch["moments"], rng, vae_config.scaling_factor)

  def encoded(batch, rng, frozen):
    return vae.encode_to_latents(frozen, batch["images"], rng)

  for name, batch, x0, vp in (
      ("stored latents", {"moments": moments, "labels": labels}, from_moments, None),
      ("on-the-fly VAE encoding", {"images": images, "labels": labels}, encoded, vae_params)):
    step = jax.jit(functools.partial(train_step, **common, x0=x0), donate_argnums=0)
    state = jax.jit(functools.partial(state_lib.init_state, model=model, tx=tx))(
        jax.random.key(0))
    results[name] = steps_per_second(step, state, batch, rng, vp, args.repeats)
  print(f"device: {jax.devices()[0].device_kind}; DiT-{args.variant}, {args.image_size} px "
        f"({latent}x{latent}x4 latents), batch {args.batch}")
  print("| input | steps/s | img/s | compile s |")
  print("|---|---|---|---|")
  for name, (sps, compile_s) in results.items():
    print(f"| {name} | {sps:.2f} | {sps * args.batch:.1f} | {compile_s:.1f} |")
  ratio = results["stored latents"][0] / results["on-the-fly VAE encoding"][0]
  print(f"stored latents are {ratio:.1f}x faster")


if __name__ == "__main__":
  main()
