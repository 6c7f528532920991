"""Shared test setup: float32 at full matmul precision, the reference fixtures, the open guard,
a GCS emulator for gs:// paths."""
import os
import pathlib
import sys
import tempfile
from typing import Iterator

import jax
import numpy as np
import pytest

# Parity with the official PyTorch outputs is checked in float32 at full matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")

# XLA's LLVM backend optimizations off, for the suite's own programs and (inherited through the
# environment; train_utils.env_with_devices keeps it) for those of the programs it starts: XLA
# compiles most of the suite's time, and a third less without them (the model, sampler and
# train-step tests: 425 -> 328 s). XLA's HLO passes are the same, so fusions, memory and
# collectives, which some tests read, are too; values differ from optimized code's by float32
# rounding (the order of operations: 2e-7 relative in a tiny DiT's gradient, far inside every
# parity tolerance), and runs a test compares bit for bit run under the same flags. The tiny
# programs here gain more in compile time than they lose running unoptimized.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The official outputs live in the repository (tests/fixtures/README.md says how they were made):
# a clone anywhere runs its own tests.
FIXTURES = ROOT / "tests" / "fixtures"

# Every file the suite opens, here and in the subprocesses it starts, must be inside the
# checkout, the temporary directory or the Python installation (tests/open_guard/).
_GUARD_DIR = ROOT / "tests" / "open_guard"
sys.path.insert(0, str(_GUARD_DIR))
import open_guard  # noqa: E402  pylint: disable=wrong-import-position
from gcs_emulator import Emulator, forget_clients, start_emulator, use_emulator  # noqa: E402
# The tests draw their random inputs as the library draws its noise: flat, then reshaped.
from dit_jax.noise import standard_normal as normal  # noqa: E402,F401

_GUARD_LOG = os.path.join(tempfile.mkdtemp(prefix="dit_open_guard_"), "outside_opens.log")
os.environ[open_guard.LOG_ENV] = _GUARD_LOG
# TensorFlow's Keras reads ~/.keras/keras.json when imported: point it at the temp directory, so
# a user's own settings can't change a test either.
os.environ["KERAS_HOME"] = os.path.dirname(_GUARD_LOG)
# Keras imports matplotlib when it is installed (the sweep plots need it), and matplotlib reads
# its font cache from ~/.cache/matplotlib unless MPLCONFIGDIR says otherwise.
os.environ["MPLCONFIGDIR"] = os.path.dirname(_GUARD_LOG)
os.environ[open_guard.ROOT_ENV] = str(ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_GUARD_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
open_guard.install(str(ROOT), _GUARD_LOG)


def pytest_configure(config):
  """The session's compilation cache (train_utils.compilation_cache), made here so that it is
  made once, by the controlling process: pytest-xdist's workers inherit its folder and share
  it, and the controller removes it at exit."""
  if not hasattr(config, "workerinput"):
    import train_utils  # pylint: disable=import-outside-toplevel
    train_utils.compilation_cache()


@pytest.fixture(autouse=True)
def no_reads_outside_checkout(request):
  """Fails a test that opened a path outside the checkout (a fresh clone has nothing beside it)."""
  before = len(open_guard.read_log(_GUARD_LOG))
  yield
  entries = open_guard.read_log(_GUARD_LOG)[before:]
  outside = sorted({path for _, path in entries})
  if outside:
    pytest.fail(f"{request.node.nodeid} opened paths outside the checkout: {outside[:5]}",
                pytrace=False)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[Emulator]:
  """A local Google Cloud Storage emulator (tests/gcs_emulator.py), started once when asked."""
  emulator = start_emulator(tmp_path_factory.mktemp("gcs_emulator"))
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch) -> Iterator[str]:
  """'gs://<a new empty bucket>'; gs:// here and in the test's subprocesses is the emulator's."""
  use_emulator(monkeypatch, gcs_emulator)
  yield gcs_emulator.create_bucket()
  forget_clients()  # the clients' caches hold the emulator's settings; monkeypatch undoes the rest


def fixture_path(*parts: str) -> pathlib.Path:
  path = FIXTURES.joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(f"reference fixture {path} is missing from tests/fixtures/")
  return path


@pytest.fixture(scope="session")
def dit_ref():
  """Outputs of the official PyTorch DiT (see tests/fixtures/README.md)."""
  with np.load(fixture_path("dit_reference", "tiny_dit.npz")) as data:
    return {k: data[k] for k in data.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def assert_rel_close(actual, expected, rtol: float = 1e-4, name: str = ""):
  """Relative error ||a - e|| / ||e|| <= rtol (the parity criterion of the Core issue)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
  assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"
