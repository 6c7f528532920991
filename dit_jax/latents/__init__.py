"""Pre-extracted VAE latent datasets: extraction (`python -m dit_jax.latents.extract`), reading.

Names are imported on first use (PEP 562), so `dit_jax.latents.posterior`, which the train step
needs, imports without array_record or TensorFlow (accelerator images often lack both); tfds is
imported only when a config's dataset is a tfds one.
"""
import importlib

_EXPORTS = {
    "ExtractionResult": "extraction", "check_not_complete": "extraction",
    "extract_from_config": "extraction", "extract_latents": "extraction",
    "params_fingerprint": "extraction", "LatentPipeline": "pipeline",
    "latents_from_moments": "posterior",
    "FORMAT": "records", "METADATA_NAME": "records", "chunk_path": "records",
    "decode_record": "records", "encode_record": "records", "record_bytes": "records",
    "LatentSource": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
