"""Device mesh and shardings derived from the model's logical axis names.

The config names the mesh axes and their sizes (`-1` fills the rest), and maps every logical
axis of the model (`dit_jax.models.LOGICAL_AXES`) to a mesh axis or None. The same rules give
the shardings of the train state, its orbax restore target and the batch, and, inside the
train step (`activation_sharding`), of the model's activations: the model constrains them at
its block boundaries with `nn.with_logical_constraint` (batch, tokens, embed, heads, mlp).
An activation's feature axis carries the name of the weight axis it meets (`embed`, `mlp`,
`heads`); the `batch` rule comes first, so a mesh axis that shards the batch (`fsdp` in the
default rules) is not used again for an activation's features: under FSDP, activations stay
sharded over the batch across `data` and `fsdp` while the weights are gathered where used.
"""
import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

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
# `bias`: the biases of the layers that `tensor` splits (models/layers.py TENSOR_SPLIT); `tokens`:
# the sequence axis of activations (None: no sequence parallelism).
AXIS_RULES = (
    (BATCH_AXIS, ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
    ("heads", "tensor"), ("adaln", "tensor"), ("layers", None), ("patch", None),
    ("out_patch", None), ("time_freq", None), ("time_embed", "fsdp"), ("classes", None),
    ("bias", "fsdp"), ("tokens", None))


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
  `mesh_axes`, the mesh axes the rules map to must exist. The `batch` rule is moved first:
  flax gives a mesh axis to the first rule that claims it, and an activation must be sharded
  over the batch before its features are (weights have no batch axis, so their shardings do
  not depend on the order).
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
  out.sort(key=lambda pair: pair[0] != BATCH_AXIS)  # stable: the others keep their order
  return tuple(out)


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh], rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes the model's activation constraints take effect while a step is traced.

  The model calls `nn.with_logical_constraint`, which does nothing without rules and a mesh in
  context: outside this block (sampling, tests, one device) it runs exactly as unconstrained.
  With `mesh=None` this block does nothing either.
  """
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


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


def check_divisible(abstract_boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]
                    ) -> None:
  """Raises a one-line ValueError if a parameter dimension does not split over its mesh axes.

  The line names the parameter, its dimension and the mesh axis, and suggests a mesh of the same
  devices that fits: each failing axis shrunk to the largest size that divides every dimension
  it shards, the devices freed moved to an axis that shards only the batch (`data`). Without
  this check, jit fails later with a raw error of the partitioner.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  # (parameter path, dimension index, logical name, size, mesh axes) of every sharded dimension
  dims = []
  for path, leaf in leaves:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for i, (name, size, axes) in enumerate(zip(leaf.names, leaf.value.shape, spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      if axes:
        dims.append((jax.tree_util.keystr(path, simple=True, separator="/"), i, name, size, axes))

  def first_misfit(sizes: dict[str, int]):
    for dim in dims:
      if dim[3] % math.prod(sizes[a] for a in dim[4]):
        return dim
    return None

  misfit = first_misfit(dict(mesh.shape))
  if misfit is None:
    return
  path, i, name, size, axes = misfit
  split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
  raise ValueError(f"config.mesh: parameter {path} dimension {i} ({name}, size {size}) does not "
                   f"split over mesh axis {split} "
                   f"({size} % {math.prod(mesh.shape[a] for a in axes)}"
                   f" != 0); {_suggest_mesh(mesh, rules, dims, first_misfit)}")


def _suggest_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]], dims: list, first_misfit) -> str:
  """A mesh of as many devices that fits, as text; shrinks failing axes, grows a batch-only one."""
  sharding_params = {a for dim in dims for a in dim[4]}
  batch_axes = nn.logical_to_mesh_axes((BATCH_AXIS,), rules)[0] or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  spare = [a for a in batch_axes if a not in sharding_params]
  if not spare:
    return ("no mesh axis shards only the batch, so use axis sizes that divide every "
            "parameter dimension they shard")
  sizes = dict(mesh.shape)
  while (misfit := first_misfit(sizes)) is not None:
    axis = next(a for a in misfit[4] if sizes[a] > 1)
    # The largest size that divides every dimension this axis shards; if the misfit is a
    # product of axes that each fit, the next smaller divisor (sizes fall: the loop ends).
    fits = math.gcd(sizes[axis], *(dim[3] for dim in dims if axis in dim[4]))
    if fits == sizes[axis]:
      fits = max(d for d in range(1, sizes[axis]) if sizes[axis] % d == 0)
    sizes[spare[0]] *= sizes[axis] // fits
    sizes[axis] = fits
  described = ", ".join(f"{a}={s}" for a, s in sizes.items())
  values = ",".join(str(s) for s in sizes.values())
  return f"a mesh that fits: ({described}), i.e. --config.mesh.axis_sizes={values}"
