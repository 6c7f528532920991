"""README stays true: its Python example runs, and every command in it works as typed.

Every command (fenced bash blocks and inline `code` spans that start with a program) runs in a
fresh shell after the quick start: Python programs through `.venv/bin/python`, each script or
module exists, each `--flag` is a flag the program really has (from its own --helpfull/--help),
and each `--config.key` override names a key of the config file the command loads.
"""
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_path

README = (ROOT / "README.md").read_text()
VENV_BIN = ".venv/bin/"
# Programs started from the shell; anything else in an inline span is prose, not a command.
PROGRAMS = ("python", "python3", "bash", "tensorboard", "pytest", "pip", "tfds", "gcloud", "cd")
EXTERNAL = ("gcloud", "cd")  # not ours: only what they run is checked


def test_readme_python_example_runs(tmp_path):
  ckpt = tmp_path / "ckpt"
  subprocess.run([sys.executable, "-m", "dit_jax.convert", "--torch",
                  str(fixture_path("dit_reference", "tiny_dit.pt")), "--model", "DiT-S/2",
                  "--depth", "1", "--hidden-size", "64", "--num-heads", "4", "--image-size",
                  "64", "--num-classes", "10", "--out", str(ckpt)], check=True, cwd=ROOT)
  code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  # The same example on the tiny model: 8x8 latents, 10 classes (null class 10).
  for old, new in [('"checkpoints/dit_xl2_256"', repr(str(ckpt))),
                   ("[207, 360, 387, 974]", "[1, 3, 5, 9]")]:
    assert old in code, old
    code = code.replace(old, new)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  latents = np.asarray(namespace["latents"])
  assert latents.shape == (4, 8, 8, 4) and np.all(np.isfinite(latents))


def split_commands(text: str) -> list[list[str]]:
  """Shell text -> commands as token lists (continuations joined, comments dropped)."""
  commands = []
  for line in text.replace("\\\n", " ").splitlines():
    tokens = shlex.split(line, comments=True)
    current = []
    for token in tokens + ["&&"]:
      if token in ("&&", "||", ";", "|"):
        if current:
          commands.append(current)
        current = []
      else:
        current.append(token)
  return commands


