"""The programs keep the host memory XLA frees, so a CPU step does not fault in fresh pages."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from configs import digits, imagenet
from dit_jax import host_memory
from dit_jax.models import create_model

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
glibc_only = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
MB = 96  # above glibc's largest mmap threshold (32 MB) and a thread arena's heap (64 MB)

# Allocates and frees a 96 MB block 40 times, as a train step's temporary buffer is, then prints
# `kept` and the page faults of the last 10 times. XLA: the output of a jitted function (which
# XLA's threads allocate), or a bytearray of the main thread.
PROGRAM = """
import resource
from dit_jax import cli, host_memory
{setup}
def main(argv):
  import jax, jax.numpy as jnp
  x = jnp.zeros(({mb} * 256, 1024), jnp.float32)
  add = jax.jit(lambda x: x + 1)
  for call in range(40):  # the heap grows while freed buffers are still being released
    if call == 30:
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if {xla}:
      y = add(x)
      y.block_until_ready()
      y.delete()
    else:
      y = bytearray({mb} * 2**20)  # zero-filled: every page written
      del y
  print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
{run}
"""


def faults(setup: str, xla: bool, run: str = "main([])", **env: str) -> tuple[str, float]:
  """(kept, page faults of the last 10 blocks, in blocks: 10 when each is mapped afresh)."""
  program = PROGRAM.format(mb=MB, setup=setup, xla=xla, run=run)
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  kept, count = result.stdout.split()
  return kept, int(count) / (MB * 2**20 / 4096)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
  kept, blocks = faults("kept = host_memory.retain_freed_memory()", xla=False)
  assert kept == "True" and blocks < 4, blocks
  # By default every block is mapped afresh and faulted in again (what this is for).
  kept, blocks = faults("kept = host_memory.retain_freed_memory()", xla=False,
                        DIT_RETAIN_HOST_MEMORY="0")
  assert kept == "False" and blocks > 9, blocks


@glibc_only
def test_xla_buffers_larger_than_a_thread_arena_need_one_arena():
  kept, blocks = faults("kept = host_memory.retain_freed_memory()", xla=True)
  assert kept == "True" and blocks > 9, blocks  # mapped afresh by XLA's threads' arenas
  kept, blocks = faults("kept = host_memory.retain_freed_memory(one_arena=True)", xla=True)
  assert kept == "True" and blocks < 4, blocks


@glibc_only
def test_too_late_once_jax_started():
  kept, blocks = faults("import jax; jax.devices()\n"
                        "kept = host_memory.retain_freed_memory(one_arena=True)", xla=True)
  assert kept == "False" and blocks > 9, blocks


@glibc_only
def test_programs_keep_freed_memory():
  """`cli.run_absl`, the start of every program, keeps freed memory before JAX starts."""
  kept, blocks = faults("import sys; sys.argv = ['program']; kept = 'run_absl'", xla=False,
                        run="cli.run_absl(main)")
  assert kept == "run_absl" and blocks < 4, blocks


def test_large_train_steps():
  """One arena for the S/2 step of the CPU benchmark (1.16 GB of activations); not for the
  digits default, whose small, fast steps pay for one arena's lock."""
  assert not host_memory.large_train_step(digits.get_config())
  config = imagenet.get_config("S/2")
  config.batch_size, config.model.dtype = 8, "float32"
  assert host_memory.large_train_step(config)
  assert not host_memory.large_train_step(config, num_processes=32)  # a quarter image each
  for key, value in (("model.variant", "Q/2"), ("model.patch_size", 0),
                     ("model.hidden_size", "wide"), ("batch_size", None)):
    bad = config.copy_and_resolve_references()
    section, _, name = key.rpartition(".")
    with bad.unlocked():
      setattr(bad[section] if section else bad, name, value)
    assert not host_memory.large_train_step(bad), key  # reported by the trainer, not here
  model = create_model("S/2")
  assert host_memory.large_activations(model, 1)  # 141 MB
  assert not host_memory.large_activations(model.clone(dtype="bfloat16"), 0.5)  # 35 MB


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", []), ("cuda", ["cuda"]), ("cpu, tpu", ["tpu"]), ("gpu,cpu", ["gpu"])])
def test_jax_platforms_decides_the_accelerators(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.accelerator_plugins() == expected


def test_accelerator_runs_and_opt_out_leave_malloc_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert host_memory.retain_freed_memory(one_arena=True) is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(host_memory.ENV, "0")
  assert host_memory.retain_freed_memory(one_arena=True) is False
