"""dit_jax.sweep: the `h` grid functions exactly, the plan of configs/digits_scaling.py and its
printed train.py commands parsed back into the same configs, one-line refusals before anything
is written, the table read from workdirs, the figure, and a real sweep of three tiny points on
digits (the table, the plot, a re-run that trains nothing)."""
import csv
import dataclasses
import io
import json
import logging
import math
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from dit_jax import cli
from dit_jax.models import build_model, count_params, gflops
from dit_jax.sweep import __main__ as sweep_main
from dit_jax.sweep import hyper, plan, plots, results, runner
from dit_jax.train.workdir_lock import WorkdirLock
from train_utils import env_with_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALING = "configs/digits_scaling.py"
SIZES = [(2, 32, 2), (3, 64, 4), (4, 96, 6)]

# Three tiny points on digits: two widths at patch 4, the wider one at patch 2 too; 4 steps,
# graded on 10 samples of 2 sampling steps (the grade's values are meaningless, its path real).
# The base model is the first point's (width 16, patch 4): the sweeps below that do not vary it
# train the same programs, which their trainers load from the compilation cache
# (`env_with_devices`).
TINY_CONFIG = """
from configs import digits


def get_config(arg=""):
  config = digits.get_config()
  config.model.depth, config.model.hidden_size, config.model.num_heads = 1, 16, 2
  config.model.patch_size = 4
  config.batch_size, config.num_steps, config.log_every_steps = 16, 4, 1
  config.checkpoint.every_steps, config.checkpoint.async_save = 4, False
  config.sample.every_steps, config.sample.num_steps = 0, 2
  config.eval.num_samples, config.eval.batch_size = 10, 10
  config.data.num_threads, config.tensorboard = 1, False
  return config


def get_hyper(h):
  return h.zipit([h.sweep("config.model.hidden_size", [16, 32, 32]),
                  h.sweep("config.model.patch_size", [4, 4, 2])])
"""


def write_config(tmp_path, text: str, name: str = "sweep_config.py") -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def config_with_hyper(tmp_path, hyper_text: str) -> str:
  """TINY_CONFIG with `get_hyper(h)` returning `hyper_text`, written as a config file."""
  return write_config(tmp_path, TINY_CONFIG.split("def get_hyper")[0]
                      + f"def get_hyper(h):\n  return {hyper_text}\n")


# --- h: the grid functions ---------------------------------------------------------------------

def test_sweep_product_zipit_chainit_fixed_expand_exactly():
  assert hyper.sweep("config.a", [1, 2]) == [{"config.a": 1}, {"config.a": 2}]
  assert hyper.product([hyper.sweep("config.a", [1, 2]), hyper.sweep("config.b", ["x", "y"])]) == [
      {"config.a": 1, "config.b": "x"}, {"config.a": 1, "config.b": "y"},
      {"config.a": 2, "config.b": "x"}, {"config.a": 2, "config.b": "y"}]
  assert hyper.zipit([hyper.sweep("config.a", [1, 2]), hyper.sweep("config.b", [3, 4])]) == [
      {"config.a": 1, "config.b": 3}, {"config.a": 2, "config.b": 4}]
  assert hyper.chainit([hyper.sweep("config.a", [1]), hyper.sweep("config.b", [2])]) == [
      {"config.a": 1}, {"config.b": 2}]
  assert hyper.zipit([hyper.sweep("config.a", [1, 2]), hyper.fixed("config.b", 0, 2)]) == [
      {"config.a": 1, "config.b": 0}, {"config.a": 2, "config.b": 0}]
  nested = hyper.product([hyper.zipit([hyper.sweep("config.d", [2, 3]),
                                       hyper.sweep("config.w", [32, 64])]),
                          hyper.sweep("config.p", [4, 1])])
  assert nested == [{"config.d": 2, "config.w": 32, "config.p": 4},
                    {"config.d": 2, "config.w": 32, "config.p": 1},
                    {"config.d": 3, "config.w": 64, "config.p": 4},
                    {"config.d": 3, "config.w": 64, "config.p": 1}]


