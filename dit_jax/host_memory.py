"""Host memory of CPU runs: keep the memory XLA frees after a step for the next step.

On the CPU backend every execution of a compiled program allocates its temporary buffer (1.2
GB for the DiT-S/2 train step at batch 8) and its outputs, and frees them when it ends. By
default glibc's malloc gives large freed blocks back to the kernel (`munmap`, or trimming and
`madvise` of its heaps), so the next step faults the same memory in again, page by page, each
page zeroed by the kernel: 310,000 page faults a step for S/2, about 10% of it
(benchmarks/README.md, "Page faults").

`retain_freed_memory` stops that: no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming
(`M_TRIM_THRESHOLD` -1). With `one_arena`, every thread also allocates from glibc's main arena
(`M_ARENA_MAX` 1): XLA's worker threads allocate from per-thread arenas, whose heaps hold at
most 64 MB, and a larger block (S/2's temporary buffer) is mapped afresh whatever the settings;
but one arena's lock costs every allocation, which slows small, fast steps (the digits default:
21 -> 31 steps/s without it, 16 with it). `large_train_step` decides from the config: one arena
when the step's activations exceed the 64 MB heap. It must all happen before JAX starts its
backend (threads take their arena when they start), and the process then keeps the memory of
its peak until it ends, which is what a training or sampling run wants. The programs do it at
start, for CPU-only runs (`cli.run_absl`; `train.py` with the arena choice): with an
accelerator the step's buffers live on the device. `DIT_RETAIN_HOST_MEMORY=0` turns it off;
`=1` applies it whatever the platform.
"""
import ctypes
import importlib.util
import logging
import os
import pkgutil
import platform
import sys
from typing import Any, Optional

ENV = "DIT_RETAIN_HOST_MEMORY"  # 0: never; 1: also with accelerators; unset: CPU-only runs

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ARENA_HEAP_BYTES = 64 * 2**20  # the largest block a thread's own glibc arena can serve

# Bytes of saved activations per (image, token, hidden unit, block) of a float32 train step:
# DiT-S/2 at batch 8 (256 tokens, hidden 384, 12 blocks) allocates a 1.16 GB temporary buffer.
ACTIVATION_BYTES = 120


def accelerator_plugins() -> list[str]:
  """The accelerator backends JAX would find at start: JAX_PLATFORMS if set, else the installed
  PJRT plugins (`jax_plugins.*`, the `jax_plugins` entry points) and libtpu; empty for CPU."""
  requested = os.environ.get("JAX_PLATFORMS", "").strip()
  if requested:
    return [p for p in (s.strip() for s in requested.split(",")) if p and p != "cpu"]
  found = []
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  found += [e.name for e in metadata.entry_points(group="jax_plugins")]
  return found


def _backend_started() -> bool:
  """Whether JAX has started its backends (False where this jax cannot tell: applying the
  settings late is harmless, they just miss the threads that exist)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def large_activations(model: Any, batch: float) -> bool:
  """Whether a DiT's train step on `batch` images keeps more activations than a thread's arena
  holds (`ACTIVATION_BYTES` per image, token, hidden unit and block; half in 16-bit compute)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tokens = (model.input_size // model.patch_size) ** 2
  scale = jnp.dtype(model.dtype).itemsize / 4
  return (batch * tokens * model.hidden_size * model.depth * ACTIVATION_BYTES * scale
          > ARENA_HEAP_BYTES)


def large_train_step(config: Any, num_processes: Optional[int] = None) -> bool:
  """`large_activations` of a training config's model and per-process batch. A config that does
  not describe one (a missing key, a value of the wrong type or range) is not large: the
  trainer reports what is wrong with it."""
  from dit_jax import models  # pylint: disable=g-import-not-at-top
  model_config = dict(config.model)
  if model_config.get("scan_blocks") is None:
    model_config["scan_blocks"] = False  # not the default's backend query: JAX has not started
  try:
    model = models.build_model(model_config)
    return large_activations(model, config.batch_size / max(num_processes or 1, 1))
  except (AttributeError, KeyError, TypeError, ValueError, ArithmeticError):
    return False


def retain_freed_memory(one_arena: bool = False) -> bool:
  """Keeps freed host memory for reuse, with every thread on one arena if `one_arena` (see the
  module docstring); True if it now does.

  Does nothing, returning False, where it cannot help: not glibc, an accelerator expected (unless
  DIT_RETAIN_HOST_MEMORY=1), DIT_RETAIN_HOST_MEMORY=0, or JAX's backend already started.
  """
  setting = os.environ.get(ENV, "")
  if setting == "0" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  if setting != "1" and accelerator_plugins():
    return False
  if _backend_started():
    logging.debug("host memory: JAX's backend has started, too late to keep freed memory")
    return False
  libc = ctypes.CDLL("libc.so.6")
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)] + [(_M_ARENA_MAX, 1)] * one_arena
  done = all(libc.mallopt(param, value) == 1 for param, value in settings)
  logging.debug("host memory: freed memory kept for reuse: %s (one arena: %s)", done, one_arena)
  return done
