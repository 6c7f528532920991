"""The programs keep the host memory XLA frees, so a CPU step does not fault in fresh pages."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dit_jax import host_memory

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
PAGES = 64 * 2**20 // 4096  # a 64 MB output: above the 64 MB heap of a thread's glibc arena

# Calls a jitted function whose 64 MB output is dropped after each call (as a train step's
# temporary buffer is freed) and prints whether memory was kept and the page faults per call.
SCRIPT = textwrap.dedent("""
    import resource, sys
    from dit_jax import host_memory
    kept = {call}
    import jax, jax.numpy as jnp
    x = jnp.zeros(({rows}, 1024), jnp.float32)
    add = jax.jit(lambda x: x + 1)
    for _ in range(10):  # the heap grows to hold the outputs alive at once
      add(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      add(x).block_until_ready()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(kept, (after - before) / 5)
""")


def run_script(call: str, **env: str) -> tuple[str, float]:
  script = SCRIPT.format(call=call, rows=PAGES * 4096 // 4 // 1024)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  kept, faults = result.stdout.split()
  return kept, float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
  kept, faults = run_script("host_memory.retain_freed_memory()")
  assert kept == "True"
  assert faults < PAGES / 20, faults
  # The same calls without it fault in every page of the output again (what the fix is for).
  kept, faults = run_script("host_memory.retain_freed_memory()", DIT_RETAIN_HOST_MEMORY="0")
  assert kept == "False"
  assert faults > PAGES / 2, faults


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_too_late_once_jax_started():
  kept, faults = run_script("(jax_started := __import__('jax').devices()) and "
                            "host_memory.retain_freed_memory()")
  assert kept == "False"
  assert faults > PAGES / 2, faults


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_programs_keep_freed_memory_before_jax_starts():
  """`cli.run_absl`, the start of every program, applies it (the script's main does the work)."""
  script = textwrap.dedent("""
      import sys
      from dit_jax import cli, host_memory
      def main(argv):
        import jax, resource
        x = jax.numpy.zeros(({rows}, 1024))
        add = jax.jit(lambda x: x + 1)
        for _ in range(10):
          add(x).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
          add(x).block_until_ready()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
      sys.argv = ["program"]
      cli.run_absl(main)
  """).format(rows=PAGES * 4096 // 4 // 1024)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert float(result.stdout) < PAGES / 20, result.stdout


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", []), ("cuda", ["cuda"]), ("cpu, tpu", ["tpu"]), ("gpu,cpu", ["gpu"])])
def test_jax_platforms_decides_the_accelerators(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.accelerator_plugins() == expected


def test_accelerator_runs_and_opt_out_leave_malloc_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert host_memory.retain_freed_memory() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(host_memory.ENV, "0")
  assert host_memory.retain_freed_memory() is False
