"""The accelerator benchmark: importable on a bare accelerator image, its table and arguments."""
import subprocess
import sys

import pytest

from benchmarks import accelerator
from conftest import ROOT

# Accelerator images carry jax, flax, optax and numpy, but not the TF stack or ml_collections:
# a script that starts with this fails on importing any of those.
BLOCK_TF_STACK = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {"tensorflow", "tensorflow_datasets", "ml_collections", "clu",
                              "grain", "array_record", "orbax", "torch"}:
      raise ImportError("not on the accelerator image: " + name)
sys.meta_path.insert(0, Block())
"""
BLOCKER = BLOCK_TF_STACK + """
import benchmarks.accelerator, benchmarks.train_throughput, benchmarks.sampling_speed
import benchmarks.profile_step
from benchmarks.train_throughput import measure
print("ok")
"""


def test_benchmarks_import_without_the_tf_stack():
  result = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "ok"


def test_parse_models():
  assert accelerator.parse_models(["S/2:512,256", "XL/2:64"]) == [("S/2", [512, 256]),
                                                                 ("XL/2", [64])]
  with pytest.raises(SystemExit, match="XL/2:256,128"):
    accelerator.parse_models(["XL/2"])


def test_format_table():
  row = {"variant": "XL/2", "batch": 64, "remat": "none", "attention": "cudnn",
         "images_per_sec": 355.5, "mfu": 0.2558, "peak_gib": 53.2, "compile_s": 11.3,
         "sample_img_s": 18.64, "device": "NVIDIA H100 80GB HBM3", "device_count": 1,
         "dtype": "bfloat16", "jax": "0.11.2"}
  table = accelerator.format_table([row, {"variant": "L/2", "error": "no batch of [8] fits"}])
  lines = table.splitlines()
  assert lines[0].startswith("device: 1 x NVIDIA H100 80GB HBM3, bfloat16, jax 0.11.2")
  assert "| DiT-XL/2 | 64 | none | cudnn | 355.5 | 25.6% | 53.2 | 11.3 | 18.6 |" in lines
  assert lines[-1].startswith("| DiT-L/2 | no batch of [8] fits |")


def test_profile_step_groups_the_trace_by_kind_and_pass(tmp_path):
  """A real trace of a small variant's train step, read back: matmuls forward and backward."""
  from benchmarks import profile_step
  report = profile_step.profile("S/8", batch=2, dtype="float32", scan_blocks=True, warmup=1,
                                steps=1, out=tmp_path, top=5, input_size=16)
  assert (tmp_path / "scanned.hlo.txt").exists()
  assert list(tmp_path.glob("scanned/plugins/profile/*/*.xplane.pb"))
  rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2])
          for line in report.splitlines() if line.startswith("| ")}
  assert ("matmul", "forward") in rows and ("matmul", "backward") in rows, report
  assert ("attention matmuls", "forward") in rows, report  # q k^T and p v, apart from Dense
  shares = [float(line.rsplit("|", 2)[1].strip().rstrip("%"))
            for line in report.splitlines() if line.endswith("% |")]
  assert abs(sum(shares) - 100) < 1, shares


def test_hlo_instructions_reads_fusions():
  import jax
  import jax.numpy as jnp
  from benchmarks import profile_step
  f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))))
  text = f.lower(jnp.ones((4, 3)), jnp.ones((2, 4))).compile().as_text()
  instructions = profile_step.hlo_instructions(text)
  kinds = {profile_step.kind_of(i) for i in instructions.values()}
  passes = {profile_step.pass_of(i) for i in instructions.values()}
  assert "matmul" in kinds and "backward" in passes and "forward" in passes
