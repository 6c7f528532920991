"""The suite reads nothing outside the checkout: the guard that enforces it works."""
import os
import subprocess
import sys

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
  outside = ROOT.parent / "shared" / "fixtures" / "dit_open_guard_probe.npz"
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
  assert open_guard.read_log(str(log)) == [("probe::test", os.path.realpath(outside))]


def test_allowed_roots():
  roots = open_guard.allowed_roots(str(ROOT))
  assert open_guard.is_inside(str(ROOT / "tests" / "fixtures" / "x"), roots)
  assert open_guard.is_inside(os.path.realpath(sys.prefix), roots)
  assert not open_guard.is_inside(str(ROOT.parent / "shared" / "fixtures" / "x"), roots)
  assert not open_guard.is_inside(str(ROOT) + "-other/x", roots)  # a sibling sharing a prefix
