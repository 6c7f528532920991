"""Files on local disks and on Cloud Storage (`gs://...`): every file this project writes or
reads goes through here, on `etils.epath` (the path library orbax already uses).

Local paths and URLs are both plain strings at the API (what flags and configs hold); `path()`
turns one into an `epath.Path`. The guarantees, on both:
  - `write_bytes`/`write_text` never leave half a file under the final name: locally the data
    goes to a temporary name in the same folder (fsynced) and is renamed (or hard-linked, when
    an existing file must not be replaced); a Cloud Storage object is replaced in one piece by
    its upload, so it is written directly.
  - `append_text` adds to a file; Cloud Storage objects cannot be appended to, so there the
    object is read and written back whole (fine for logs of a few MB).
  - A refused write (a full disk, a quota) raises OSError naming the file.
With TensorFlow installed, epath reaches `gs://` through TensorFlow's GCS client, else through
gcsfs; `EPATH_USE_TF=false` picks gcsfs (the tests do, to reach a local emulator). TensorFlow is
then imported at the first URL, by `logs.import_tensorflow` (quietly, off the GPUs), before epath
would import it itself; local paths never import it.
"""
import concurrent.futures
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from typing import Optional, Sequence, Union

from etils import epath

from dit_jax import logs

PathLike = Union[str, os.PathLike]


def _no_listing_cache() -> None:
  """gcsfs caches folder listings per process and refreshes them only on its own writes; orbax
  writes checkpoints through tensorstore, so a cached listing would miss the newest steps."""
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def is_local(name: PathLike) -> bool:
  """Whether `name` is a local path rather than a URL (`gs://bucket/...`)."""
  return "://" not in os.fspath(name)


def bucket_of(url: str) -> str:
  """`gs://bucket` of `gs://bucket/some/object`."""
  scheme, rest = url.split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def absolute(name: PathLike) -> str:
  """A local path made absolute (orbax wants that); a URL unchanged."""
  name = os.fspath(name)
  return os.path.abspath(name) if is_local(name) else name.rstrip("/")


def path(name: PathLike) -> epath.Path:
  """`name` as an `epath.Path`, for reading or writing it (see the module docstring)."""
  if not is_local(name) and "tensorflow" not in sys.modules and _epath_uses_tensorflow():
    logs.import_tensorflow()
  return epath.Path(name)


def _epath_uses_tensorflow() -> bool:
  """Whether epath reaches URLs through TensorFlow when it is installed (its EPATH_USE_TF)."""
  return os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")


def join(name: PathLike, *parts: str) -> str:
  """`name/part/...` as a string, for a local path or a URL."""
  return os.fspath(epath.Path(name).joinpath(*parts))


def exists(name: PathLike) -> bool:
  return path(name).exists()


def is_dir(name: PathLike) -> bool:
  return path(name).is_dir()


def listdir(name: PathLike) -> list[str]:
  """The names in folder `name`, sorted."""
  return sorted(p.name for p in path(name).iterdir())


def makedirs(name: PathLike) -> None:
  path(name).mkdir(parents=True, exist_ok=True)


def remove_tree(name: PathLike) -> None:
  path(name).rmtree()


def rename(source: PathLike, target: PathLike) -> None:
  """Moves a file or a folder (on Cloud Storage: a copy of each object, then its deletion)."""
  path(source).rename(path(target))


def read_bytes(name: PathLike) -> bytes:
  return path(name).read_bytes()


def read_text(name: PathLike) -> str:
  return path(name).read_text()


def _named(error: OSError, name: PathLike) -> OSError:
  """`error`, naming the file (a failed `write` or `close` alone does not)."""
  if error.filename:
    return error
  named = OSError(error.errno, error.strerror, os.fspath(name))
  named.__cause__ = error
  return named


