"""DiT models: the Linen module, the variant table, parameter layouts and cost."""
from dit_jax.models.dit import (ARCH_FIELDS, LOGICAL_AXES, VARIANTS, DiT, build_model,
                                create_model, dummy_inputs, init_params, model_from_config,
                                patchify, stack_block_params, unpatchify, unstack_block_params)
from dit_jax.models.flops import abstract_params, count_params, gflops, variant_table
from dit_jax.models.layers import LABEL_DROPOUT_RNG

__all__ = [
    "ARCH_FIELDS", "LABEL_DROPOUT_RNG", "LOGICAL_AXES", "VARIANTS", "DiT", "abstract_params",
    "build_model", "count_params", "create_model", "dummy_inputs", "gflops", "init_params",
    "model_from_config", "patchify", "stack_block_params", "unpatchify",
    "unstack_block_params", "variant_table",
]
