"""The DiT paper's scaling experiment in miniature: 3 model sizes x patch sizes 1, 2, 4 on digits.

    python -m dit_jax.sweep --config configs/digits_scaling.py --workdir runs/scaling

The paper trains S, B, L, XL at patch sizes 8, 4, 2 for the same steps and finds FID falling as
the model's Gflops rise, whether by depth and width or by smaller patches (more tokens). Here:
pixel-space DiTs on the 8x8 digits (configs/digits.py), of depth/width 2/32, 3/64 and 4/96
(head size 16), at patch size 4, 2 and 1 (4, 16 and 64 tokens): 9 points, all trained for the
same steps and batch, graded by the digits classifier (accuracy, Fréchet distance). The whole
sweep takes about 20 minutes on 2 CPU cores (README, "Scaling sweeps").
"""
import ml_collections

from configs import digits


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = digits.get_config()
  # The middle size; get_hyper sets every point's.
  config.model.depth = 3
  config.model.hidden_size = 64
  config.model.num_heads = 4

  # A short run: 9 of them fit in about 20 minutes. At 600 steps the models barely drew digits
  # (accuracy 11-42%); at 1200 the larger models separate from the smaller ones.
  config.batch_size = 64
  config.num_steps = 1200
  config.optimizer.warmup_steps = 100
  config.ema_decay = 0.99  # average over ~100 of the 1200 steps

  config.checkpoint.every_steps = 600
  config.log_every_steps = 20  # the final loss averages the rows of the last 120 steps
  config.sample.every_steps = 0  # no grids: each would compile a sampler of its own
  config.sample.num_steps = 25  # the grade's DDIM steps (50 in configs/digits.py)
  config.eval.num_samples = 500
  config.eval.batch_size = 500
  return config


def get_hyper(h):
  """Model sizes (depth, width, heads; zipped) x patch sizes."""
  return h.product([
      h.zipit([h.sweep("config.model.depth", [2, 3, 4]),
               h.sweep("config.model.hidden_size", [32, 64, 96]),
               h.sweep("config.model.num_heads", [2, 4, 6])]),
      h.sweep("config.model.patch_size", [4, 2, 1]),
  ])
