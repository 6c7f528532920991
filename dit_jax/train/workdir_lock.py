"""One run per workdir: a lock that a second run is refused by, naming the run that holds it.

`WORKDIR/run.lock` holds the holder's host, pid and start time (JSON), and the holder keeps an
exclusive `flock` on it for as long as it runs. The kernel drops the flock when the holder's
process ends, however it ends (kill -9 included), so a lock whose flock is free but whose file
still names a holder was left by a run that died: it is taken over, with a warning. The file is
never deleted (a run that opened it just before a deletion would lock a file nobody else sees);
a run that ends normally empties it.

Multi-process jobs: only process 0 takes the lock, and every process of the job learns from it
whether the run may go on, so the job's own processes never compete for it. `flock` holds
across the hosts of an NFS mount; on a filesystem that ignores it (some FUSE mounts) a holder
on the same host that is still alive is recognised from its pid and start time, and refuses too.

A workdir on Cloud Storage (`gs://`) has no flock: its `run.lock` object is a lease
(`LeaseLock`). The holder renews it every RENEW_SECONDS from a background thread; a lock not
renewed for LEASE_SECONDS was left by a run that died, and is taken over with a warning. Two
runs that start together both write the object; each reads it back after SETTLE_SECONDS, and
only the one whose write is there (the last) goes on.
"""
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional, Union

import jax
import numpy as np

from dit_jax import fs

LOCK_NAME = "run.lock"
_MESSAGE_BYTES = 1024  # the refusal, as process 0 broadcasts it to the job's other processes
# Cloud Storage leases (seconds).
LEASE_SECONDS = 120.0  # a lock not renewed for this long was left by a run that died
RENEW_SECONDS = 30.0
SETTLE_SECONDS = 2.0  # after writing the lock, wait this long before reading it back


class WorkdirBusyError(ValueError):
  """Another live run holds the workdir; `holder` describes it (host, pid, start time), for a
  caller that words its own refusal (`dit_jax.npz_samples.NpzParts`)."""

  def __init__(self, message: str, holder: str = ""):
    super().__init__(message)
    self.holder = holder


def _process_start(pid: int) -> Optional[str]:
  """The start time of process `pid` in clock ticks since boot (Linux), to tell a pid reused."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive_here(holder: dict[str, Any]) -> bool:
  """Whether the holder named in a lock file is a live process of this host."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  start = _process_start(holder["pid"])
  return start is not None and start == holder.get("pid_start", start)


def _describe(holder: dict[str, Any]) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _busy(workdir: str, holder: dict[str, Any], why: str = "") -> WorkdirBusyError:
  return WorkdirBusyError(
      f"workdir: {workdir} is in use by another run ({_describe(holder)}{why}); wait for it "
      "to end, or use another --workdir. Nothing was written.", _describe(holder))


class WorkdirLock:
  """Holds `WORKDIR/run.lock` from construction until `release()` (or the process's end)."""

  def __init__(self, workdir: str):
    """Takes the lock, or raises WorkdirBusyError naming the live run that holds it."""
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK_NAME)
    if os.path.isdir(self.path):
      raise ValueError(f"workdir: {self.path} is a directory where the run's lock file goes; "
                       "move it away, or use another --workdir")
    self._file = open(self.path, "a+")  # creates it if needed; changes nothing that is there
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      locked = False
    self._file.seek(0)
    try:
      holder = json.loads(self._file.read() or "{}")
    except json.JSONDecodeError:
      holder = {}  # a holder killed while writing it
    if not locked or _alive_here(holder):
      self._file.close()
      raise _busy(workdir, holder)
    if holder:
      logging.warning("workdir: taking over %s from a run that ended without releasing it (%s)",
                      self.path, _describe(holder))
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": _process_start(os.getpid()),
                   "started": _now()}
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(self.holder) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def release(self) -> None:
    """Empties the lock file and drops the flock. Idempotent."""
    if self._file.closed:
      return
    self._file.seek(0)
    self._file.truncate()
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


class LeaseLock:
  """Holds `WORKDIR/run.lock` on Cloud Storage from construction until `release()`, as a lease
  renewed in the background (see the module docstring)."""

  def __init__(self, workdir: str):
    """Takes the lock, or raises WorkdirBusyError naming the live run that holds it."""
    self.path = fs.join(workdir, LOCK_NAME)
    found = self._read()
    age = time.time() - found.get("renewed", 0.0)
    if found and age < LEASE_SECONDS:
      raise _busy(workdir, found, f", renewed {age:.0f} s ago; a lock not renewed for "
                  f"{LEASE_SECONDS:.0f} s is taken over")
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                   "token": uuid.uuid4().hex, "renewed": time.time()}
    self._write()
    time.sleep(SETTLE_SECONDS)
    there = self._read()
    if there.get("token") != self.holder["token"]:  # another run wrote it after this one
      raise _busy(workdir, there)
    if found:
      logging.warning("workdir: taking over %s from a run that stopped renewing it %.0f s ago "
                      "(%s)", self.path, age, _describe(found))
    self._stop = threading.Event()
    self._renewer = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._renewer.start()

  def _read(self) -> dict[str, Any]:
    try:
      text = fs.read_text(self.path) if fs.exists(self.path) else ""
      holder = json.loads(text or "{}")
    except (json.JSONDecodeError, FileNotFoundError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def _write(self) -> None:
    fs.write_text(self.path, json.dumps(self.holder) + "\n")

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_SECONDS):
      try:
        if self._read().get("token") != self.holder["token"]:
          logging.error("workdir: %s was taken by another run (%s); this run no longer holds "
                        "its workdir", self.path, _describe(self._read()))
          return
        self.holder["renewed"] = time.time()
        self._write()
      except Exception as e:  # pylint: disable=broad-except  (retried at the next renewal)
        logging.warning("workdir: could not renew %s: %s", self.path, e)

  def release(self) -> None:
    """Stops renewing and empties the lock, if this run still holds it. Idempotent."""
    if self._stop.is_set():
      return
    self._stop.set()
    self._renewer.join()
    if self._read().get("token") == self.holder["token"]:
      fs.write_text(self.path, "")


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (all of them call this together)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.zeros(_MESSAGE_BYTES, np.uint8)
  encoded = text.encode()[:_MESSAGE_BYTES]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(data[data != 0]).decode(errors="replace")


def lock_workdir(workdir: str) -> Optional[Union[WorkdirLock, LeaseLock]]:
  """Process 0 takes the workdir's lock; every process raises WorkdirBusyError if it failed.

  Returns the lock on process 0, None on the others.
  """
  lock, refusal = None, ["", ""]  # the message and the holder
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir) if fs.is_local(workdir) else LeaseLock(workdir)
    except WorkdirBusyError as e:
      refusal = [str(e), e.holder]
  if jax.process_count() > 1:
    refusal = json.loads(_broadcast_text(json.dumps(refusal)))
  if refusal[0]:
    raise WorkdirBusyError(*refusal)
  return lock
