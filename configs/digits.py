"""The embedded default: a small pixel-space DiT on scikit-learn's bundled digits (no download).

8x8 grayscale digits, 10 classes, 1797 images. `python train.py --config configs/digits.py
--workdir runs/digits` trains on 2 CPU cores in minutes, writes sample grids (one row per
class) under runs/digits/samples/ and grades 1000 guided EMA samples with a classifier of the
real digits at the end.

`configs/digits.py:flow` trains the same model, steps and batch with flow matching instead of
diffusion (SiT's linear path, velocity prediction) and samples it with the ODE Heun sampler.
"""
import ml_collections

from configs import defaults


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "diffusion", "flow"):
    raise ValueError(f"--config: configs/digits.py takes '', 'diffusion' or 'flow', got {arg!r}")
  config = defaults.base_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.random_flip = False  # a mirrored digit is another symbol
  config.data.num_threads = 2

  config.model.variant = "S/2"
  config.model.input_size = 8  # pixel space: 16 tokens of 2x2 pixels
  config.model.in_channels = 1
  config.model.num_classes = 10
  config.model.depth = 3
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.dtype = "float32"  # bf16 is slower than fp32 on CPUs
  config.model.scan_blocks = False

  config.batch_size = 128
  config.num_steps = 4000  # about 4 minutes on 2 CPU cores
  config.optimizer.learning_rate = 1e-3  # a small model on tiny data tolerates more than 1e-4
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = 1.0
  config.ema_decay = 0.999  # a short run: average over ~1000 steps, not 10000

  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 2
  config.checkpoint.keep_period = 0  # keep no permanent ones
  config.log_every_steps = 500
  config.sample.every_steps = 2000
  config.sample.classes = tuple(range(10))  # one row per digit
  config.sample.num_steps = 50
  config.sample.cfg_scale = 3.0  # also used for the final grade
  config.sample.guidance_channels = None  # one channel: guide it (the quirk assumes 4)
  config.sample.clip_denoised = True  # pixel space: x0 lies in [-1, 1]

  config.eval.digits = True
  config.eval.num_samples = 1000
  config.eval.batch_size = 500
  if arg == "flow":
    defaults.use_flow(config)
    config.sample.num_steps = 20  # model evaluations: 10 Heun steps
  return config
