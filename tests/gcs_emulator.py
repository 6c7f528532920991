"""A local Google Cloud Storage emulator for tests, and the environment that sends gs:// to it.

The emulator (gcp-storage-emulator, in memory) runs in its own process, started from this file,
so that it does not share a GIL with the test's threads (orbax saves in the background). Its
output goes to a log file in the temporary directory; it prints a BrokenPipeError for each read
that a client closes early, which is harmless.

Three clients of the project reach GCS; each is redirected by environment variables, which
the subprocesses a test starts (train.py, sample.py) inherit:
  - etils.epath (orbax's directories and small files, our own files): through fsspec/gcsfs, not
    tf.io.gfile, whose GCS client has no endpoint setting;
  - tensorstore's `gcs` kvstore (orbax's arrays);
  - google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace when it
    lists or deletes steps).
None of them may try the GCE metadata server or read credentials from the home folder.
"""
import dataclasses
import http
import itertools
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

START_TIMEOUT_S = 20.0  # the emulator answers in about 0.2 s on 2 cores
BUCKET_PREFIX = "dit-jax-test"
_NOWHERE = "127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


def client_env(url: str, home: str) -> dict[str, str]:
  """The variables that send every GCS client of the project to the emulator at `url`.

  home: an empty folder in the temporary directory that stands in for the home folder, which
  is outside the checkout: gcsfs reads ~/.gcs_tokens when imported, google-auth looks for
  ~/.config/gcloud.
  """
  return {
      "HOME": home,
      "CLOUDSDK_CONFIG": os.path.join(home, ".config", "gcloud"),
      # etils.epath uses tf.io.gfile for gs:// while TensorFlow is installed; this selects
      # fsspec (gcsfs). Read once per process: see use_emulator for this process.
      "EPATH_USE_TF": "false",
      # gcsfs and google-cloud-storage: the endpoint; both then skip authentication.
      "STORAGE_EMULATOR_HOST": url,
      # fsspec's `token=` for gcs (FSSPEC_<protocol>_<kwarg>): no credential lookup at all.
      "FSSPEC_GCS_TOKEN": "anon",
      # gcsfs (2026.10.1 by default) asks the Storage Control gRPC API for a bucket's layout
      # before each open; the emulator has no gRPC, and each open then waits 60 s for a timeout.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",  # gcsfs: no metadata-server credentials (if token= were unset)
      # tensorstore: the endpoint, and a fixed bearer token instead of any credential lookup.
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # The metadata server, for tensorstore (GCE_METADATA_ROOT) and google-auth (all three):
      # a refused local port, so a client that still looks fails at once instead of timing out.
      "GCE_METADATA_ROOT": _NOWHERE,
      "GCE_METADATA_HOST": _NOWHERE,
      "GCE_METADATA_IP": _NOWHERE,
  }


@dataclasses.dataclass
class Emulator:
  """A running emulator: its URL, its process and the file its output goes to."""
  url: str
  process: subprocess.Popen
  log_path: pathlib.Path
  home: pathlib.Path
  _names: Iterator[int] = dataclasses.field(default_factory=itertools.count)

  def create_bucket(self) -> str:
    """Creates a new, empty bucket and returns 'gs://<its name>'."""
    name = f"{BUCKET_PREFIX}-{next(self._names)}"
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      if response.status != http.HTTPStatus.OK:
        raise RuntimeError(f"GCS emulator: creating bucket {name} answered {response.status}")
    return f"gs://{name}"

  def env(self) -> dict[str, str]:
    return client_env(self.url, str(self.home))

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def start_emulator(workdir: pathlib.Path, tries: int = 3) -> Emulator:
  """Starts the emulator on a free local port; its output goes to `workdir`/emulator.log."""
  workdir = pathlib.Path(workdir)
  home = workdir / "home"
  home.mkdir(exist_ok=True)
  log_path = workdir / "emulator.log"
  for _ in range(tries):
    port = _free_port()
    with open(log_path, "ab") as log:
      process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    emulator = Emulator(f"http://127.0.0.1:{port}", process, log_path, home)
    if _wait_until_up(emulator):
      return emulator
    emulator.stop()  # most likely the port was taken between _free_port and the bind
  raise RuntimeError(f"GCS emulator did not start; its output:\n{_tail(log_path)}")


