"""Samples from a trained or imported DiT.

  python sample.py --checkpoint runs/digits --out digits.png              # a grid, one row a class
  python sample.py --checkpoint runs/digits --num_samples 50000 --npz samples.npz   # for FID

Every path (--checkpoint, --out, --singles_dir, --npz, --vae) may be a gs:// URL.
"""
import logging

from absl import flags

from dit_jax import cli, logs, samplers

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A training workdir or a `dit_jax.convert` directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("use_ema", True, "Training checkpoints: EMA weights (else the raw ones).")
flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Default: ddpm for a diffusion, "
                  f"ode-heun for a flow checkpoint. {samplers.describe()}")
flags.DEFINE_integer("num_steps", None, "Model evaluations (default: ddpm 250, ode-heun 50).")
flags.DEFINE_float("cfg_scale", 4.0, "Guidance scale (1: none; 4 for pictures, 1.5 for FID).")
flags.DEFINE_enum("guidance", "official", ["official", "all"],
                  "official: guide the first 3 channels (upstream quirk); all: every channel.")
flags.DEFINE_float("eta", 0.0, "Noise scale of the samplers that have one (see --sampler).")
flags.DEFINE_bool("clip_denoised", None, "Clip x0 predictions (default: for pixel models).")
# Flow samplers' settings (dit_jax.samplers.loop.SamplerOptions; unset: SiT's defaults).
flags.DEFINE_float("atol", None, "ode-dopri5: absolute tolerance (1e-6).")
flags.DEFINE_float("rtol", None, "ode-dopri5: relative tolerance (1e-3).")
flags.DEFINE_string("diffusion_form", None, "sde-euler: the diffusion coefficient w(t) (sigma).")
flags.DEFINE_float("diffusion_norm", None, "sde-euler: its scale (1.0).")
flags.DEFINE_string("last_step", None, "sde-euler: mean, tweedie, euler or none (mean).")
flags.DEFINE_float("last_step_size", None, "sde-euler: the last step's size (0.04).")
OPTION_FLAGS = ("atol", "rtol", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")
SPEC_FLAGS = ("sampler", "num_steps", "cfg_scale", "guidance", "eta", "seed", "clip_denoised")
flags.DEFINE_integer("seed", 0, "Seed of noise and labels.")
flags.DEFINE_list("classes", None, "Grid classes (default: the first 10 or fewer).")
flags.DEFINE_integer("per_class", 8, "Grid columns.")
flags.DEFINE_string("out", None, "Grid PNG to write.")
flags.DEFINE_string("singles_dir", None, "Also write every grid sample as its own PNG here.")
flags.DEFINE_integer("num_samples", 0, "Large-scale generation: number of samples.")
flags.DEFINE_string("npz", None, "Large-scale generation: ADM-evaluator .npz to write.")
flags.DEFINE_integer("batch_size", 64, "Large-scale generation: samples per chunk.")
flags.DEFINE_string("vae", None, "Latent models: a diffusers VAE folder (sd-vae-ft-ema/-mse).")
flags.mark_flag_as_required("checkpoint")


def main(argv):
  logs.setup()  # first: before TensorFlow or JAX log anything
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  if not (FLAGS.out or FLAGS.npz):
    raise cli.UserError("nothing to do: give --out (a grid) and/or --npz with --num_samples")
  for flag, path in (("--out", FLAGS.out), ("--npz", FLAGS.npz)):
    if path:
      cli.check_new_output(flag, path)
  import jax
  from dit_jax import checkpoints, fs, generate, images, models, npz_samples

  with cli.user_errors(ValueError):  # before anything is read, loaded or written
    generate.check_flags(**{name: getattr(FLAGS, name) for name in generate.CHECKED_FLAGS})
  # Not a checkpoint, no such step, or none that reads (unreadable steps are reported, skipped).
  with cli.user_errors(FileNotFoundError, ValueError), \
       checkpoints.Reader(FLAGS.checkpoint) as reader:
    config, step = reader.config(FLAGS.step)
    classes = generate.check_architecture(config.get("model", {}), FLAGS.classes, FLAGS.vae)
    # Everything but the weights comes from the config, so that bad flags, another run on
    # --npz or its parts' other settings are refused before the weights load.
    spec = generate.spec_from_flags(
        checkpoints.process_of(config), models.model_from_config(config["model"]).in_channels,
        options={name: getattr(FLAGS, name) for name in OPTION_FLAGS},
        **{name: getattr(FLAGS, name) for name in SPEC_FLAGS})

    def settings(step):
      return npz_samples.npz_settings(spec, FLAGS.num_samples, FLAGS.batch_size,
                                      checkpoint=reader.directory, step=step,
                                      use_ema=FLAGS.use_ema,
                                      vae=FLAGS.vae and fs.absolute(FLAGS.vae))
    parts = None
    if FLAGS.npz:  # held before the grid: another run's folder, or other settings, are refused
      with cli.user_errors(FileExistsError, ValueError):
        parts = npz_samples.NpzParts(FLAGS.npz, settings(step))
    try:
      # The step whose weights read: older than `step` if only the newest step's are damaged.
      loaded, (model, _, params) = reader.load_step_for_sampling(FLAGS.step,
                                                                 use_ema=FLAGS.use_ema)
      if parts is not None and loaded != step:
        parts.update_settings(settings(loaded))
      decode = generate.vae_decoder(FLAGS.vae) if FLAGS.vae else None  # a folder, a VAE?
    except BaseException:
      if parts is not None:
        parts.abandon()
      raise
  if FLAGS.out:
    pixels, grid, nfe = generate.sample_grid(model, params, spec, classes, FLAGS.per_class,
                                             decode=decode, return_nfe=True)
    if jax.process_index() == 0:
      images.save_png(FLAGS.out, grid)
      for i, image in enumerate(pixels if FLAGS.singles_dir else []):
        images.save_png(fs.join(FLAGS.singles_dir, f"{i:05d}.png"), image)
      logging.info("wrote %s (%s, %g model evaluations a sample)", FLAGS.out, spec.sampler,
                   nfe)
  if FLAGS.npz:
    npz_samples.generate_npz(model, params, spec, FLAGS.num_samples, FLAGS.npz,
                             batch_size=FLAGS.batch_size, decode=decode, parts=parts)
    logging.info("wrote %s", FLAGS.npz)


if __name__ == "__main__":
  cli.run_absl(main)
