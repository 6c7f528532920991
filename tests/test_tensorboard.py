"""TensorBoard without TensorFlow: the events `dit_jax.train.tensorboard_writer` writes, read back
by TensorBoard's own loader in a process where TensorFlow cannot be imported (so through its
pure-Python reader); a train.py run that imports no TensorFlow at all; and TensorFlow imported,
quietly and with the GPUs hidden, by the code that needs it (tfds, `gs://` paths through epath).
"""
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from dit_jax import fs, logs
from dit_jax.train.tensorboard_writer import TensorBoardWriter
from train_utils import ROOT, env_with_devices, read_metrics, train_command

# TensorBoard's loader (what its dashboards read) with TensorFlow unimportable: every tensor of
# the "scalars" and "images" plugins (images as base64 strings) and the hparams plugin's values.
_READ_EVENTS = """
import base64, json, sys
sys.modules["tensorflow"] = None
from google.protobuf import json_format
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util
loader = plugin_event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"tensors": 0})
loader.Reload()
found, plugins = {}, loader.ActivePlugins()
for plugin in {"scalars", "images"} & set(plugins):
  for tag in loader.PluginTagToContent(plugin):
    events = loader.Tensors(tag)
    values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
    found[tag] = {"plugin": plugin, "steps": [e.step for e in events], "values": [
        v.item() if plugin == "scalars" else [base64.b64encode(s).decode() for s in v.tolist()]
        for v in values]}
for tag, content in (loader.PluginTagToContent("hparams") if "hparams" in plugins else {}).items():
  info = hparams_metadata.parse_session_start_info_plugin_data(content)
  found[tag] = {"plugin": "hparams", "hparams": json_format.MessageToDict(info)["hparams"]}
print(json.dumps({"events": found, "tensorflow": sys.modules["tensorflow"] is not None}))
"""


