"""benchmarks/cpu_targets.py: ratios to the official rows, targets, rounds, its JSON and errors."""
import json
import os

import pytest

from benchmarks import cpu_targets

ROWS = [("official train step", "img/s", None),
        ("dit-jax train step, unrolled blocks", "img/s", "official train step"),
        ("official guided sampling", "s", None),
        ("dit-jax guided sampling", "s", "official guided sampling"),
        ("dit-jax digits default end to end", "s", None)]


def test_summary_takes_the_best_round_and_the_ratio_to_the_official_best():
  figures = {"official train step": [2.9, 3.1],            # best: 3.1 img/s
             "dit-jax train step, unrolled blocks": [4.0, 3.9],  # best 4.0: 1.29x, short
             "official guided sampling": [47.0, 45.0],     # best: 45 s
             "dit-jax guided sampling": [23.0, 22.4],      # best 22.4 s: 2.01x, met
             "dit-jax digits default end to end": [400.0, 380.0]}
  rows = {r["name"]: r for r in cpu_targets.summarize(ROWS, figures)}
  assert rows["official train step"]["best"] == 3.1 and "ratio" not in rows["official train step"]
  train = rows["dit-jax train step, unrolled blocks"]
  assert train["best"] == 4.0 and train["ratio"] == pytest.approx(4.0 / 3.1)
  assert train["target"] == 1.3 and train["met"] is False
  sampling = rows["dit-jax guided sampling"]
  assert sampling["best"] == 22.4 and sampling["ratio"] == pytest.approx(45.0 / 22.4)
  assert sampling["target"] == 2.0 and sampling["met"] is True
  digits = rows["dit-jax digits default end to end"]
  assert digits["best"] == 380.0 and digits["met"] is True  # 6.3 min <= 6.5
  table = cpu_targets.format_table(list(rows.values())).splitlines()
  assert "| dit-jax train step, unrolled blocks | 4, 3.9 | 4 img/s | 1.29x | 1.3x | no |" in table
  assert "| dit-jax guided sampling | 23, 22.4 | 22.4 s | 2.01x | 2.0x | yes |" in table
  assert "| dit-jax digits default end to end | 400, 380 | 380 s | - | <= 6.5 min | yes |" in table


def test_each_measurement_runs_in_a_process_of_its_own():
  assert cpu_targets.run_fresh(os.getpid, {}) != os.getpid()
  # Keyword arguments go in, the result comes back.
  rows = cpu_targets.run_fresh(cpu_targets.summarize, {
      "rows": ROWS[2:4], "figures": {"official guided sampling": [40.0],
                                     "dit-jax guided sampling": [20.0]}})
  assert rows[1]["ratio"] == 2.0 and rows[1]["met"] is True


def test_rounds_alternate_and_json_is_written_once(tmp_path, monkeypatch, capsys):
  calls = []

  def fake_run(fn, kwargs):
    calls.append((fn.__name__, kwargs.get("blocks")))
    return {"torch_train": 3.0, "jax_train": 4.2, "torch_sampling": 46.0,
            "jax_sampling": 24.0}[fn.__name__]
  monkeypatch.setattr(cpu_targets, "run_fresh", fake_run)
  out = tmp_path / "targets.json"
  cpu_targets.main(["--rounds", "2", "--out", str(out)])
  one_round = [("torch_train", None), ("jax_train", "unrolled"), ("jax_train", "scanned"),
               ("torch_sampling", None), ("jax_sampling", None)]
  assert calls == one_round * 2  # alternating: every measurement once a round
  saved = json.loads(out.read_text())
  assert saved["settings"]["rounds"] == 2 and saved["settings"]["variant"] == "S/2"
  rows = {r["name"]: r for r in saved["rows"]}
  assert rows["dit-jax train step, scanned blocks"]["ratio"] == pytest.approx(1.4)
  assert rows["dit-jax guided sampling"]["met"] is False  # 46 / 24 = 1.92x
  assert "| dit-jax train step, scanned blocks | 4.2, 4.2 | 4.2 img/s | 1.40x | 1.3x | yes |" in (
      capsys.readouterr().out)
  # The same --out again is refused before anything runs, and the file is kept.
  calls.clear()
  with pytest.raises(SystemExit):
    cpu_targets.main(["--out", str(out)])
  assert calls == [] and json.loads(out.read_text()) == saved
  assert "never overwritten" in capsys.readouterr().err


def test_digits_row_only_when_asked():
  names = [row[0] for row in cpu_targets.measurements(cpu_targets.parse_args([]))]
  assert "dit-jax digits default end to end" not in names
  names = [row[0] for row in cpu_targets.measurements(cpu_targets.parse_args(["--digits"]))]
  assert names[-1] == "dit-jax digits default end to end"


@pytest.mark.parametrize("flag", ["--rounds", "--batch", "--sample_steps"])
def test_nonpositive_settings_are_refused_naming_the_flag(flag, capsys):
  with pytest.raises(SystemExit):
    cpu_targets.parse_args([flag, "0"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert flag in err and "at least 1" in err


def test_a_failing_digits_run_says_why(tmp_path, monkeypatch):
  (tmp_path / "train.py").write_text(
      "import sys\nprint('config: no such file', file=sys.stderr)\nsys.exit(3)\n")
  monkeypatch.setattr(cpu_targets, "ROOT", tmp_path)
  with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\).*config: no such file"):
    cpu_targets.digits_end_to_end()


def test_without_torch_the_error_says_how_to_install_it(monkeypatch, capsys):
  real = cpu_targets.importlib.util.find_spec
  monkeypatch.setattr(cpu_targets.importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else real(name, *a))
  with pytest.raises(SystemExit):
    cpu_targets.parse_args([])
  assert "needs torch: pip install -r requirements-dev.txt" in capsys.readouterr().err
