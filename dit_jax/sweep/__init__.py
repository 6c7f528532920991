r"""Config-driven sweeps: a config's `get_hyper(h)` grid, trained point by point by train.py.

  python -m dit_jax.sweep --config configs/digits_scaling.py --workdir runs/scaling
  python -m dit_jax.sweep --config configs/digits_scaling.py --workdir runs/scaling --print_commands

`hyper` is the `h` a config's `get_hyper` gets; `plan` expands the grid into named points and
their train.py commands; `runner` trains the unfinished ones; `results` reads the table from the
points' workdirs; `plots` draws quality against compute.
"""