def read_events(logdir) -> dict:
  """What TensorBoard reads in `logdir`: tag -> plugin, steps and values (see _READ_EVENTS)."""
  result = subprocess.run([sys.executable, "-c", _READ_EVENTS, str(logdir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert not report["tensorflow"]
  return report["events"]


def decoded(strings: list[str]) -> tuple[int, int, list[np.ndarray]]:
  """An "images" tensor `[width, height, png...]` (base64) -> (width, height, pixels)."""
  width, height, *pngs = (base64.b64decode(s) for s in strings)
  return int(width), int(height), [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]


def test_tensorboard_reads_scalars_images_and_hparams_without_tensorflow(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 5, 7, 3), np.uint8)
  gray = rng.integers(0, 256, (1, 4, 6, 1), np.uint8)
  writer = TensorBoardWriter(str(tmp_path))
  writer.write_hparams({"model.depth": 2, "optimizer.lr": 1e-3, "sampler": "ddim", "flip": True})
  writer.write_scalars(1, {"train/loss": 0.25, "eval/num_samples": 1000})
  writer.write_scalars(2, {"train/loss": 1 / 3})
  writer.write_images(2, {"samples": rgb, "gray": gray})
  writer.close()
  writer.close()  # again: nothing
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(3, {"train/loss": 0.5})
  pattern = (rf"events\.out\.tfevents\.\d{{10}}\.{re.escape(socket.gethostname())}\."
             rf"{os.getpid()}\.\d+\.v2")
  assert [name for name in os.listdir(tmp_path) if re.fullmatch(pattern, name)] == \
      os.listdir(tmp_path) == [os.path.basename(writer.path)]

  events = read_events(tmp_path)
  assert set(events) == {"train/loss", "eval/num_samples", "samples", "gray",
                         "_hparams_/session_start_info"}
  # float32, as tf.summary.scalar writes them.
  assert events["train/loss"] == {"plugin": "scalars", "steps": [1, 2],
                                  "values": [0.25, float(np.float32(1 / 3))]}
  assert events["eval/num_samples"] == {"plugin": "scalars", "steps": [1], "values": [1000.0]}
  assert events["samples"]["plugin"] == "images" and events["samples"]["steps"] == [2]
  width, height, pixels = decoded(events["samples"]["values"][0])
  assert (width, height) == (7, 5) and len(pixels) == 2
  for shown, written in zip(pixels, rgb):
    np.testing.assert_array_equal(shown, written)
  width, height, [shown] = decoded(events["gray"]["values"][0])
  assert (width, height) == (6, 4)
  np.testing.assert_array_equal(shown, gray[0, ..., 0])  # a grayscale PNG
  assert events["_hparams_/session_start_info"]["hparams"] == {
      "model.depth": 2, "optimizer.lr": 1e-3, "sampler": "ddim", "flip": True}


def test_a_second_writer_never_overwrites_the_first_file(tmp_path):
  first = TensorBoardWriter(str(tmp_path))
  first.write_scalars(1, {"train/loss": 1.0})
  first.close()
  size = os.path.getsize(first.path)
  second = TensorBoardWriter(str(tmp_path))  # a run resumed in the same second, same process
  second.write_scalars(2, {"train/loss": 2.0})
  second.close()
  assert second.path != first.path and os.path.getsize(first.path) == size
  assert read_events(tmp_path)["train/loss"]["steps"] == [1, 2]


def test_images_other_than_uint8_batches_are_refused_by_the_call(tmp_path):
  writer = TensorBoardWriter(str(tmp_path))
  for wrong in (np.zeros((1, 5, 7, 3), np.float32), np.zeros((5, 7, 3), np.uint8),
                np.zeros((1, 5, 7, 2), np.uint8)):
    with pytest.raises(ValueError, match=r"images 'samples': uint8 \[num_images, height, width"):
      writer.write_images(1, {"samples": wrong})
  writer.close()  # nothing was queued: the writer is still sound


# A file-size limit (`ulimit -f 1`: 1 KiB; SIGXFSZ ignored, so the write fails with EFBIG), a
# kernel refusal like test_write_errors' ones: the image's event does not fit.
_REFUSED = """
import sys
import numpy as np
from dit_jax import cli
from dit_jax.train.tensorboard_writer import TensorBoardWriter
writer = TensorBoardWriter(sys.argv[1])
writer.write_scalars(1, {"train/loss": 0.5})
writer.flush()
noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), np.uint8)
writer.write_images(2, {"samples": noise})
try:
  with cli.write_errors():
    writer.flush()
except cli.WriteError as e:
  print("raised:", e)
writer.write_scalars(3, {"train/loss": 0.25})  # the writer writes nothing more, raises no more
writer.close()
print("closed")
"""


def test_a_refused_write_is_raised_once_naming_the_file(tmp_path):
  limited = ["bash", "-c", "ulimit -f 1 && trap '' XFSZ && exec \"$@\"", "_", sys.executable,
             "-c", _REFUSED, str(tmp_path)]
  result = subprocess.run(limited, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  [name] = os.listdir(tmp_path)
  assert result.stdout.splitlines() == [
      f"raised: could not write {tmp_path / name}: File too large (errno 27); stopping", "closed"]
  # What was written before stays readable.
  assert read_events(tmp_path)["train/loss"] == {"plugin": "scalars", "steps": [1],
                                                 "values": [0.5]}


def test_events_on_cloud_storage(gcs_bucket, tmp_path):
  """Through gcsfs (the emulator's): the object appears whole when the writer closes."""
  logdir = f"{gcs_bucket}/run"
  writer = TensorBoardWriter(logdir)
  assert writer.path.startswith(f"{logdir}/events.out.tfevents.")
  writer.write_scalars(5, {"train/loss": 0.125})
  writer.close()
  [name] = fs.listdir(logdir)
  (tmp_path / name).write_bytes(fs.read_bytes(f"{logdir}/{name}"))
  assert read_events(tmp_path)["train/loss"] == {"plugin": "scalars", "steps": [5],
                                                 "values": [0.125]}


@pytest.mark.slow
def test_a_training_run_writes_its_events_and_never_imports_tensorflow(tmp_path):
  workdir = tmp_path / "run"
  env = env_with_devices(1)
  env["PYTHONPROFILEIMPORTTIME"] = "1"  # every module imported, on stderr
  command = train_command(workdir, sample__every_steps=3, sample__classes="(0,1)",
                          sample__per_class=2, sample__sampler="ddim", sample__num_steps=2)
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")]
  assert "dit_jax.train.tensorboard_writer" in imported and "jax" in imported
  assert not [m for m in imported if m.split(".")[0] == "tensorflow"
              or m.startswith("clu.metric_writers")]

  events = read_events(workdir)
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  for tag in ("train/loss", "train/mse", "train/vb", "train/grad_norm", "train/learning_rate"):
    assert events[tag] == {"plugin": "scalars", "steps": [1, 2, 3],
                           "values": [float(np.float32(row[tag])) for row in rows]}, tag
  assert events["samples"]["steps"] == [3]
  _, _, [shown] = decoded(events["samples"]["values"][0])
  with Image.open(workdir / "samples" / "step_0000003.png") as saved:
    np.testing.assert_array_equal(shown, np.asarray(saved))
  hparams = events["_hparams_/session_start_info"]["hparams"]
  assert hparams["model.depth"] == 1 and hparams["batch_size"] == 16
  assert hparams["sample.sampler"] == "ddim"


# A stand-in TensorFlow package: what it logs while loading (abseil's notice and an INFO line of
# TensorFlow's C++, which TF_CPP_MIN_LOG_LEVEL does not stop, then a warning) and the GPU calls.
_FAKE_TENSORFLOW = textwrap.dedent("""
    import os
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written "
                b"to STDERR\\n")
    os.write(2, b"I0000 00:00:1795745603.357494    3130 port.cc:153] oneDNN custom operations "
                b"are on.\\n")
    os.write(2, b"W0000 00:00:1795745603.357494    3130 port.cc:153] a warning\\n")
    class config:
      calls = []
      @staticmethod
      def set_visible_devices(devices, device_type=None):
        config.calls.append([devices, device_type])
""")

_IMPORTS = """
import json, sys
from dit_jax import fs, logs
logs.setup()
fs.path("/local/file")
local = "tensorflow" in sys.modules
fs.path(sys.argv[1])
url = "tensorflow" in sys.modules
tf = logs.import_tensorflow()
print(json.dumps({"local": local, "url": url,
                  "calls": tf.config.calls if tf is not None else None}))
"""


@pytest.mark.parametrize("use_tf", ["", "false"])
def test_tensorflow_is_imported_quietly_off_the_gpus_where_needed(tmp_path, use_tf):
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text(_FAKE_TENSORFLOW)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", EPATH_USE_TF=use_tf)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  result = subprocess.run([sys.executable, "-c", _IMPORTS, "gs://bucket/run/file"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  # A local path never imports TensorFlow; a URL does where epath reaches it through TensorFlow
  # (not with EPATH_USE_TF=false); either way, once imported, the GPUs are hidden from it.
  assert report == {"local": False, "url": not use_tf,
                    "calls": [[[], "GPU"]] * (1 if use_tf else 2)}
  # Its INFO lines dropped, its warning kept.
  assert result.stderr.splitlines() == [
      "W0000 00:00:1795745603.357494    3130 port.cc:153] a warning"]


def test_without_tensorflow_nothing_is_imported(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
  assert logs.import_tensorflow() is None


def test_a_tfds_source_imports_tensorflow_first(monkeypatch, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from dit_jax.data import TfdsSource  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(logs, "import_tensorflow", lambda verbose=None: calls.append(verbose))
  with pytest.raises(ValueError, match="neither 'digits', 'folder' nor a tfds dataset"):
    TfdsSource("no_such_dataset_xyz", data_dir=str(tmp_path))
  assert calls == [None]

