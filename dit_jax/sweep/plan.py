"""A sweep's plan: the grid of a config's `get_hyper(h)`, each point named, with its workdir and
the `train.py` command that trains it.

A point's name is its overrides, readable and safe in a path: `depth=2,patch_size=1` (the last
part of each swept key, or the whole key where two swept keys share a last part). Where the
readable form had to change a value (`variant=S-2` for `S/2`) or was cut short, a hash of the
exact overrides follows (`variant=S-2-1a2b3c`), so that two points never share a name.

The runner starts exactly the commands `--print_commands` prints, and every command is parsed
back here, as `train.py` parses it, into the config it trains: a value that a command line
cannot carry is refused before anything runs, rather than trained as something else.
"""
import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shlex
from typing import Any, Optional, Sequence

from absl import flags
from ml_collections import config_flags

from dit_jax import cli, fs
from dit_jax.sweep import hyper

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "train.py"
PLAN_FILE = "sweep.json"
_MAX_NAME = 160  # characters of the readable part of a name (file names allow 255)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep."""
  name: str
  overrides: dict[str, Any]  # config key (`model.depth`) -> value, in the sweep's key order
  workdir: str
  args: tuple[str, ...]  # train.py's arguments: --config, --workdir, then --config.KEY=VALUE
  config: Any  # the ConfigDict that train.py builds from `args`


@dataclasses.dataclass(frozen=True)
class Plan:
  config_spec: str  # --config as given: path[:arg]
  base_overrides: dict[str, Any]  # the sweep's own --config.KEY=VALUE flags, for every point
  workdir: str
  points: tuple[Point, ...]

  def to_json(self) -> dict[str, Any]:
    return {"config": self.config_spec, "overrides": _jsonable(self.base_overrides),
            "points": [{"name": p.name, "workdir": p.workdir,
                        "overrides": _jsonable(p.overrides), "command": command_line(p)}
                       for p in self.points]}