def use_emulator(monkeypatch: Any, emulator: Emulator) -> None:
  """Sends gs:// in this process and its future subprocesses to `emulator` until `monkeypatch`
  is undone (call forget_clients then)."""
  for name, value in emulator.env().items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
  # Imported here, after the variables are set: gcsfs picks its filesystem class when imported.
  import fsspec  # pylint: disable=import-outside-toplevel
  import gcsfs  # pylint: disable=import-outside-toplevel
  if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    raise RuntimeError("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was "
                       "set: its ExtendedGcsFileSystem waits 60 s per open on the emulator")
  # fsspec read its FSSPEC_* variables when it was imported, possibly before the fixture.
  monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}),
                                                  "token": "anon"})
  forget_clients()


def forget_clients() -> None:
  """Drops what this process cached about gs:// clients, so the current environment applies.

  etils caches whether to use TensorFlow for gs:// (read from EPATH_USE_TF at the first epath
  use of any path) and its fsspec filesystem; fsspec caches filesystem instances.
  """
  from etils.epath import backend, gpath  # pylint: disable=import-outside-toplevel
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].core.GCSFileSystem.clear_instance_cache()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_until_up(emulator: Emulator) -> bool:
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    if emulator.process.poll() is not None:
      return False
    try:
      with urllib.request.urlopen(emulator.url + "/", timeout=1) as response:
        return response.status == http.HTTPStatus.OK
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.05)
  return False


def _tail(path: pathlib.Path, lines: int = 30) -> str:
  return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _serve(port: int) -> None:
  """Runs the emulator in memory on 127.0.0.1:`port` until terminated, with objects.move added
  and the generation headers of a download.

  tensorstore (orbax's arrays) reads an object's generation from the `x-goog-generation` header
  of its download, as GCS sends it; the emulator leaves it out, and a read of an existing OCDBT
  manifest then fails with "Malformed StorageGeneration" (whenever a save reads one back).

  gcsfs renames with objects.move (POST .../o/SRC/moveTo/o/DST), which the emulator lacks: it
  answers 501, which gcsfs retries for about 30 s before it copies and deletes instead. Here
  the move is the emulator's own copy followed by its delete, as GCS does it in one call.
  """
  # pylint: disable=import-outside-toplevel,protected-access
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def move(request, response, storage, *args, **kwargs) -> None:
    del args, kwargs
    params = request.params
    bucket, source, target = params["bucket_name"], params["object_id"], params["dest_object_id"]
    try:
      moved = objects._copy(request.base_url, storage, bucket, source, bucket, target)
    except NotFound:
      response.status = http.HTTPStatus.NOT_FOUND
      return
    objects._delete(storage, bucket, source)
    response.json(moved)

  original_download = objects.download

  def download(request, response, storage, *args, **kwargs) -> None:
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
    except NotFound:
      pass  # the download answers 404 itself
    original_download(request, response, storage, *args, **kwargs)

  objects.download = download  # objects.get (alt=media) calls it by this name
  handlers = tuple((regex, {method: download if handler is original_download else handler
                            for method, handler in methods.items()})
                   for regex, methods in server.HANDLERS)
  route = (rf"^{server.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/"
           r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  server.HANDLERS = ((route, {server.POST: move}),) + handlers
  threading.Thread(target=_exit_with_parent, daemon=True).start()
  server.create_server("127.0.0.1", port, in_memory=True).run()


def _exit_with_parent() -> None:
  """Ends the emulator when the test process is gone (killed before the fixture stopped it)."""
  parent = os.getppid()
  while os.getppid() == parent:
    time.sleep(1)
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  _serve(int(sys.argv[1]))  # started by start_emulator
