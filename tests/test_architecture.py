"""README's module map ("Architecture") matches the code: every module of dit_jax is in it, and
every path and file it names exists."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def architecture_rows() -> list[tuple[str, str]]:
  text = (ROOT / "README.md").read_text()
  section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
  rows = []
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 2 and not set(cells[0]) <= {"-"}:
      rows.append((cells[0], cells[1]))
  return rows[1:]  # the header row


def test_every_module_is_in_the_map_and_every_named_file_exists():
  named = set()
  for paths, what in architecture_rows():
    folders = [p for p in re.findall(r"`([^`]+)`", paths)]
    for path in folders:
      assert (ROOT / path).exists(), f"README names {path}, which does not exist"
      named.add(path.rstrip("/"))
      if path.endswith("/") and path.startswith("dit_jax/"):
        for name in re.findall(r"`(\w+\.py)`", what):
          assert (ROOT / path / name).exists(), f"README names {path}{name}: not there"
          named.add(path + name)
  modules = {str(p.relative_to(ROOT)) for p in (ROOT / "dit_jax").rglob("*.py")
             if p.name != "__init__.py" or p.parent.name == "samplers"}
  missing = sorted(m for m in modules if m not in named)
  assert not missing, f"modules missing from README's Architecture map: {missing}"


def test_the_data_flow_names_real_modules():
  text = (ROOT / "README.md").read_text().split("\n## Architecture\n", 1)[1]
  flow = text.split("```", 2)[1]
  for path in re.findall(r"(dit_jax/[\w/]+(?:\.py)?|configs/\S*?\.py)", flow):
    if "*" not in path:
      assert (ROOT / path).exists(), f"the data flow names {path}, which does not exist"
