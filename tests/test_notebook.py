"""notebooks/dit_jax.ipynb: stored without outputs, and executed top to bottom on CPU with short
parameters (nbclient, a real Jupyter kernel), every file in the test's temporary directory.

The executed run trains the digits default for a few steps in two chunks, draws the grid,
imports the tiny official-format fixture and decodes its latents with the tiny VAE fixture, and
runs `python -m dit_jax.sweep` on a sweep of one point whose workdir is the run the notebook
trained: the sweep finds it finished and skips it (training points would add a minute), then
writes the table and the figure from it, which the sweep cell loads. The train cell then runs
once more, as a user rerunning it would: nothing is left to train, the run is graded again.
"""
import ast
import base64
import json

import nbformat
import pytest

from conftest import ROOT, fixture_path
from dit_jax.sweep import results as sweep_results

NOTEBOOK = ROOT / "notebooks" / "dit_jax.ipynb"

# The notebook's training run as a sweep of one point (`seed=0`, the workdir name the sweep gives
# it): the same config as the notebook's train cell makes of configs/digits.py.
SWEEP_CONFIG = """
from configs import digits


def get_config(arg=""):
  config = digits.get_config()
  config.num_steps, config.log_every_steps, config.sample.every_steps = {steps}, {log_every}, 0
  config.eval.num_samples = {grade}
  return config


def get_hyper(h):
  return h.sweep("config.seed", [0])
"""

# What the test's last cell reports from the kernel's state after the notebook ran.
SUMMARY = """
import json as _json
print("SUMMARY " + _json.dumps({
    "repo_dir": REPO_DIR, "cwd": os.getcwd(), "result": result, "grid": list(grid.shape),
    "pixels": list(pixels.shape), "out": list(out.shape), "row": list(row.shape),
    "nfe": int(nfe), "params": count_params(model), "loss_terms": sorted(terms),
    "latents": list(latents.shape), "pictures": list(pictures.shape),
    "jax_cache": sorted(os.listdir(JAX_CACHE_DIR)),
}))
"""


def load() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
  [found] = [c for c in nb.cells if c.get("id") == cell_id]
  return found


