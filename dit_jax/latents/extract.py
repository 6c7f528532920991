r"""Pre-extracts VAE latents of a dataset (resumable; every device, every host).

  python -m dit_jax.latents.extract --config configs/imagenet.py:XL/2 \
      --vae checkpoints/sd-vae-ft-ema --out latents/imagenet256 [--batch_size 64] \
      [--dtype float16] [--config.data.data_dir=...]

The config's `data` section picks the dataset and `data.image_size` the crop; --vae and --out
may be gs:// URLs (each chunk is written locally, then uploaded whole). Interrupted? Run
the same command again: finished chunks are skipped. Multi-host: run it on every host (with
the distributed flags, or DIT_DISTRIBUTED=auto). The library is `dit_jax.latents.extraction`.
"""
import sys

from absl import flags
from ml_collections import config_flags

from dit_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (config.json + weights).")
flags.DEFINE_string("out", None, "Output directory of the latent dataset.")
flags.DEFINE_integer("batch_size", 64, "Images per encoder call on each host (each is also "
                     "encoded mirrored); a multiple of the host's devices.")
flags.DEFINE_integer("chunk_size", 1024, "Examples per output file (the unit of resumption); "
                     "rounded up to a multiple of --batch_size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored dtype of the moments.")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)  # so that --help lists them
flags.mark_flags_as_required(["config", "vae", "out"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  from dit_jax import logs
  logs.setup()  # quiet libraries (a tfds dataset imports TensorFlow quietly, off the GPUs)
  import jax  # after absl parsed the flags, so XLA_FLAGS from the environment apply

  from dit_jax.latents.extraction import check_not_complete, extract_from_config
  with cli.user_errors(FileExistsError, NotADirectoryError):
    check_not_complete(FLAGS.out)  # a finished directory fails fast, before any setup.
  cli.start_distributed()
  # Bad input (the data, the VAE, the batch size, a directory begun with other settings).
  with cli.user_errors(ValueError, OSError):
    result = extract_from_config(FLAGS.config, FLAGS.vae, FLAGS.out, batch_size=FLAGS.batch_size,
                                 chunk_size=FLAGS.chunk_size, dtype=FLAGS.dtype)
  if jax.process_index() == 0:
    state = "complete" if result.complete else "incomplete (other processes' chunks missing)"
    print(f"{result.out_dir}: wrote {len(result.written)} chunks, skipped "
          f"{len(result.skipped)}; {state}", file=sys.stderr)


if __name__ == "__main__":
  cli.run_absl(main)