@pytest.mark.parametrize("make,message", [
    (lambda: hyper.zipit([hyper.sweep("config.a", [1, 2]), hyper.sweep("config.b", [1])]),
     r"h.zipit: the sweeps have different lengths \[2, 1\]"),
    (lambda: hyper.product([hyper.sweep("config.a", [1]), hyper.sweep("config.a", [2])]),
     "config.a is set by two of the combined sweeps"),
    (lambda: hyper.sweep("model.depth", [1]), "a sweep name must be 'config.' and a config key"),
    (lambda: hyper.sweep("config.a", []), r"h.sweep\('config.a', ...\): no values"),
    (lambda: hyper.product([]), r"h.product\(\[\]\): no sweeps"),
])
def test_malformed_grids_are_refused(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# --- the plan and --print_commands -------------------------------------------------------------

def expected_scaling_points() -> list[dict]:
  return [{"model.depth": d, "model.hidden_size": w, "model.num_heads": n, "model.patch_size": p}
          for d, w, n in SIZES for p in (4, 2, 1)]


def parse_command(line: str):
  """A printed command -> (config, workdir), parsed as train.py's flags parse it."""
  tokens = shlex.split(line)
  assert tokens[:2] == [cli.python_command(), "train.py"], tokens
  argv = ["train.py", *tokens[2:]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  return values.config, values.workdir


def test_print_commands_parse_back_into_the_points_configs(monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(ROOT)  # the commands name train.py and the config as seen from here
  workdir = tmp_path / "scaling"
  sweep_main.main(["--config", SCALING, "--workdir", str(workdir), "--print_commands",
                   "--config.seed=7"])
  lines = capsys.readouterr().out.strip().splitlines()
  from configs import digits_scaling  # pylint: disable=import-outside-toplevel
  expected = expected_scaling_points()
  assert len(lines) == 9
  for line, overrides in zip(lines, expected):
    config, point_workdir = parse_command(line)
    want = digits_scaling.get_config()
    want.seed = 7
    for key, value in overrides.items():
      section, leaf = key.split(".")
      want[section][leaf] = value
    assert config.to_dict() == want.to_dict()
    name = ",".join(f"{k.split('.')[1]}={v}" for k, v in overrides.items())
    assert line.split()[2:6] == ["--config", SCALING, "--workdir", str(workdir / name)]
    assert point_workdir == str(workdir / name)
  assert not workdir.exists()  # printing writes nothing


def test_plan_names_points_readably_and_distinctly():
  labels = plan.key_labels(["model.variant", "optimizer.learning_rate"])
  assert labels == {"model.variant": "variant", "optimizer.learning_rate": "learning_rate"}
  assert plan.key_labels(["model.dtype", "vae.dtype"]) == {"model.dtype": "model.dtype",
                                                           "vae.dtype": "vae.dtype"}
  safe = plan.point_name({"optimizer.learning_rate": 0.001}, labels)
  assert safe == "learning_rate=0.001"
  slash = plan.point_name({"model.variant": "S/2"}, labels)
  dash = plan.point_name({"model.variant": "S-2"}, labels)
  assert dash == "variant=S-2" and slash.startswith("variant=S-2-") and len(slash) == 18
  assert slash == plan.point_name({"model.variant": "S/2"}, labels)  # stable


def test_scaling_plan_has_the_papers_grid_with_patch_sizes_1_2_4(tmp_path):
  the_plan = plan.make_plan(str(ROOT / SCALING), str(tmp_path / "w"))
  assert [p.overrides for p in the_plan.points] == expected_scaling_points()
  models = [build_model(p.config.model) for p in the_plan.points]
  assert [(m.depth, m.hidden_size, m.patch_size) for m in models] == [
      (d, w, p) for d, w, _ in SIZES for p in (4, 2, 1)]
  assert {(m.input_size // m.patch_size) ** 2 for m in models} == {4, 16, 64}
  assert not (tmp_path / "w").exists()  # planning writes nothing


# --- one-line refusals before anything is written ----------------------------------------------

def run_main_error(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    sweep_main.main(argv)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize("hyper_text,message", [
    ('h.sweep("config.model.depthh", [1, 2])',
     "error: get_hyper: config: no key 'model.depthh'; did you mean 'model.depth'?"),
    ('h.sweep("config.model.depth", ["three"])', "error: get_hyper: config.model.depth='three': "),
    ('h.zipit([h.sweep("config.model.depth", [1, 2]), h.sweep("config.seed", [1])])',
     r"error: get_hyper: h.zipit: the sweeps have different lengths [2, 1]"),
    ('h.sweep("config.model.depth", [1, 1])',
     "error: get_hyper: two points have the same overrides (depth=1)"),
    ('h.sweep("config.data.data_dir", [None])',
     "error: get_hyper: config.data.data_dir=None: a train.py command line cannot set None"),
])
def test_bad_grids_are_one_line_errors_before_any_write(tmp_path, capsys, hyper_text, message):
  config = config_with_hyper(tmp_path, hyper_text)
  line = run_main_error(capsys, ["--config", config, "--workdir", str(tmp_path / "w")])
  assert line.startswith(message), line
  assert not (tmp_path / "w").exists()


def test_a_config_without_get_hyper_and_bad_flags_are_one_line_errors(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  digits = str(ROOT / "configs/digits.py")
  line = run_main_error(capsys, ["--config", digits, "--workdir", workdir])
  assert line == (f"error: --config: {digits} defines no get_hyper(h), the grid of a sweep "
                  "(see configs/digits_scaling.py)")
  config = write_config(tmp_path, TINY_CONFIG)
  line = run_main_error(capsys, ["--config", config, "--workdir", workdir, "--parallel=0"])
  assert line == "error: flag --parallel=0: 0 is not a positive integer"
  line = run_main_error(capsys, ["--config", config, "--workdir", workdir,
                                 "--config.model.patch_size=2"])
  assert line == ("error: --config.model.patch_size: the sweep varies this key (get_hyper); "
                  "drop the flag or the sweep")
  line = run_main_error(capsys, ["--config", config, "--workdir", workdir, "--config.num_step=3"])
  assert line == "error: config: no key 'num_step'; did you mean 'num_steps'?"
  assert not (tmp_path / "w").exists()


def test_a_changed_plan_moves_the_earlier_plans_files_aside(tmp_path):
  config, workdir = write_config(tmp_path, TINY_CONFIG), tmp_path / "w"
  old = plan.make_plan(config, str(workdir))
  runner.write_plan(old)
  (workdir / results.CSV_FILE).write_text("old table\n")
  runner.write_plan(old)  # the same plan: nothing moves
  assert not (workdir / runner.ARCHIVE_DIR).exists()
  new = plan.make_plan(config, str(workdir), {"seed": 3})
  runner.write_plan(new)
  [archive] = list((workdir / runner.ARCHIVE_DIR).iterdir())
  assert json.loads((archive / "sweep.json").read_text()) == old.to_json()
  assert (archive / results.CSV_FILE).read_text() == "old table\n"
  assert not (workdir / results.CSV_FILE).exists()
  saved = json.loads((workdir / "sweep.json").read_text())
  assert saved == new.to_json() and saved["overrides"] == {"seed": 3}
  assert all(p["command"].endswith(f"--config.seed=3 --config.model.hidden_size={w} "
                                   f"--config.model.patch_size={s}")
             for p, (w, s) in zip(saved["points"], [(16, 4), (32, 4), (32, 2)]))


def test_a_second_sweep_on_a_workdir_in_use_is_refused(tmp_path, capsys):
  config, workdir = write_config(tmp_path, TINY_CONFIG), tmp_path / "w"
  lock = WorkdirLock(str(workdir))  # as a running sweep holds it
  try:
    line = run_main_error(capsys, ["--config", config, "--workdir", str(workdir)])
  finally:
    lock.release()
  assert line.startswith(f"error: workdir: {workdir} is in use by another run (host "), line
  assert sorted(p.name for p in workdir.iterdir()) == ["run.lock"]


# --- the table from workdirs, the figure -------------------------------------------------------

def fake_run(workdir: pathlib.Path, steps: list[int], rows: list[dict]) -> None:
  """A workdir as the trainer leaves it: finished checkpoint folders and metrics.jsonl."""
  for step in steps:
    (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_rows_read_the_trainers_files(tmp_path):
  config = write_config(tmp_path, TINY_CONFIG.replace("16, 4, 1", "16, 40, 1"))  # 40 steps
  the_plan = plan.make_plan(config, str(tmp_path / "w"))
  first, second, third = the_plan.points
  train = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 41)]
  fake_run(pathlib.Path(first.workdir), [20, 40], train + [
      {"step": 40, "eval/digits_accuracy": 0.75, "eval/digits_frechet_distance": 3.5,
       "eval/num_samples": 10.0}])
  fake_run(pathlib.Path(second.workdir), [20], train[:20])
  (tmp_path / "w" / results.TIMINGS_FILE).write_text(
      json.dumps({"name": first.name, "seconds": 10.0, "returncode": 0}) + "\n"
      + json.dumps({"name": first.name, "seconds": 2.5, "returncode": 0}) + "\n"
      + json.dumps({"name": third.name, "seconds": 1.0, "returncode": 1}) + "\n")
  rows = results.collect(the_plan)
  assert [r["status"] for r in rows] == ["finished", "incomplete", "failed"]
  assert [r["step"] for r in rows] == [40, 20, None]
  row = rows[0]
  model = build_model(first.config.model)
  assert row["params"] == count_params(model) and row["gflops"] == gflops(model)
  assert row["train_gflops"] == pytest.approx(row["gflops"] * 16 * 40 * 3)
  # The last tenth of 40 steps: the rows of steps 37..40.
  assert row["final_loss"] == pytest.approx(np.mean([1 / 37, 1 / 38, 1 / 39, 1 / 40]))
  assert (row["digits_accuracy"], row["digits_frechet_distance"], row["eval_samples"]) == (
      0.75, 3.5, 10)
  assert row["train_seconds"] == 12.5 and rows[1]["train_seconds"] is None
  assert results.is_finished(first) and not results.is_finished(second)
  # A checkpoint of the last step without its grade is not finished: the trainer grades it.
  fake_run(pathlib.Path(tmp_path / "w" / third.name), [40], train)
  assert not results.is_finished(third)
  csv_path, json_path = results.write(the_plan, rows)
  table = list(csv.DictReader(io.StringIO(pathlib.Path(csv_path).read_text())))
  assert [t["name"] for t in table] == [p.name for p in the_plan.points]
  assert float(table[0]["digits_accuracy"]) == 0.75 and table[1]["digits_accuracy"] == ""
  saved = json.loads(pathlib.Path(json_path).read_text())
  assert saved["swept"] == ["model.hidden_size", "model.patch_size"]
  assert saved["points"][0]["final_loss"] == pytest.approx(row["final_loss"])


def test_the_markdown_table_formats_each_column():
  rows = [{"model.patch_size": 1, "params": 723362, "gflops": 0.03278, "train_gflops": 3776.3,
           "final_loss": 0.11741, "digits_accuracy": 0.588, "digits_frechet_distance": 3.8312,
           "train_seconds": 350.2},
          {"model.patch_size": 4, "params": 51168, "gflops": 0.0001395, "train_gflops": 16.07,
           "final_loss": None, "train_seconds": None}]
  assert results.markdown_table(rows, ["model.patch_size"]).splitlines() == [
      "| model.patch_size | params | Gflops | train compute (Gflops) | final loss | "
      "Fréchet distance | accuracy | time |",
      "|---|---|---|---|---|---|---|---|",
      "| 1 | 723,362 | 0.0328 | 3,776 | 0.1174 | 3.83 | 58.8% | 5m50s |",
      "| 4 | 51,168 | 0.00014 | 16.1 | - | - | - | - |"]


def test_the_figure_has_a_row_per_quality_metric():
  rows = [{"status": "finished", "depth": 1, "hidden_size": w, "patch_size": p, "params": w,
           "gflops": g, "train_gflops": 100 * g, "digits_accuracy": a,
           "digits_frechet_distance": f}
          for w, p, g, a, f in [(16, 4, 1.0, 0.5, 9.0), (32, 4, 2.0, 0.6, 7.0),
                                (32, 2, 8.0, 0.8, 4.0)]]
  rows.append({**rows[0], "status": "failed"})
  png = plots.figure_png(rows, ["model.hidden_size", "model.patch_size"])
  image = Image.open(io.BytesIO(png))
  assert image.size == (900, 684)  # 10 x (2 metrics x 3.8) inches at 90 dpi
  with_loss = plots.figure_png([{**r, "final_loss": 0.1} for r in rows], [])
  assert Image.open(io.BytesIO(with_loss)).size == (900, 1026)  # and a row for the loss
  assert plots.size_label({**rows[1], "optimizer.learning_rate": 0.001},
                          ["model.hidden_size", "optimizer.learning_rate"]) == (
      "depth 1, width 32, learning_rate=0.001")
  assert plots.figure_png([{**rows[0], "digits_accuracy": None,
                            "digits_frechet_distance": None}], []) is None


# --- a real sweep ------------------------------------------------------------------------------

def sweep_command(config: str, workdir) -> list[str]:
  return [sys.executable, "-m", "dit_jax.sweep", "--config", config, "--workdir", str(workdir)]


def files_with_mtimes(folder: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
          if p.is_file()}


@pytest.mark.slow
def test_a_sweep_of_three_tiny_points_tables_plots_and_skips_them_when_rerun(tmp_path, caplog):
  config, workdir = write_config(tmp_path, TINY_CONFIG), tmp_path / "sweep"
  first = subprocess.run(sweep_command(config, workdir) + ["--parallel=2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env_with_devices(1))
  assert first.returncode == 0, first.stderr[-3000:]
  saved = json.loads((workdir / "results.json").read_text())
  rows = saved["points"]
  assert [r["name"] for r in rows] == [
      "hidden_size=16,patch_size=4", "hidden_size=32,patch_size=4", "hidden_size=32,patch_size=2"]
  points = plan.make_plan(config, str(workdir)).points
  for row, point, (width, patch) in zip(rows, points, [(16, 4), (32, 4), (32, 2)]):
    model = build_model(point.config.model)
    assert row["status"] == "finished" and row["step"] == 4
    tokens = (8 // patch) ** 2
    assert (row["hidden_size"], row["patch_size"], row["tokens"]) == (width, patch, tokens)
    assert row["params"] == count_params(model)
    assert row["gflops"] == pytest.approx(gflops(model), rel=1e-6)
    assert row["train_gflops"] == pytest.approx(row["gflops"] * 16 * 4 * 3)
    losses = [r["train/loss"] for r in map(json.loads, (workdir / row["name"] / "metrics.jsonl")
                                           .read_text().splitlines()) if "train/loss" in r]
    assert len(losses) == 4 and row["final_loss"] == pytest.approx(losses[-1])  # 4 steps: 1 row
    assert 0.05 < row["final_loss"] < 3.0
    assert 0.0 <= row["digits_accuracy"] <= 1.0 and row["eval_samples"] == 10
    assert math.isfinite(row["digits_frechet_distance"]) and row["digits_frechet_distance"] > 0
    assert row["train_seconds"] > 0
  assert rows[0]["params"] < rows[1]["params"] and rows[1]["gflops"] < rows[2]["gflops"]
  table = list(csv.DictReader(io.StringIO((workdir / "results.csv").read_text())))
  assert [float(t["gflops"]) for t in table] == pytest.approx([r["gflops"] for r in rows])
  assert Image.open(workdir / "scaling.png").size == (900, 1026)  # 2 quality rows, the loss
  plan_json = json.loads((workdir / "sweep.json").read_text())
  assert [p["overrides"] for p in plan_json["points"]] == [
      {"model.hidden_size": 16, "model.patch_size": 4},
      {"model.hidden_size": 32, "model.patch_size": 4},
      {"model.hidden_size": 32, "model.patch_size": 2}]
  assert "| 32 | 2 |" in first.stdout  # the table printed at the end

  before = files_with_mtimes(workdir)
  caplog.set_level(logging.INFO)
  sweep_main.main(sweep_command(config, workdir)[3:])  # the same command, in this process
  assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.getMessage().startswith("[")
          ] == ["finished earlier; skipped"] * 3
  after = files_with_mtimes(workdir)
  untouched = {k: v for k, v in before.items()
               if k.split("/")[0] in {r["name"] for r in rows} or k.startswith("logs/")
               or k == results.TIMINGS_FILE}
  assert untouched and all(after[k] == v for k, v in untouched.items())  # no run, no write
  assert json.loads((workdir / "results.json").read_text()) == saved


@pytest.mark.slow
def test_sigterm_stops_the_running_points_at_a_checkpoint(tmp_path):
  long_run = (TINY_CONFIG.split("def get_hyper")[0].replace("16, 4, 1", "16, 100_000, 50")
              .replace("async_save = 4,", "async_save = 50,"))
  config = write_config(tmp_path,
                        long_run + "def get_hyper(h):\n  return h.sweep('config.seed', [0])\n")
  workdir = tmp_path / "sweep"
  point = workdir / "seed=0"
  proc = subprocess.Popen(sweep_command(config, workdir), cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, env=env_with_devices(1))
  deadline = time.time() + 240
  while not list((point / "checkpoints").glob("*/_CHECKPOINT_METADATA")):
    assert proc.poll() is None and time.time() < deadline, "no checkpoint came"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopping the running points (they checkpoint)" in err
  assert "[1/1] seed=0: stopped at step " in err and "rerun the same command to resume" in err
  log = (workdir / "logs" / "seed=0.log").read_text()
  assert "SIGTERM: checkpointing step" in log
  [row] = json.loads((workdir / "results.json").read_text())["points"]
  assert row["status"] == "incomplete" and 50 <= row["step"] < 100_000
  assert (point / "run.lock").read_text() == ""  # the trainer ended and released its workdir


@pytest.mark.slow
def test_a_failed_point_is_one_line_naming_it_and_the_others_are_tabled(tmp_path, capsys,
                                                                        monkeypatch):
  # The trainer refuses the second point when it opens the data (a folder dataset without its
  # folder): the sweep cannot know that from the config alone, so the point runs and fails,
  # while the first trains and gets its row of the table and the figure.
  config = config_with_hyper(tmp_path, "h.sweep('config.data.name', ['digits', 'folder'])")
  workdir = tmp_path / "sweep"
  for key, value in env_with_devices(1).items():  # the trainers inherit this process's environment
    monkeypatch.setenv(key, value)
  line = run_main_error(capsys, ["--config", config, "--workdir", str(workdir)])
  log = workdir / "logs" / "name=folder.log"
  assert line == ("error: 1 of 2 points failed: name=folder: exit 1: error: config.data.name="
                  "'folder' needs config.data.folder (the image folder) "
                  f"(log: {log}); rerun the same command to retry them")
  good, bad = json.loads((workdir / "results.json").read_text())["points"]
  assert good["status"] == "finished" and good["step"] == 4 and good["params"] > 0
  assert bad["status"] == "failed" and bad["step"] is None and bad["final_loss"] is None
  assert (workdir / "results.csv").exists() and (workdir / "scaling.png").exists()
  timings = results.read_timings(str(workdir))
  assert [(t["name"], t["returncode"]) for t in timings] == [("name=digits", 0),
                                                            ("name=folder", 1)]


def test_an_untrainable_point_is_refused_before_any_training(tmp_path, capsys):
  config = config_with_hyper(tmp_path, "h.sweep('config.model.num_heads', [2, 3])")
  workdir = tmp_path / "w"
  line = run_main_error(capsys, ["--config", config, "--workdir", str(workdir)])
  assert line == ("error: get_hyper: point num_heads=3: config.model: hidden_size: 16 is not "
                  "divisible by num_heads=3; no point was trained"), line
  line = run_main_error(capsys, ["--config", config, "--workdir", str(workdir),
                                 "--print_commands"])
  assert line.startswith("error: get_hyper: point num_heads=3: "), line
  assert not workdir.exists()
  config = config_with_hyper(tmp_path, "h.sweep('config.batch_size', [16, 0])")
  line = run_main_error(capsys, ["--config", config, "--workdir", str(workdir)])
  assert line == ("error: get_hyper: point batch_size=0: config.batch_size: must be positive, "
                  "got 0; no point was trained"), line
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
  config, afile = write_config(tmp_path, TINY_CONFIG), tmp_path / "afile"
  afile.write_text("mine")
  line = run_main_error(capsys, ["--config", config, "--workdir", str(afile)])
  assert line == f"error: --workdir: {afile} is a file, not a directory"
  assert afile.read_text() == "mine"


def test_the_table_keeps_a_point_whose_model_cannot_be_built(tmp_path):
  the_plan = plan.make_plan(write_config(tmp_path, TINY_CONFIG), str(tmp_path / "w"))
  first, second, third = the_plan.points
  fake_run(pathlib.Path(first.workdir), [4], [{"step": s, "train/loss": 1.0} for s in (1, 4)]
           + [{"step": 4, "eval/digits_accuracy": 0.5, "eval/digits_frechet_distance": 2.0}])
  bad_config = second.config.copy_and_resolve_references()
  with bad_config.unlocked():
    bad_config.model.num_heads = 3  # as a plan written before points were checked
  bad = dataclasses.replace(second, config=bad_config)
  the_plan = dataclasses.replace(the_plan, points=(first, bad, third))
  (tmp_path / "w").mkdir(exist_ok=True)
  (tmp_path / "w" / results.TIMINGS_FILE).write_text(
      json.dumps({"name": bad.name, "seconds": 1.0, "returncode": 1}) + "\n")
  rows = results.collect(the_plan)
  assert [r["status"] for r in rows] == ["finished", "failed", "not started"]
  assert rows[1]["params"] is None and "num_heads=3" in rows[1]["error"]
  csv_path, _ = results.write(the_plan, rows)
  assert len(list(csv.DictReader(open(csv_path)))) == 3
  table = results.markdown_table(rows, ["model.hidden_size", "model.patch_size"])
  assert "| 32 (failed) | 4 | - | - | - |" in table
  assert plots.figure_png(rows, ["model.hidden_size", "model.patch_size"]) is not None