def parameters(nb: nbformat.NotebookNode) -> dict:
  """The parameters cell's names and default values, in order."""
  [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  return {node.targets[0].id: ast.literal_eval(node.value)
          for node in ast.parse(params.source).body}


def parameter_names(nb: nbformat.NotebookNode) -> list[str]:
  return list(parameters(nb))


def test_the_notebook_is_stored_without_outputs_and_has_one_parameters_cell():
  nb = load()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert len(code) >= 10
  assert all(c.outputs == [] and c.execution_count is None for c in code), (
      "clear the notebook's outputs before committing it")
  assert parameter_names(nb)[:3] == ["REPO_URL", "WORKDIR", "TRAIN_STEPS"]
  assert nb.cells.index(cell(nb, "parameters")) < nb.cells.index(cell(nb, "install"))


def inject(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
  """papermill's way: a cell tagged `injected-parameters` after the `parameters` cell."""
  unknown = set(values) - set(parameter_names(nb))
  assert not unknown, f"not parameters of the notebook: {unknown}"
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  injected = nbformat.v4.new_code_cell(source, id="injected-parameters")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(nb.cells.index(cell(nb, "parameters")) + 1, injected)
  return nb


def outputs_text(c: nbformat.NotebookNode) -> str:
  return "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")


def pngs(c: nbformat.NotebookNode) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for o in c.outputs
          if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel

  # The kernel and Jupyter's client keep their files (connection file, history, settings) in
  # the temporary directory, and the kernel runs on CPU like the rest of the suite.
  for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
    (tmp_path / "jupyter" / name.lower()).mkdir(parents=True)
    monkeypatch.setenv(name, str(tmp_path / "jupyter" / name.lower()))
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  steps, chunk, log_every, grade = 40, 20, 5, 20
  sweep_config = tmp_path / "sweep_config.py"
  sweep_config.write_text(SWEEP_CONFIG.format(steps=steps, log_every=log_every, grade=grade))
  sweep_dir = tmp_path / "sweep"
  workdir = sweep_dir / "seed=0"
  nb = inject(load(), WORKDIR=str(workdir), TRAIN_STEPS=steps, CHUNK=chunk, LOG_EVERY=log_every,
              GRADE_SAMPLES=grade, JAX_CACHE_DIR=str(tmp_path / "jax_cache"),
              SWEEP_DIR=str(sweep_dir), RUN_SWEEP=True, SWEEP_CONFIG=str(sweep_config),
              OFFICIAL_PT=str(fixture_path("dit_reference", "tiny_dit.pt")),
              CONVERT_ARGS=("--model DiT-S/2 --depth 1 --hidden-size 64 --num-heads 4 "
                            "--image-size 64 --num-classes 10"),
              OFFICIAL_OUT=str(tmp_path / "official"),
              VAE_DIR=str(fixture_path("vae_reference", "tiny_vae")))
  # Running the train cell again: the run is finished, so it trains nothing and grades again.
  nb.cells.append(nbformat.v4.new_code_cell(cell(nb, "train").source, id="train-again"))
  nb.cells.append(nbformat.v4.new_code_cell(SUMMARY, id="test-summary"))
  defaults = [ROOT / parameters(load())[name]
              for name in ("WORKDIR", "JAX_CACHE_DIR", "SWEEP_DIR", "OFFICIAL_OUT")]
  existed = {path: path.exists() for path in defaults}
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  [line] = [l for l in outputs_text(nb.cells[-1]).splitlines() if l.startswith("SUMMARY ")]
  summary = json.loads(line[len("SUMMARY "):])

  # Setup: the checkout itself, nothing cloned or installed.
  assert outputs_text(cell(nb, "install")) == f"Using the checkout at {ROOT}; nothing installed.\n"
  assert summary["repo_dir"] == summary["cwd"] == str(ROOT)
  assert "cpu: 1 devices" in outputs_text(cell(nb, "mesh"))
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in outputs_text(cell(nb, "mesh"))

  # Training: two chunks, the plot redrawn in place, every logged step once, the loss fell.
  train = cell(nb, "train")
  chunk_lines = [l for l in outputs_text(train).splitlines() if l.startswith("step ")]
  assert [l.split(":")[0] for l in chunk_lines] == [f"step {chunk:5d}", f"step {steps:5d}"]
  [figure] = pngs(train)  # the display handle's last update, not a figure per chunk
  assert figure.startswith(b"\x89PNG")
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(log_every, steps + 1, log_every))
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
  [grade_row] = [r for r in rows if "eval/digits_accuracy" in r]  # the second grade replaced it
  assert grade_row["step"] == steps and grade_row["eval/num_samples"] == grade
  result = summary["result"]  # the second run's: a grade, no training step
  assert result["step"] == steps and "loss" not in result
  assert result["eval/digits_accuracy"] == grade_row["eval/digits_accuracy"]
  assert f"accuracy {grade_row['eval/digits_accuracy']:.1%}" in outputs_text(train)
  assert (workdir / "checkpoints" / str(steps)).is_dir()
  again = outputs_text(cell(nb, "train-again")).splitlines()
  assert again[0].startswith(f"step {steps:5d}: 0 steps in ")
  assert len(pngs(cell(nb, "train-again"))) == 1
  assert again[1] == [l for l in outputs_text(train).splitlines() if "classifier" in l][0]
  assert any(name.startswith("jit_train_step") for name in summary["jax_cache"])

  # The grid: 10 rows of 8 samples, 8x8 digits magnified 8x, 1 pixel between cells.
  assert summary["pixels"] == [80, 8, 8, 3]
  assert summary["grid"] == [10 * (64 + 1) + 1, 8 * (64 + 1) + 1, 3]
  assert len(pngs(cell(nb, "grid"))) == 1

  # The API cells.
  assert "DiT-XL/2 at 256 px: 674,834,720 parameters, 118.95 Gflops" in outputs_text(
      cell(nb, "model"))
  assert summary["out"] == [4, 8, 8, 2]  # learned sigma: twice the input's channel
  assert "the checkpoint's: True" in outputs_text(cell(nb, "process"))
  assert "flow matching, linear path, velocity prediction | FlowProcess(): True" in outputs_text(
      cell(nb, "process"))
  assert summary["loss_terms"] == ["loss", "mse", "vb"]
  assert summary["row"] == [10, 8, 8, 1] and summary["nfe"] == 20
  assert "refused: sampler: 'ode-heun' samples flow processes" in outputs_text(cell(nb, "sampler"))

  # Official weights: the fixture imported once, sampled, decoded by the tiny VAE (2x upsampling).
  assert (tmp_path / "official").is_dir()
  assert "-m dit_jax.convert --torch" in outputs_text(cell(nb, "official"))
  assert summary["latents"] == [4, 8, 8, 4] and summary["pictures"] == [4, 16, 16, 3]

  # The sweep: run for real on the notebook's finished run, its table and figure loaded.
  sweep = cell(nb, "sweep")
  assert "[1/1] seed=0: finished earlier; skipped" in outputs_text(sweep)
  saved = json.loads((sweep_dir / "results.json").read_text())
  [point] = saved["points"]
  assert (point["name"], point["status"], point["step"]) == ("seed=0", "finished", steps)
  assert point["workdir"] == str(workdir) and point["params"] == summary["params"]
  assert point["final_loss"] == pytest.approx(train_rows[-1]["train/loss"])  # the last tenth
  assert point["digits_accuracy"] == grade_row["eval/digits_accuracy"]
  assert f"{sweep_config}: 1 of 1 points finished" in outputs_text(sweep)
  [table] = [o.data["text/markdown"] for o in sweep.outputs
             if o.output_type == "display_data" and "text/markdown" in o.data]
  assert table == sweep_results.markdown_table(saved["points"], saved["swept"])
  assert table.splitlines()[2].startswith(f"| 0 | {summary['params']:,} | ")  # seed 0's row
  assert pngs(sweep) == [(sweep_dir / "scaling.png").read_bytes()]
  # The notebook's default paths in the checkout were left alone (every path was injected).
  assert {path: path.exists() for path in defaults} == existed
