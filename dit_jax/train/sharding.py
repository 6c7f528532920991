"""Device mesh and shardings derived from the model's logical axis names.

The config names the mesh axes and their sizes (`-1` fills the rest), and maps every logical
axis of the model (`dit_jax.models.LOGICAL_AXES`) to a mesh axis or None. The same rules give
the shardings of the train state, its orbax restore target and the batch.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Logical axis of the batch dimension of inputs.
BATCH_AXIS = "batch"
# The default mesh axes (config.mesh.axis_names): data parallel over `data`, parameters sharded
# over `fsdp`, matmuls over `tensor`.
MESH_AXES = ("data", "fsdp", "tensor")
# The default rules (config.axis_rules): logical axis -> mesh axis or None (replicated).
AXIS_RULES = (
    (BATCH_AXIS, ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
    ("heads", "tensor"), ("adaln", "tensor"), ("layers", None), ("patch", None),
    ("out_patch", None), ("time_freq", None), ("time_embed", None), ("classes", None))


def make_mesh(axis_names: Sequence[str], axis_sizes: Sequence[int],
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices; one size may be -1 to take what is left."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = tuple(axis_names), list(axis_sizes)
  if len(names) != len(sizes):
    raise ValueError(f"config.mesh: {len(names)} axis names {names} but {len(sizes)} sizes")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh.axis_sizes: at most one -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh.axis_sizes: {sizes} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh.axis_sizes: {sizes} needs {int(np.prod(sizes))} devices, "
                     f"there are {len(devices)}")
  # Auto axis types: Linen models with logically sharded kernels need them (jax >= 0.10
  # defaults to Explicit, which fails with ShardingTypeError).
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def rules_from_config(rules: Any, mesh_axes: Sequence[str] | None = None
                      ) -> tuple[tuple[str, Any], ...]:
  """Config rules ([[logical, mesh axis or None or [axes]], ...]) as a tuple of pairs, checked.

  Every logical axis of the model and the batch axis needs exactly one rule, and every rule
  must name one of them (a typo would otherwise replicate a tensor without a word); with
  `mesh_axes`, the mesh axes the rules map to must exist.
  """
  from dit_jax.models import LOGICAL_AXES  # pylint: disable=import-outside-toplevel
  known = (BATCH_AXIS,) + tuple(LOGICAL_AXES)
  out = []
  for pair in rules:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f"config.axis_rules: {pair!r} is not a (logical axis, mesh axes) pair")
    logical, mesh = pair
    if logical not in known:
      raise ValueError(f"config.axis_rules: unknown logical axis {logical!r}; the model's axes "
                       f"are {', '.join(known)}")
    if logical in dict(out):
      raise ValueError(f"config.axis_rules: logical axis {logical!r} has two rules")
    mesh = tuple(mesh) if isinstance(mesh, (list, tuple)) else mesh
    for axis in (mesh if isinstance(mesh, tuple) else (mesh,)):
      if axis is not None and mesh_axes is not None and axis not in mesh_axes:
        raise ValueError(f"config.axis_rules: {logical!r} maps to {axis!r}, which is not a mesh "
                         f"axis ({', '.join(mesh_axes)})")
    out.append((logical, mesh))
  missing = [axis for axis in known if axis not in dict(out)]
  if missing:
    raise ValueError(f"config.axis_rules: no rule for the logical axes {', '.join(missing)} "
                     "(map each to a mesh axis, or to None to replicate it)")
  return tuple(out)


def tree_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may carry logical-axis boxes.

  Unboxed leaves (step counters, optimizer counts) are replicated. The result has the
  structure of the UNBOXED tree.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int) -> NamedSharding:
  """Sharding of an input array `[batch, ...]`: batch over the rule for `batch`, rest replicated."""
  spec = nn.logical_to_mesh_axes((BATCH_AXIS,) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