def write_bytes(name: PathLike, data: bytes, overwrite: bool = True) -> None:
  """Writes `data` as the file `name`, whole or not at all (see the module docstring).

  overwrite: False raises FileExistsError if `name` exists (locally atomic: of two writers,
    exactly one wins; on Cloud Storage checked just before the upload).
  """
  if not is_local(name):
    target = path(name)
    if not overwrite and target.exists():
      raise FileExistsError(f"refusing to overwrite existing file {name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  name = os.fspath(name)
  folder = os.path.dirname(os.path.abspath(name))
  os.makedirs(folder, exist_ok=True)
  # Not mkstemp: its 0600 would become the file's mode; this one honours the umask.
  tmp = os.path.join(folder, f".{os.path.basename(name)}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the content on disk before the name appears
    except OSError as e:
      raise _named(e, name) from e
    if overwrite:
      os.replace(tmp, name)
    else:
      try:
        os.link(tmp, name)  # fails if `name` exists: never replaces another writer's file
      except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file {name}") from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_text(name: PathLike, text: str, overwrite: bool = True) -> None:
  write_bytes(name, text.encode(), overwrite=overwrite)


def append_text(name: PathLike, text: str) -> None:
  """Adds `text` at the end of file `name` (created if missing)."""
  if not is_local(name):
    target = path(name)
    old = target.read_bytes() if target.exists() else b""
    target.write_bytes(old + text.encode())
    return
  try:
    with open(name, "a") as f:
      f.write(text)
  except OSError as e:
    raise _named(e, name) from e


def size(name: PathLike) -> int:
  """The size of file `name` in bytes."""
  return int(path(name).stat().length)


def remove(name: PathLike) -> None:
  """Deletes file `name`."""
  path(name).unlink()


def remove_empty_dir(name: PathLike) -> None:
  """Deletes folder `name` if it is empty, else raises OSError (ENOTEMPTY): never deletes a file
  its caller does not know of. A Cloud Storage folder is only the prefix of its objects: it is
  gone with the last one, so there is nothing left to delete."""
  if is_local(name):
    os.rmdir(name)
  elif is_dir(name) and listdir(name):
    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), os.fspath(name))


def copy_file(source: PathLike, target: PathLike, overwrite: bool = True) -> None:
  """Copies file `source` to `target` (each a local path or a URL) as `write_bytes` writes: whole
  or not at all. Through memory, so for files up to a few hundred MB (a latent chunk, a VAE)."""
  data = read_bytes(source)
  write_bytes(target, data, overwrite=overwrite)
  if size(target) != len(data):  # a short upload must not pass for a copy
    raise OSError(errno.EIO, f"copied {len(data)} bytes but {size(target)} arrived",
                  os.fspath(target))


def move_to(local: str, target: PathLike) -> None:
  """Moves the finished local file `local` to `target`, whole or not at all: renamed when
  `target` is on the same local file system, else copied (`copy_file`) and deleted. For files
  that a library writes only locally (ArrayRecord's writer) but that belong on Cloud Storage."""
  if is_local(target):
    try:
      os.replace(local, target)
      return
    except OSError as e:
      if e.errno != errno.EXDEV:
        raise
  copy_file(local, target)
  os.unlink(local)


def cache_dir(name: PathLike, root: Optional[str] = None, version: str = "") -> str:
  """The local folder for copies of the files of URL `name`: `root` (default: a `dit_jax_cache`
  folder in the system's temporary directory) / `<last part of the URL>-<hash>`, the hash of the
  URL and `version` (what tells two contents of one URL apart), so that two URLs never share a
  copy and the same URL finds its copy again."""
  name = absolute(name)
  root = root or os.path.join(tempfile.gettempdir(), "dit_jax_cache")
  digest = hashlib.sha256(f"{name}\n{version}".encode()).hexdigest()[:16]
  return os.path.join(root, f"{os.path.basename(name) or 'root'}-{digest}")


def copy_to_local(folder: PathLike, names: Sequence[str], local_dir: str,
                  num_threads: int = 8) -> list[str]:
  """Makes `local_dir` hold the files `names` of `folder` (for readers that open only local
  files, e.g. ArrayRecord's C++ reader); returns the names it copied (none: all were there).

  A file already in `local_dir` with the original's size is kept (a complete copy is reused);
  any other is copied (`copy_file`: to a temporary name, renamed, its size checked). Every
  process copies what it lacks itself: processes of one host sharing `local_dir` are safe, as
  each rename puts a whole file. Raises OSError (ENOSPC) before copying anything when the local
  disk lacks the room.
  """
  os.makedirs(local_dir, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    sizes = dict(zip(names, pool.map(lambda n: size(join(folder, n)), names)))

    def present(name: str) -> bool:
      local = os.path.join(local_dir, name)
      return os.path.isfile(local) and os.path.getsize(local) == sizes[name]

    todo = [name for name in names if not present(name)]
    needed = sum(sizes[name] for name in todo)
    free = shutil.disk_usage(local_dir).free
    if needed > free:
      raise OSError(errno.ENOSPC, f"copying {folder} needs {needed / 1e9:.1f} GB, "
                    f"{free / 1e9:.1f} GB are free", local_dir)
    # list(): waits for every copy and raises the first copy's error.
    list(pool.map(lambda n: copy_file(join(folder, n), os.path.join(local_dir, n)), todo))
  return todo
