"""Pre-extracted VAE latent datasets: extraction (`python -m dit_jax.latents.extract`), reading.

Importable without TensorFlow: tfds is imported only when a config's dataset is a tfds one.
"""
from dit_jax.latents.extraction import (ExtractionResult, check_not_complete,
                                        extract_from_config, extract_latents, params_fingerprint)
from dit_jax.latents.pipeline import LatentPipeline, make_latent_pipeline
from dit_jax.latents.posterior import latents_from_moments
from dit_jax.latents.records import (FORMAT, METADATA_NAME, chunk_path, decode_record,
                                     encode_record, record_bytes)
from dit_jax.latents.source import LatentSource

__all__ = [
    "ExtractionResult", "FORMAT", "LatentPipeline", "LatentSource", "METADATA_NAME",
    "check_not_complete", "chunk_path", "decode_record", "encode_record", "extract_from_config",
    "extract_latents", "latents_from_moments", "make_latent_pipeline", "params_fingerprint",
    "record_bytes",
]
