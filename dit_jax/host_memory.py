"""Host memory of CPU runs: keep the memory XLA frees after a step for the next step.

On the CPU backend every execution of a compiled program allocates its temporary buffer (1.2
GB for the DiT-S/2 train step at batch 8) and its outputs, and frees them when it ends. glibc's
malloc serves an allocation that large with a fresh `mmap` and gives it back with `munmap` on
free: XLA's worker threads allocate from per-thread arenas, which fall back to `mmap` for any
chunk larger than their 64 MB heaps, whatever the mmap threshold says. So each step touches a
fresh 1.2 GB mapping: 300,000 page faults, each zeroing 4 KB in the kernel, about 10% of the
step (benchmarks/README.md, "Page faults").

`retain_freed_memory` makes every thread allocate from glibc's main arena (`M_ARENA_MAX` 1),
from the heap rather than from mappings (`M_MMAP_MAX` 0), and never give freed memory back
(`M_TRIM_THRESHOLD` -1): the second step reuses the first one's pages. It must run before JAX
starts its backend (the threads take their arena when they start), and the process keeps the
memory of its peak until it ends, which is what a training or sampling run wants. The programs
call it at start (`cli.run_absl`), for CPU-only runs: with an accelerator the step's buffers
live on the device, and host threads (input pipelines) are better served by several arenas.
`DIT_RETAIN_HOST_MEMORY=0` turns it off; `=1` applies it whatever the platform.
"""
import ctypes
import importlib.util
import logging
import os
import pkgutil
import platform
import sys

ENV = "DIT_RETAIN_HOST_MEMORY"  # 0: never; 1: also with accelerators; unset: CPU-only runs

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


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
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def retain_freed_memory() -> bool:
  """Keeps freed host memory for reuse (see the module docstring); True if it now does.

  Does nothing, returning False, where it cannot help: not glibc, an accelerator expected (unless
  DIT_RETAIN_HOST_MEMORY=1), DIT_RETAIN_HOST_MEMORY=0, or JAX's backend already started.
  """
  setting = os.environ.get(ENV, "")
  if setting == "0" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  if setting != "1" and accelerator_plugins():
    return False
  if _backend_started():
    logging.info("host memory: JAX's backend has started, too late to keep freed memory")
    return False
  libc = ctypes.CDLL("libc.so.6")
  done = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  logging.info("host memory: freed memory kept for reuse: %s", done)
  return done
