r"""Trains every point of a config's `get_hyper` grid, then tables and plots the results.

  python -m dit_jax.sweep --config configs/digits_scaling.py --workdir runs/scaling
  python -m dit_jax.sweep --config configs/digits_scaling.py --workdir runs/scaling \
      --print_commands     # one train.py command per point, for a scheduler; trains nothing

Each point trains in WORKDIR/<name> (its overrides, e.g. `depth=3,hidden_size=64,...`);
`--config.KEY=VALUE` flags apply to every point. Rerunning skips finished points and resumes
the others. Writes WORKDIR/sweep.json (the plan), results.csv, results.json and scaling.png.
"""
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from dit_jax import cli


def define_flags(values: flags.FlagValues = flags.FLAGS,
                 argv: Optional[Sequence[str]] = None) -> None:
  """The command line's flags in `values`; `argv`: where config_flags finds `--config.KEY`
  overrides (None: sys.argv)."""
  config_flags.DEFINE_config_file("config", None, "Sweep config file (path[:arg]) with "
                                  "get_config and get_hyper(h).", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "The sweep's folder: one workdir per point, the plan, "
                      "the table and the figure.", flag_values=values)
  flags.DEFINE_integer("parallel", 1, "Points trained at the same time (one train.py process "
                       "each).", lower_bound=1, flag_values=values)
  flags.DEFINE_bool("print_commands", False, "Print one train.py command per point instead of "
                    "training.", flag_values=values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=values)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line from Python: `argv` (default: sys.argv[1:]), errors as one line."""
  cli.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> None:
  import sys  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  cli.check_config_flag(argv)  # a misspelt --config.KEY: one line naming the closest key
  program = "dit_jax.sweep"
  _sweep(*cli.parse_flags(lambda values: define_flags(values, [program, *argv]), argv, program))


def _sweep(values: flags.FlagValues, argv: Sequence[str]) -> None:
  from dit_jax import logs  # pylint: disable=import-outside-toplevel
  logs.setup()
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {list(argv[1:])}")
  from dit_jax import fs  # pylint: disable=import-outside-toplevel
  if fs.exists(values.workdir) and not fs.is_dir(values.workdir):
    raise cli.UserError(f"--workdir: {values.workdir} is a file, not a directory")
  from dit_jax.sweep import plan as plan_lib  # pylint: disable=import-outside-toplevel
  config_flag = values["config"]
  plan = plan_lib.make_plan(config_flags.get_config_filename(config_flag), values.workdir,
                            config_flags.get_override_values(config_flag))
  if values.print_commands:
    for point in plan.points:
      print(plan_lib.command_line(point), flush=True)
    return
  from dit_jax.sweep import runner  # pylint: disable=import-outside-toplevel
  runner.run_sweep(plan, values.parallel)


if __name__ == "__main__":
  define_flags()
  cli.run_absl(lambda argv: _sweep(flags.FLAGS, argv))
