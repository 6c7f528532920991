"""README stays true: its Python example runs (on the tiny fixture model) and its commands exist."""
import re
import subprocess
import sys

import numpy as np

from conftest import ROOT, fixture_path

README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path):
  ckpt = tmp_path / "ckpt"
  subprocess.run([sys.executable, "-m", "dit_jax.convert", "--torch",
                  str(fixture_path("dit_reference", "tiny_dit.pt")), "--model", "DiT-S/2",
                  "--depth", "1", "--hidden-size", "64", "--num-heads", "4", "--image-size",
                  "64", "--num-classes", "10", "--out", str(ckpt)], check=True, cwd=ROOT)
  code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  # The same example on the tiny model: 8x8 latents, 10 classes (null class 10).
  for old, new in [('"checkpoints/dit_xl2_256"', repr(str(ckpt))), ("(4, 32, 32, 4)", "(4, 8, 8, 4)"),
                   ("[207, 360, 387, 974]", "[1, 3, 5, 9]"), ("1000)", "10)")]:
    assert old in code, old
    code = code.replace(old, new)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  latents = np.asarray(namespace["latents"])
  assert latents.shape == (4, 8, 8, 4) and np.all(np.isfinite(latents))


def test_readme_commands_name_real_modules():
  assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
  assert ".venv/bin/python -m pytest -q" in README
  for module in re.findall(r"python -m (dit_jax[\w.]*)", README):
    path = ROOT / module.replace(".", "/")
    assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
