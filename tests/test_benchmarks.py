"""The accelerator benchmark: importable on a bare accelerator image, its table and arguments."""
import subprocess
import sys

import pytest

from benchmarks import accelerator
from conftest import ROOT

# Accelerator images carry jax, flax, optax and numpy, but not the TF stack or ml_collections.
BLOCKER = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {"tensorflow", "tensorflow_datasets", "ml_collections", "clu",
                              "grain", "array_record", "orbax", "torch"}:
      raise ImportError("not on the accelerator image: " + name)
sys.meta_path.insert(0, Block())
import benchmarks.accelerator, benchmarks.train_throughput, benchmarks.sampling_speed
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
