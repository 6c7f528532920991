"""Records every file the test suite opens outside the checkout and its temporary directories.

A fresh clone has nothing beside it (no `../shared`), so a test that reads from outside the
repository passes here and fails there. `install()` adds a `sys.addaudithook` hook on the
"open" event (builtins.open, io.open, os.open); paths outside the allowed roots are appended to
the file named by $DIT_OPEN_GUARD_LOG, one `test id<TAB>path` line each, so that subprocesses
the tests start (train.py, sample.py, ...; see sitecustomize.py beside this file) are watched too.
Allowed: the checkout, the temporary directory, the Python installation and its packages, and
the operating system's own trees (/dev, /proc, /sys, /etc, /usr, /lib...).
"""
import functools
import os
import site
import sys
import sysconfig
import tempfile

LOG_ENV = "DIT_OPEN_GUARD_LOG"
ROOT_ENV = "DIT_OPEN_GUARD_ROOT"
SYSTEM_ROOTS = ("/dev", "/proc", "/sys", "/etc", "/usr", "/lib", "/lib64", "/bin", "/sbin",
                "/run", "/var/lib", "/opt/conda")


def python_roots() -> tuple[str, ...]:
  """The Python installation and its packages (a venv may sit anywhere, even beside the clone)."""
  roots = {p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix) if p}
  roots.update(sysconfig.get_paths().values())
  roots.update(site.getsitepackages())
  return tuple(sorted({os.path.realpath(r) for r in roots}))


def allowed_roots(checkout: str) -> tuple[str, ...]:
  roots = {checkout, tempfile.gettempdir(), *SYSTEM_ROOTS, *python_roots()}
  return tuple(sorted({os.path.realpath(r) for r in roots}))


def is_inside(path: str, roots: tuple[str, ...]) -> bool:
  return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def is_allowed(path: str, roots: tuple[str, ...], checkout: str,
               py_roots: tuple[str, ...] | None = None) -> bool:
  """Inside an allowed root, and not beside the checkout (where `../shared` would be).

  The folder holding the checkout is out of bounds even when it lies in an allowed root (a
  clone in /tmp/x/dit-jax: /tmp/x/other is not the temporary directory the tests may use),
  unless that folder is the temporary directory itself.
  """
  if is_inside(path, python_roots() if py_roots is None else py_roots):
    return True
  parent = os.path.dirname(checkout)
  if (is_inside(path, (parent,)) and not is_inside(path, (checkout,))
      and parent != _temp_dir() and parent != "/"):
    return False
  return is_inside(path, roots)


@functools.cache
def _temp_dir() -> str:
  return os.path.realpath(tempfile.gettempdir())


def install(checkout: str, log_path: str) -> None:
  """Watch this process: opens outside the allowed roots go to log_path."""
  checkout = os.path.realpath(checkout)
  roots, py_roots = allowed_roots(checkout), python_roots()
  busy = []  # the hook's own open() of the log must not re-enter it

  def hook(event: str, args: tuple) -> None:
    if event != "open" or busy or not args or isinstance(args[0], int):
      return
    path = args[0]
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    path = os.path.realpath(os.fspath(path))
    if is_allowed(path, roots, checkout, py_roots):
      return
    busy.append(1)
    try:
      test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
      with open(log_path, "a") as log:
        log.write(f"{test}\t{path}\n")
    finally:
      busy.pop()

  sys.addaudithook(hook)


def read_log(log_path: str) -> list[tuple[str, str]]:
  if not os.path.exists(log_path):
    return []
  with open(log_path) as log:
    return [tuple(line.rstrip("\n").split("\t", 1)) for line in log if "\t" in line]
