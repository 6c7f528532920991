"""ImageNet class-conditional DiT in the latent space of Stable Diffusion's VAE (the paper).

Usage: --config configs/imagenet.py:XL/2  (or "XL/2,512" for 512 px; any of S|B|L|XL x 2|4|8;
"XL/2,256,flow" trains it as a flow, SiT's recipe on the same backbone).
Data: latents pre-extracted once from tfds `imagenet2012` (a manual download, prepared in
array_record format) with Stable Diffusion's VAE:
  python -m dit_jax.data.prepare imagenet2012 --data_dir DATA_DIR   # the two ILSVRC2012 tars
  python -m dit_jax.latents.extract --config configs/imagenet.py:XL/2 \
      --config.data.data_dir=DATA_DIR --vae SD_VAE_DIR --out LATENTS
  python train.py --config configs/imagenet.py:XL/2 --workdir WORKDIR \
      --config.latents_dir=LATENTS --config.vae.path=SD_VAE_DIR
Without `latents_dir`, `vae.path` alone encodes images on the fly (slower).
"""
import ml_collections

from configs import defaults

VAE_FACTOR = 8  # sd-vae-ft-ema/-mse downsample 8x: 256 px -> 32x32x4 latents.


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
  variant, _, rest = arg.partition(",")
  size, _, process = rest.partition(",")
  if process not in ("", "diffusion", "flow"):
    raise ValueError(f"--config: the process of configs/imagenet.py:{arg} is 'diffusion' or "
                     f"'flow', got {process!r}")
  image_size = int(size) if size else 256
  config = defaults.base_config()
  config.data.name = "imagenet2012"
  config.data.image_size = image_size
  config.model.variant = variant
  config.model.input_size = image_size // VAE_FACTOR
  config.model.in_channels = 4  # VAE latents.
  config.latents_dir = ""  # set to the extracted latents (see above)
  if process == "flow":  # SiT: the same backbone and budget, trained as a flow
    defaults.use_flow(config)
    config.sample.num_steps = 50
  return config
