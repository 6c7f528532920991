"""The suite reads nothing outside the checkout: the guard that enforces it works."""
import functools
import os
import subprocess
import sys
import tempfile

import open_guard
from conftest import FIXTURES, ROOT


def test_fixtures_are_inside_the_repository():
  assert FIXTURES.resolve().is_relative_to(ROOT)
  for name in ("dit_reference/tiny_dit.pt", "dit_reference/tiny_dit.npz",
               "vae_reference/tiny_vae/config.json", "vae_reference/tiny_vae.npz",
               "vae_reference/tiny_vae/diffusion_pytorch_model.safetensors",
               "inception_reference/fid_inception_seed0.npz", "README.md"):
    assert (FIXTURES / name).is_file(), name


def test_guard_reports_opens_outside_the_checkout_in_subprocesses(tmp_path):
  """A subprocess started by a test watches itself (sitecustomize) and logs outside opens."""
  log = tmp_path / "outside.log"
  outside = "/dit_open_guard_probe/fixtures/tiny_dit.npz"  # outside every allowed root
  inside = ROOT / "README.md"
  scratch = tmp_path / "scratch.txt"
  code = ("import sys\n"
          "for path in sys.argv[1:]:\n"
          "  try:\n"
          "    open(path, 'a' if path.endswith('.txt') else 'r').close()\n"
          "  except OSError:\n"
          "    pass\n")
  env = {**os.environ, open_guard.LOG_ENV: str(log), open_guard.ROOT_ENV: str(ROOT),
         "PYTEST_CURRENT_TEST": "probe::test (call)"}
  subprocess.run([sys.executable, "-c", code, str(outside), str(inside), str(scratch)],
                 env=env, check=True, cwd=tmp_path)
  assert open_guard.read_log(str(log)) == [("probe::test", outside)]


def test_allowed_paths():
  checkout = "/work/dit-jax"
  roots = open_guard.allowed_roots(checkout)
  allowed = functools.partial(open_guard.is_allowed, roots=roots, checkout=checkout)
  assert allowed(checkout + "/tests/fixtures/x")
  assert allowed(os.path.realpath(sys.prefix) + "/lib/x.py")
  assert allowed(os.path.join(os.path.realpath(tempfile.gettempdir()), "pytest-0", "x"))
  assert not allowed("/work/beside/fixtures/x")  # a folder beside the checkout
  assert not allowed("/work/dit-jax-other/x")  # a sibling sharing the checkout's prefix
  assert not allowed("/dit_open_guard_probe/x")


def test_beside_a_checkout_in_the_temp_dir_is_outside():
  """A clone in /tmp/x/dit-jax: /tmp/x/other is not the test's temp space."""
  tmp = os.path.realpath(tempfile.gettempdir())
  checkout = os.path.join(tmp, "clone", "dit-jax")
  roots = open_guard.allowed_roots(checkout)
  assert not open_guard.is_allowed(os.path.join(tmp, "clone", "other", "x"), roots, checkout)
  assert open_guard.is_allowed(os.path.join(checkout, "README.md"), roots, checkout)
  assert open_guard.is_allowed(os.path.join(tmp, "pytest-of-root", "x"), roots, checkout)
