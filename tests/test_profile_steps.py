"""`config.profile_steps`: a jax.profiler trace of the steps asked for, in the workdir."""
import collections
import gzip
import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import pytest

from dit_jax import fs
from dit_jax.train import profiling
from test_cli_errors import error_line, run
from train_utils import ROOT, checkpoint_steps, env_with_devices, read_metrics, run_train, \
    train_command

# A TraceMe of JAX's lowering: in a trace exactly when a function was compiled inside it.
COMPILING = "lower_sharding_computation"


def traces(workdir: pathlib.Path) -> list[pathlib.Path]:
  root = workdir / "profile" / "plugins" / "profile"
  return sorted(root.iterdir()) if root.exists() else []


def read_trace(folder: pathlib.Path) -> dict:
  """What a trace folder holds: its files, the XLA ops per compiled module, the step marks."""
  files = sorted(p.name for p in folder.iterdir())
  with gzip.open(folder / "perfetto_trace.json.gz") as f:
    events = json.load(f)["traceEvents"]
  modules = collections.Counter(e["args"]["hlo_module"] for e in events
                                if "hlo_module" in e.get("args", {}))
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
  names = {e.get("name") for e in events}
  return {"files": files, "modules": modules, "steps": steps, "compiling": COMPILING in names}


@pytest.mark.slow
def test_a_run_traces_the_steps_asked_for_without_the_compilation(tmp_path):
  result = run_train(tmp_path, num_steps=3, profile_steps="2,1")
  assert result.returncode == 0, result.stderr[-3000:]
  (folder,) = traces(tmp_path)
  trace = read_trace(folder)
  assert any(f.endswith(".xplane.pb") for f in trace["files"]), trace["files"]
  assert "perfetto_trace.json.gz" in trace["files"]
  # The device work of the jitted train step (its XLA ops, by compiled module), of step 2 only:
  # the trace waited for it, and step 1's compilation is not in it.
  assert set(trace["modules"]) == {"jit_train_step"}
  assert trace["modules"]["jit_train_step"] >= 50
  assert trace["steps"] == [2]
  assert not trace["compiling"]
  assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_inside_the_window_and_a_resumed_window_keep_both_traces(tmp_path):
  proc = subprocess.Popen(train_command(tmp_path, num_steps=100_000, profile_steps="2,100000",
                                        checkpoint__every_steps=100_000),
                          cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env_with_devices(1))
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  (stopped,) = checkpoint_steps(tmp_path)
  (first,) = traces(tmp_path)
  first_files = {p.name: p.read_bytes() for p in first.iterdir()}
  trace = read_trace(first)
  # Stopped cleanly: every step from 2 to the last one taken, the trace written whole.
  assert trace["steps"] == list(range(2, stopped + 1)) and stopped >= 4
  assert trace["modules"]["jit_train_step"] > 0

  # Resumed: steps keep their numbers; a window that starts at the run's first step holds its
  # compilation (asked for: its lowering, also when the compiled step comes from the session's
  # compilation cache), and one that outlasts the run stops with it.
  result = run_train(tmp_path, num_steps=stopped + 2, profile_steps=f"{stopped + 1},5")
  assert result.returncode == 0, result.stderr[-3000:]
  assert traces(tmp_path)[0] == first
  assert {p.name: p.read_bytes() for p in first.iterdir()} == first_files  # not overwritten
  (second,) = traces(tmp_path)[1:]
  trace = read_trace(second)
  assert trace["steps"] == [stopped + 1, stopped + 2]
  assert trace["compiling"] and trace["modules"]["jit_train_step"] > 0


