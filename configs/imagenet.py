"""ImageNet class-conditional DiT in the latent space of Stable Diffusion's VAE (the paper).

Usage: --config configs/imagenet.py:XL/2  (or "XL/2,512" for 512 px; any of S|B|L|XL x 2|4|8).
"""
import ml_collections

VAE_FACTOR = 8  # sd-vae-ft-ema/-mse downsample 8x: 256 px -> 32x32x4 latents.


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
  variant, _, size = arg.partition(",")
  image_size = int(size) if size else 256
  config = ml_collections.ConfigDict()
  config.image_size = image_size  # pixels; the model sees image_size / 8 latents.

  config.model = ml_collections.ConfigDict()
  config.model.variant = variant  # S|B|L|XL x /2,/4,/8 (the table in dit_jax.models).
  config.model.input_size = image_size // VAE_FACTOR  # latent side length.
  config.model.in_channels = 4  # VAE latent channels.
  config.model.num_classes = 1000
  config.model.learn_sigma = True  # second half of the output: variance values.
  config.model.class_dropout_prob = 0.1  # label -> null class, for classifier-free guidance.
  # Architecture overrides (None: the variant's value), for custom sizes.
  config.model.depth = ml_collections.config_dict.placeholder(int)
  config.model.hidden_size = ml_collections.config_dict.placeholder(int)
  config.model.num_heads = ml_collections.config_dict.placeholder(int)
  config.model.mlp_ratio = 4.0
  # How it runs; none of these change the parameters' values.
  config.model.dtype = "bfloat16"  # compute dtype; params stay float32.
  config.model.param_dtype = "float32"
  config.model.scan_blocks = True  # one compiled block: compile time independent of depth.
  config.model.remat_policy = ml_collections.config_dict.placeholder(str)  # e.g. "nothing_saveable".
  config.model.attention_impl = ml_collections.config_dict.placeholder(str)  # None|"xla"|"cudnn".

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.timestep_respacing = ""  # training uses all steps.
  config.diffusion.noise_schedule = "linear"  # or "squaredcos_cap_v2".
  config.diffusion.diffusion_steps = 1000
  config.diffusion.learn_sigma = True  # must equal model.learn_sigma.
  config.diffusion.sigma_small = False
  config.diffusion.predict_xstart = False
  config.diffusion.use_kl = False
  config.diffusion.rescale_learned_sigmas = False

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = "ddpm"  # "ddpm" (the paper: 250 steps) or "ddim".
  config.sample.num_steps = 250
  config.sample.eta = 0.0  # DDIM noise.
  config.sample.cfg_scale = 4.0  # 4.0 for pictures, 1.5 for FID.
  config.sample.guidance_channels = 3  # the official quirk; None guides all latent channels.
  config.seed = 0
  return config
