"""`h` of a sweep config's `get_hyper(h)`: grids of config overrides (the big_vision convention).

A config module that defines

    def get_hyper(h):
      return h.product([h.sweep("config.model.depth", [2, 3]),
                        h.sweep("config.model.patch_size", [1, 2, 4])])

describes a sweep: a list of points, each a dict of overrides `{"config.model.depth": 2, ...}`
applied to its `get_config()`. This module is the `h` the runner passes:
  - `sweep(name, values)`: one point per value, `[{name: v} for v in values]`;
  - `product(sweeps)`: the cartesian product, the first sweep varying slowest;
  - `zipit(sweeps)`: the i-th points of sweeps of equal length, merged;
  - `chainit(sweeps)`: the points of one sweep after the other's;
  - `fixed(name, value, length=1)`: the same value `length` times (e.g. inside a `zipit`).
Names are `config.` followed by a key of the config. Every function raises ValueError (the runner
reports it as `error: get_hyper: ...`) on a malformed sweep: a name without `config.`, no
values, zipped sweeps of different lengths, a key set twice in one point.
"""
import itertools
from typing import Any, Iterable, Sequence

Point = dict[str, Any]  # "config.model.depth" -> 3
PREFIX = "config."


def _check_name(name: Any) -> None:
  if not isinstance(name, str) or not name.startswith(PREFIX) or name == PREFIX:
    raise ValueError(f"a sweep name must be 'config.' and a config key, got {name!r}")


def _merged(points: Iterable[Point]) -> Point:
  """One point from several; a key in two of them is a mistake, not an override."""
  merged = {}
  for point in points:
    twice = sorted(set(merged) & set(point))
    if twice:
      raise ValueError(f"{twice[0]} is set by two of the combined sweeps")
    merged.update(point)
  return merged


def _points(sweeps: Sequence[Sequence[Point]], what: str) -> list[list[Point]]:
  sweeps = [list(s) for s in sweeps]
  if not sweeps:
    raise ValueError(f"h.{what}([]): no sweeps to combine")
  for s in sweeps:
    if not all(isinstance(p, dict) for p in s):
      raise ValueError(f"h.{what}: expects a list of sweeps (lists of dicts), got {s!r}")
  return sweeps


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
  """One point per value of `name`."""
  _check_name(name)
  values = list(values)
  if not values:
    raise ValueError(f"h.sweep({name!r}, ...): no values")
  return [{name: value} for value in values]


def fixed(name: str, value: Any, length: int = 1) -> list[Point]:
  """`length` points that all set `name` to `value`."""
  _check_name(name)
  if length < 1:
    raise ValueError(f"h.fixed({name!r}, ...): length must be at least 1, got {length}")
  return [{name: value} for _ in range(length)]


def product(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
  """Every combination of one point of each sweep; the first sweep varies slowest."""
  return [_merged(combo) for combo in itertools.product(*_points(sweeps, "product"))]


def zipit(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
  """The i-th points of all sweeps merged, for sweeps of one length."""
  sweeps = _points(sweeps, "zipit")
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"h.zipit: the sweeps have different lengths {lengths}")
  return [_merged(points) for points in zip(*sweeps)]


def chainit(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
  """The points of every sweep, one sweep after the other."""
  return [dict(point) for s in _points(sweeps, "chainit") for point in s]
