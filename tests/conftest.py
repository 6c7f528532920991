"""Shared test setup: float32 at full matmul precision, and the official reference fixtures."""
import os
import pathlib

import jax
import numpy as np
import pytest

# Parity with the official PyTorch outputs is checked in float32 at full matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("DIT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_path(*parts: str) -> pathlib.Path:
  path = FIXTURES.joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(
        f"reference fixture {path} is missing: tests expect ../shared/fixtures beside the "
        "checkout (or set DIT_FIXTURES)")
  return path


@pytest.fixture(scope="session")
def dit_ref():
  """Outputs of the official PyTorch DiT (see ../shared/fixtures/README.md)."""
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