@pytest.mark.slow
def test_a_bad_value_is_one_line_naming_the_key_before_anything_is_written(tmp_path):
  result = run(train_command(tmp_path / "run", profile_steps="10")[1:])
  # alone=False: the start-up line naming the devices comes first.
  assert error_line(result, alone=False) == (
      "error: config.profile_steps: expected (first step, number of steps), e.g. "
      "--config.profile_steps=10,3; () is off; got (10,)")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, message", [
    ((0, 3), "the first step and the number of steps must be positive"),
    ((5, 0), "the first step and the number of steps must be positive"),
    ((11, 1), "starts at step 11, after the run's last step (config.num_steps=10)"),
    ((1.5, 2), "expected (first step, number of steps)"),
    ((True, 2), "expected (first step, number of steps)"),
    ((1, 2, 3), "expected (first step, number of steps)"),
    (("a,b",), "expected (first step, number of steps)"),
])
def test_bad_windows_name_the_key(value, message):
  with pytest.raises(ValueError) as error:
    profiling.window_from_config(value, num_steps=10)
  assert str(error.value).startswith("config.profile_steps: ")
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_window_values():
  assert profiling.window_from_config((), 10) is None
  assert profiling.window_from_config(("",), 10) is None  # --config.profile_steps= (empty)
  assert profiling.window_from_config(None, 10) is None
  window = profiling.window_from_config((10, 3), 10)  # may outlast the run: it stops with it
  assert (window.first, window.count, window.last) == (10, 3, 12)


@jax.jit
def train_step(x):
  return jnp.tanh(x @ x)


def trace_steps(tracer: profiling.StepTracer, steps: range) -> jax.Array:
  """Drives the tracer as the loop does, over a stand-in step."""
  x = jnp.eye(64)
  for number in steps:
    tracer.before_step(number, x)
    x = train_step(x)
    tracer.after_step(number, x)
  return x


@pytest.mark.parametrize("where", ["local", "gs"])
def test_traces_of_the_same_second_never_replace_each_other(tmp_path, request, where):
  root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")
  saved = []
  for content in (b"first", b"second"):  # two traces that the profiler named alike
    session = tmp_path / content.decode() / "plugins" / "profile" / "2026_11_27_08_31_29"
    session.mkdir(parents=True)
    (session / "host.xplane.pb").write_bytes(content)
    saved.append(profiling.move_trace(str(tmp_path / content.decode()), f"{root}/run"))
  assert saved == [f"{root}/run/profile/plugins/profile/2026_11_27_08_31_29",
                   f"{root}/run/profile/plugins/profile/2026_11_27_08_31_29_2"]
  assert [fs.read_bytes(fs.join(s, "host.xplane.pb")) for s in saved] == [b"first", b"second"]


def test_a_trace_of_the_stand_in_step_holds_its_ops_and_marks(tmp_path):
  train_step(jnp.eye(64)).block_until_ready()  # compiled before the window
  with profiling.StepTracer(profiling.Window(2, 2), str(tmp_path), first_step=1) as tracer:
    trace_steps(tracer, range(1, 5))
  trace = read_trace(pathlib.Path(tracer.saved))
  assert trace["steps"] == [2, 3] and trace["modules"]["jit_train_step"] >= 2
  assert traces(tmp_path) == [pathlib.Path(tracer.saved)]


def test_a_window_before_the_runs_first_step_or_on_another_process_is_not_traced(tmp_path,
                                                                                   monkeypatch):
  tracer = profiling.StepTracer(profiling.Window(3, 4), str(tmp_path), first_step=5)
  assert tracer.window is None  # would trace the resumed run's compilation instead
  with tracer:
    trace_steps(tracer, range(5, 8))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with profiling.StepTracer(profiling.Window(1, 2), str(tmp_path), first_step=1) as tracer:
    trace_steps(tracer, range(1, 3))
  assert tracer.saved is None and not os.path.exists(tmp_path / "profile")


def test_an_error_inside_the_window_still_saves_the_trace_and_propagates(tmp_path):
  with pytest.raises(FloatingPointError):
    with profiling.StepTracer(profiling.Window(1, 5), str(tmp_path), first_step=1) as tracer:
      trace_steps(tracer, range(1, 3))
      raise FloatingPointError("non-finite loss at step 2")
  assert read_trace(pathlib.Path(tracer.saved))["steps"] == [1, 2]
