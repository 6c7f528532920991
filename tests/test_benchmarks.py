"""The accelerator benchmark: importable on a bare accelerator image, its table and arguments."""
import json
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
import benchmarks.profile_step, benchmarks.step_variants
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


def test_profile_summary_reads_gpu_kernel_names():
  """A GPU trace names a fusion's kernel `fusion_3` for the HLO's `fusion.3`; library kernels
  (cuBLAS, cuDNN, copies) are no HLO instruction and are grouped by their names."""
  from benchmarks import profile_step
  instructions = {"loop_add_fusion.3": {"shape": "bf16[8,4]", "opcode": "fusion",
                                        "op_name": "jit(f)/jvp(DiT)/add", "fused": "add",
                                        "calls": "", "computation": "main"}}
  events = [{"name": "loop_add_fusion_3", "dur": 2000.0, "device": True},
            {"name": "nvjet_sm90_tst_128x160_NNT", "dur": 6000.0, "device": True},
            {"name": "cudnn_generated_sdpa_sm90_flash_fprop", "dur": 1000.0, "device": True},
            {"name": "memcpy128", "dur": 1000.0, "device": True},
            {"name": "PjitFunction(train_step)", "dur": 9e6, "device": False}]
  report = profile_step.summarize(events, instructions, steps=2, wall_s=0.01, top=5)
  rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3])
          for line in report.splitlines() if line.startswith("| ")}
  assert ("elementwise", "forward", "1.0") in rows, report
  assert ("matmul", "library kernel", "3.0") in rows, report
  assert ("attention (cuDNN kernel)", "library kernel", "0.5") in rows, report
  assert ("copy / transpose", "library kernel", "0.5") in rows, report
  assert "op time per step (all threads): 5 ms" in report  # the host's event is no op
  assert "| `nvjet_sm90_tst_128x160_NNT` | 3.0 |" in report


def test_step_variants_patches_compute_the_same_model():
  """The what-if patches change how the step computes, not what: same params, same outputs."""
  script = """
import jax, jax.numpy as jnp
from benchmarks import step_variants
from dit_jax.models import create_model, init_params
model = create_model("S/8", input_size=16, num_classes=10)
params = init_params(model, jax.random.key(0))
params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
t, y = jnp.array([3.0, 700.0]), jnp.array([1, 2])
before = model.apply({"params": params}, x, t, y)
step_variants.apply_patch("ln_one_pass,split_qkv")
patched = init_params(model, jax.random.key(0))
assert jax.tree.map(jnp.shape, patched) == jax.tree.map(jnp.shape, params)
after = model.apply({"params": params}, x, t, y)
print(float(jnp.abs(after - before).max() / jnp.abs(before).max()))
"""
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.strip()) < 1e-5
  from benchmarks import step_variants
  with pytest.raises(SystemExit, match="unknown 'nope'"):
    step_variants.apply_patch("nope")


def test_step_variants_table_is_relative_to_base():
  from benchmarks import step_variants
  rows = [{"setting": "base", "batch": 64, "images_per_sec": 350.0, "mfu": 0.25,
           "peak_gib": 53.2, "compile_s": 11.0},
          {"setting": "unrolled, 128", "batch": 128, "images_per_sec": 568.4, "mfu": 0.409,
           "peak_gib": 55.0, "compile_s": 36.7},
          {"setting": "x", "error": "over 90 s"}]
  lines = step_variants.format_table(rows).splitlines()
  assert "| unrolled, 128 | 128 | 568.4 | 1.62x | 40.9% | 55.0 | 36.7 |" in lines
  assert lines[-1] == "| x | over 90 s ||||||"
  names = [s.name for s in step_variants.SETTINGS]
  assert names[0] == "base" and len(set(names)) == len(names)


