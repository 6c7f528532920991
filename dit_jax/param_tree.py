"""Nested parameter dicts <-> flat {path tuple: leaf} maps, for the weight converters."""
from typing import Any

import jax

Path = tuple[str, ...]


def flatten(tree: Any) -> dict[Path, Any]:
  """{("blocks_0", "attn", "qkv", "kernel"): leaf, ...} for a nested dict of arrays."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
  """The inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree
