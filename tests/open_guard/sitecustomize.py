"""Subprocesses of the test suite watch their own file opens (see open_guard.py)."""
import os

if os.environ.get("DIT_OPEN_GUARD_LOG"):
  import open_guard  # pylint: disable=import-error  # beside this file, on PYTHONPATH

  open_guard.install(os.environ["DIT_OPEN_GUARD_ROOT"], os.environ["DIT_OPEN_GUARD_LOG"])