def readme_commands(text: str = README) -> list[list[str]]:
  commands = []
  for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
    commands += split_commands(block)
  for span in re.findall(r"`([^`\n]+)`", text):
    words = [w for w in span.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if words and os.path.basename(words[0]) in PROGRAMS:
      commands += split_commands(span)
  commands += [nested for command in list(commands) if command[0] == "gcloud"
               for token in command if token.startswith("--command=")
               for nested in split_commands(token[len("--command="):])]
  return commands


def program_of(command: list[str]) -> tuple[str, list[str], list[str]]:
  """(what runs, its arguments, problems) of one command; env assignments are skipped."""
  while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
    command = command[1:]
  prog, args = command[0], command[1:]
  name = os.path.basename(prog)
  if name in EXTERNAL:
    return name, [], []
  if name in ("python", "python3"):
    if args[:2] == ["-m", "venv"]:
      return "venv", [], []
    if prog != VENV_BIN + "python":
      return name, [], [f"{' '.join(command)}: use {VENV_BIN}python (a fresh shell has no venv)"]
    if args[0] == "-m":
      module, args = args[1], args[2:]
      path = ROOT / module.replace(".", "/")
      if module in ("pytest", "pip"):
        return module, [], []
      if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
        return module, [], [f"{' '.join(command)}: no module {module} in the repository"]
      return module, args, []
    if not (ROOT / args[0]).is_file():
      return args[0], [], [f"{' '.join(command)}: no script {args[0]}"]
    return args[0], args[1:], []
  if name == "bash":
    ok = (ROOT / args[0]).is_file()
    return args[0], [], [] if ok else [f"{' '.join(command)}: no script {args[0]}"]
  if prog != VENV_BIN + name:
    return name, [], [f"{' '.join(command)}: use {VENV_BIN}{name} (a fresh shell has no venv)"]
  if name == "pip":
    requirements = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
    return name, [], [f"no {r}" for r in requirements if not (ROOT / r).is_file()]
  installed = (pathlib.Path(sys.executable).parent / name).exists()
  return name, [], [] if installed else [f"{name} is not installed by the requirements"]


@functools.cache
def known_flags(program: str) -> frozenset:
  """The flags a program of ours accepts, read from its own help text."""
  cmd = [sys.executable, program] if program.endswith(".py") else [sys.executable, "-m", program]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for help_flag in ("--helpfull", "--help"):  # absl lists every flag with --helpfull
    result = subprocess.run(cmd + [help_flag], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    text = result.stdout + result.stderr
    if "usage" in text.lower() or "flags:" in text:
      break
  flags = set()
  for negatable, name in re.findall(r"(?<![\w-])--(\[no\])?([A-Za-z][\w.-]*)", text):
    flags.update({name, "no" + name} if negatable else {name})
  assert flags, f"{program}: no flags in its help:\n{text[-2000:]}"
  return frozenset(flags)


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("readme_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_key_problem(config, key: str) -> str | None:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return f"--config.{key}: no such config key"
    node = node[part]
  return None


def flag_problems(program: str, args: list[str]) -> list[str]:
  problems = []
  flags = [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]
  config_spec = next((a.split("=", 1)[1] if "=" in a else args[i + 1]
                      for i, a in enumerate(args) if a.split("=")[0] == "--config"), None)
  for flag in flags:
    if flag.startswith("config."):
      assert config_spec, f"{program}: --{flag} without --config"
      problem = config_key_problem(load_config(config_spec), flag[len("config."):])
      problems += [f"{program} {problem}"] if problem else []
    elif flag not in known_flags(program):
      problems.append(f"{program}: --{flag} is not one of its flags")
  return problems


@pytest.mark.slow
def test_readme_commands_work_as_typed():
  commands = readme_commands()
  assert len(commands) >= 15, commands  # the extraction found the README's commands
  problems = []
  for command in commands:
    program, args, found = program_of(command)
    problems += found
    if not found and args and (program.endswith(".py") or "." in program):
      problems += flag_problems(program, args)
  assert not problems, "\n".join(problems)


def test_readme_config_overrides_in_prose_exist():
  from configs import defaults  # pylint: disable=import-outside-toplevel

  keys = re.findall(r"`--config\.([\w.]+)=", README)
  assert keys
  problems = [p for key in keys if (p := config_key_problem(defaults.base_config(), key))]
  assert not problems, problems


def test_the_checker_catches_mistakes():
  """A typo'd flag, a missing module, a bare python and an unknown config key are reported."""
  bad = ("```bash\npython train.py --config configs/digits.py\n"
         ".venv/bin/python sample.py --checkpoint x --cfg 3\n"
         ".venv/bin/python -m dit_jax.nope --x 1\n"
         ".venv/bin/python train.py --config configs/digits.py --workdir w --config.num_step=3\n"
         "tensorboard --logdir runs/\n```")
  problems = []
  for command in readme_commands(bad):
    program, args, found = program_of(command)
    problems += found or flag_problems(program, args)
  text = "\n".join(problems)
  assert len(problems) == 5, text
  for expected in ("use .venv/bin/python", "--cfg is not one of its flags",
                   "no module dit_jax.nope",
                   "--config.num_step: no such config key",
                   "use .venv/bin/tensorboard"):
    assert expected in text, (expected, text)


@pytest.mark.parametrize("path", [".ci/run"])
def test_ci_runs_the_readme_test_command(path):
  """.ci/run runs the README's test command as written (options included)."""
  setup = [line for line in README.splitlines()
           if line.startswith("python3 -m venv .venv") and "pytest" in line]
  assert len(setup) == 1, setup
  command = setup[0].rsplit("&& ", 1)[1]
  assert command.startswith(".venv/bin/python -m pytest -q"), command
  assert command in (ROOT / path).read_text().splitlines()