def test_step_variants_runs_the_base_first_and_stops_when_it_fails(monkeypatch, capsys):
  """The base runs first wherever it sits in SETTINGS; a failed base stops the sweep (every
  other setting would fail the same way and cost a device's time); an unknown base is one line."""
  from benchmarks import step_variants
  calls = []

  def fake_run(setting, variant, steps, timeout):
    calls.append(setting.name)
    if setting.name == "unrolled, 128" and fail:
      return {"setting": setting.name, "error": "ImportError: x", "stderr_tail": "Traceback\nx"}
    return {"setting": setting.name, "batch": setting.batch, "images_per_sec": 100.0 + len(calls),
            "mfu": 0.4, "peak_gib": 1.0, "compile_s": 1.0}

  monkeypatch.setattr(step_variants, "run_setting", fake_run)
  only = ["base", "unrolled, 256", "unrolled, 128"]
  argv = ["step_variants", "--base", "unrolled, 128", "--only", *only]
  fail = False
  monkeypatch.setattr(sys, "argv", argv)
  step_variants.main()
  assert calls == ["unrolled, 128", "base", "unrolled, 256"]
  out = capsys.readouterr().out
  assert "| setting | batch | img/s | vs unrolled, 128 |" in out
  assert "| base | 64 | 102.0 | 1.01x |" in out
  calls.clear()
  fail = True
  step_variants.main()
  assert calls == ["unrolled, 128"]
  assert "the base setting failed; nothing else run:\nTraceback\nx" in capsys.readouterr().out
  monkeypatch.setattr(sys, "argv", ["step_variants", "--base", "nope"])
  with pytest.raises(SystemExit, match="--base: unknown 'nope'"):
    step_variants.main()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Convert-format checkpoints of a tiny digits-shaped DiT: one diffusion, one flow."""
  import jax
  from dit_jax import checkpoints
  from dit_jax.diffusion import DiffusionProcess, FlowProcess
  from dit_jax.models import DiT, init_params
  root = tmp_path_factory.mktemp("processes")
  dirs = {}
  for kind, process in (("diffusion", DiffusionProcess()), ("flow", FlowProcess())):
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1,
                num_heads=2, num_classes=10, learn_sigma=process.learn_sigma)
    params = init_params(model, jax.random.key(0))
    # adaLN-Zero outputs zeros at init: perturb every weight so the samples depend on them.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)
    dirs[kind] = checkpoints.save_params(str(root / kind), params, model, process=process)
  return dirs


def test_process_comparison_grades_times_and_counts_each_row(two_processes, tmp_path):
  from benchmarks import process_comparison
  out = tmp_path / "table.json"
  argv = ["--diffusion", two_processes["diffusion"], "--flow", two_processes["flow"],
          "--num_samples", "8", "--batch_size", "8", "--out", str(out), "--rows",
          "diffusion:ddim:3", "flow:ode-heun:5", "flow:sde-euler:4", "flow:ode-dopri5:0"]
  rows = process_comparison.main(argv)
  assert [(r["process"], r["sampler"]) for r in rows] == [
      ("diffusion", "ddim"), ("flow", "ode-heun"), ("flow", "sde-euler"), ("flow", "ode-dopri5")]
  assert [r["nfe"] for r in rows[:3]] == [3, 5, 4]  # as asked: every sampler counts evaluations
  assert rows[3]["nfe"] >= 7 and (rows[3]["nfe"] - 1) % 6 == 0  # Dopri5: 1 + 6 per step
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["frechet_distance"] > 0 and r["seconds"] > 0
  saved = json.loads(out.read_text())
  assert saved["rows"] == rows and saved["table"].count("\n") == 5
  with pytest.raises(SystemExit):  # never overwritten
    process_comparison.main(argv)


@pytest.mark.parametrize("rows,message", [
    (["diffusion:ode-heun:5"], "--rows: 'ode-heun' samples flow processes"),
    (["flow:ddim"], "--rows: 'flow:ddim' is not PROCESS:SAMPLER:STEPS"),
])
def test_process_comparison_refuses_bad_rows_before_sampling(two_processes, rows, message,
                                                             capsys):
  from benchmarks import process_comparison
  with pytest.raises(SystemExit):
    process_comparison.main(["--diffusion", two_processes["diffusion"], "--flow",
                             two_processes["flow"], "--rows", *rows])
  assert message in capsys.readouterr().err
