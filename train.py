"""Trains a DiT: python train.py --config configs/digits.py --workdir runs/digits.

Multi-host: start the same command on every host; with several processes JAX's distributed
runtime is initialized from the environment (TPU pods, SLURM, or the flags below).
"""
import sys

from absl import flags
from ml_collections import config_flags

from dit_jax import cli, host_memory, logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and samples go here.")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)  # so that --help lists them
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logs.setup()  # first: before JAX (or TensorFlow, where a tfds dataset needs it) logs anything
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  # Before JAX starts: a large CPU step's buffers outgrow a thread's malloc arena.
  host_memory.retain_freed_memory(
      one_arena=host_memory.large_train_step(FLAGS.config, FLAGS.num_processes))
  import jax  # after absl parsed the flags, so XLA_FLAGS from the environment apply

  cli.start_distributed()

  from dit_jax.train.loop import train_and_evaluate
  with cli.user_errors(FloatingPointError):  # a diverged run: one line naming the step
    results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(results.items())), file=sys.stderr)


if __name__ == "__main__":
  cli.run_absl(main)