def _jsonable(overrides: dict[str, Any]) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def format_value(value: Any) -> str:
  """A config value as `--config.KEY=` takes it (ml_collections' config_flags)."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def train_args(config_spec: str, workdir: str, overrides: dict[str, Any]) -> tuple[str, ...]:
  return ("--config", config_spec, "--workdir", workdir,
          *(f"--config.{key}={format_value(value)}" for key, value in overrides.items()))


def command_line(point: Point, python: Optional[str] = None) -> str:
  """`PYTHON train.py --config FILE --workdir DIR --config.KEY=VALUE ...`, shell-quoted, with
  train.py's path relative to the current directory (`train.py` from the repository root);
  PYTHON: `python` (default: the interpreter running this, `cli.python_command`)."""
  return shlex.join([python or cli.python_command(), os.path.relpath(TRAIN_SCRIPT), *point.args])


def parse_train_args(args: Sequence[str]) -> tuple[Any, str]:
  """(config, workdir) that train.py's flags make of `args`."""
  argv = [str(TRAIN_SCRIPT), *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  return values.config, values.workdir


def point_name(overrides: dict[str, Any], labels: dict[str, str]) -> str:
  """`label=value,...` safe in a path; a hash of `overrides` follows when that lost anything."""
  exact = ",".join(f"{labels[k]}={format_value(v)}" for k, v in overrides.items())
  readable = _UNSAFE.sub("-", exact)[:_MAX_NAME]
  if readable == exact:
    return exact
  digest = hashlib.sha256(json.dumps(_jsonable(overrides), sort_keys=True).encode()).hexdigest()
  return f"{readable}-{digest[:6]}"


def key_labels(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last part (`depth`), or the whole key where two keys share their last part."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (leaf if last.count(leaf) == 1 else k) for k, leaf in zip(keys, last)}


def make_plan(config_spec: str, workdir: str,
              base_overrides: Optional[dict[str, Any]] = None) -> Plan:
  """Expands the `get_hyper` of config file `config_spec` (`path[:arg]`) into points under
  `workdir`; `base_overrides` (`model.dtype` -> value) apply to every point.

  Raises:
    cli.UserError: no get_hyper, a malformed grid, a swept key the config lacks, a value of the
      wrong type or that a command line cannot carry, two points with the same overrides, a
      point whose config train.py would refuse (`check_trainable`).
  """
  base_overrides = dict(base_overrides or {})
  get_hyper = getattr(cli.load_config_module(config_spec), "get_hyper", None)
  if not callable(get_hyper):
    raise cli.UserError(f"--config: {config_spec.partition(':')[0]} defines no get_hyper(h), "
                        "the grid of a sweep (see configs/digits_scaling.py)")
  try:
    grid = get_hyper(hyper)
  except Exception as e:  # pylint: disable=broad-except
    raise cli.UserError(f"get_hyper: {e}" if isinstance(e, ValueError)
                        else f"get_hyper: {type(e).__name__}: {e}") from e
  if not isinstance(grid, list) or not grid or not all(isinstance(p, dict) for p in grid):
    raise cli.UserError("get_hyper: must return a non-empty list of points (dicts), as "
                        f"h.product/h.zipit/h.sweep do; got {grid!r}"[:300])
  base = cli.load_config_file(config_spec)
  _check_keys(base, grid, base_overrides)
  keys = list(dict.fromkeys(k for point in grid for k in point))
  labels = key_labels([k.removeprefix(hyper.PREFIX) for k in keys])
  points, seen = [], {}
  for raw in grid:
    overrides = {k.removeprefix(hyper.PREFIX): v for k, v in raw.items()}
    name = point_name(overrides, labels)
    if name in seen:
      raise cli.UserError(f"get_hyper: two points have the same overrides ({name})")
    seen[name] = True
    point_dir = fs.join(workdir, name)
    args = train_args(config_spec, point_dir, {**base_overrides, **overrides})
    config = _checked_config(base, {**base_overrides, **overrides}, args)
    check_trainable(name, config)
    points.append(Point(name, overrides, point_dir, args, config))
  return Plan(config_spec, base_overrides, workdir, tuple(points))


def _check_keys(base: Any, grid: list[dict[str, Any]], base_overrides: dict[str, Any]) -> None:
  for point in grid:
    for key, value in point.items():
      try:
        hyper.sweep(key, [value])  # the name's form
      except ValueError as e:
        raise cli.UserError(f"get_hyper: {e}") from e
      key = key.removeprefix(hyper.PREFIX)
      try:
        cli.check_config_key(base, key)
      except cli.UserError as e:
        raise cli.UserError(f"get_hyper: {e}") from e
      if key in base_overrides:
        raise cli.UserError(f"--config.{key}: the sweep varies this key (get_hyper); drop the "
                            "flag or the sweep")
      if value is None:
        raise cli.UserError(f"get_hyper: config.{key}=None: a train.py command line cannot "
                            "set None")


def check_trainable(name: str, config: Any) -> None:
  """Refuses a point whose config train.py's setup would refuse by its cheap checks (the model,
  the positive counts, the digits grade, the diffusion, sampling and optimizer values): one bad
  point would otherwise fail in its own log only after the others trained. Nothing here
  compiles, reads data or touches the workdir.

  Raises:
    cli.UserError: naming the point and the config field.
  """
  # pylint: disable=import-outside-toplevel
  from dit_jax.diffusion import process_from_config
  from dit_jax.models import build_model
  from dit_jax.train import config_checks
  try:
    try:
      model = build_model(config.model)
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.model: {e}" if not str(e).startswith("config.") else str(e)) from e
    config_checks.check_config(config, model, process_from_config(config))  # as loop.setup
  except (ValueError, TypeError, KeyError) as e:
    raise cli.UserError(f"get_hyper: point {name}: {e}; no point was trained") from e


def _checked_config(base: Any, overrides: dict[str, Any], args: Sequence[str]) -> Any:
  """The config train.py builds from `args`, after checking that it is `base` with `overrides`
  set (types checked by the ConfigDict), so that a run trains what its point says."""
  expected = copy.deepcopy(base)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = expected
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise cli.UserError(f"get_hyper: config.{key}={value!r}: {e}") from e
  try:
    config, _ = parse_train_args(args)
  except flags.Error as e:
    raise cli.UserError(f"get_hyper: {e}") from e
  for key, value in overrides.items():
    got = config
    for part in key.split("."):
      got = got[part]
    want = expected
    for part in key.split("."):
      want = want[part]
    if got != want or type(got) is not type(want):
      raise cli.UserError(f"get_hyper: config.{key}={value!r} becomes {got!r} on a train.py "
                          "command line; use a value of the config's type")
  return config
