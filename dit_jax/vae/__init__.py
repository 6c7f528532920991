"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax, and its weight import."""
from dit_jax.vae.config import VAEConfig
from dit_jax.vae.convert import (from_diffusers_state_dict, load_diffusers_vae,
                                 save_diffusers_vae, to_diffusers_state_dict)
from dit_jax.vae.model import AutoencoderKL, Decoder, Encoder, sample_latent
from dit_jax.vae.safetensors import read_safetensors, write_safetensors

__all__ = [
    "AutoencoderKL", "Decoder", "Encoder", "VAEConfig", "from_diffusers_state_dict",
    "load_diffusers_vae", "read_safetensors", "sample_latent", "save_diffusers_vae",
    "to_diffusers_state_dict", "write_safetensors",
]
