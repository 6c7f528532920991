"""Class-conditional pixel-space DiT on a user's image folder (one sub-folder per class).

Usage: python train.py --config configs/folder.py:/path/to/folder,64,10 --workdir runs/folder
(argument: folder[,image_size[,num_classes]]; defaults 64 px, classes counted in the folder
must equal num_classes, default 10). Unreadable images are skipped, counted and named in the log.
"""
import ml_collections

from configs import defaults


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  folder, image_size, num_classes = (arg.split(",") + ["", "", ""])[:3]
  image_size = int(image_size or 64)
  config = defaults.base_config()
  config.data.name = "folder"
  config.data.folder = folder
  config.data.image_size = image_size
  config.data.random_flip = True

  config.model.variant = "S/4" if image_size >= 64 else "S/2"
  config.model.input_size = image_size  # pixel space
  config.model.in_channels = 3
  config.model.num_classes = int(num_classes or 10)
  config.model.dtype = "bfloat16"

  config.batch_size = 64
  config.num_steps = 100_000
  config.ema_decay = 0.9999
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep_period = 20_000
  config.sample.every_steps = 5000
  config.sample.classes = tuple(range(min(int(num_classes or 10), 8)))
  config.sample.guidance_channels = None  # RGB: guide all channels
  config.sample.clip_denoised = True  # pixel space
  return config
