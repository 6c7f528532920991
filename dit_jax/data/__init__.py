"""The training input pipeline: sources, ADM preprocessing, a resumable order, global batches.

Importable without TensorFlow or tensorflow_datasets (tfds is imported only by `TfdsSource`).
"""
from dit_jax.data.pipeline import InputPipeline, to_global
from dit_jax.data.preprocess import center_crop_arr, flip_mask, horizontal_flip, to_float
from dit_jax.data.sampler import (EpochPermutations, epoch_permutation, global_batch_indices,
                                  local_batch_size, process_slice)
from dit_jax.data.sources import (IMAGE_EXTENSIONS, DigitsSource, FolderSource, Source,
                                  make_source, source_from_config)
from dit_jax.data.tfds_source import DatasetNotFoundError, TfdsSource

__all__ = [
    "DatasetNotFoundError", "DigitsSource", "EpochPermutations", "FolderSource",
    "IMAGE_EXTENSIONS", "InputPipeline", "Source", "TfdsSource", "center_crop_arr",
    "epoch_permutation", "flip_mask", "global_batch_indices", "horizontal_flip",
    "local_batch_size", "make_source", "process_slice", "source_from_config", "to_float",
    "to_global",
]
