"""A tiny DiT (the architecture of the official reference fixture) for tests and smoke runs.

Usage: --config configs/tiny.py
"""
import ml_collections

from configs import imagenet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = imagenet.get_config("S/2,64")
  config.model.num_classes = 10
  config.model.depth = 1
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.dtype = "float32"  # bf16 is slower than fp32 on CPUs.
  config.model.scan_blocks = False
  return config
