"""Prepares a tfds dataset as array_record files, the format the input pipeline reads by index.

  python -m dit_jax.data.prepare imagenet2012 --data_dir DATA_DIR

ImageNet (the paper's data): put `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` (from
https://image-net.org/download-images) in `DATA_DIR/downloads/manual` (or pass `--manual_dir`);
this writes `DATA_DIR/imagenet2012/5.1.0/` with tfds's own `imagenet2012` builder (its labels,
its validation label file, its CMYK/PNG fixes), without apache_beam, which `tfds build` needs and
requirements.txt leaves out. Any other tfds name works too (those without a manual download are
downloaded by tfds).

Safe to rerun: a prepared dataset is reported and left alone; tfds builds into an
`incomplete.*` folder renamed at the end, so an interrupted run leaves nothing that could be
read, and the next run removes that folder and starts the build again (tfds cannot resume one).
The tars are checked before anything is written or TensorFlow is imported.

DATA_DIR (and --manual_dir) may be gs:// URLs: tfds reads and writes them through TensorFlow.
There, no lock keeps a second preparation of the same dataset out (Cloud Storage has no
flock): run one at a time.
"""
import contextlib
import difflib
import fcntl
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import time
from typing import Any, Iterator, Optional, Sequence
from urllib import parse

from absl import flags

from dit_jax import cli, fs
from dit_jax.data.tfds_source import default_data_dir

# The files tfds's imagenet2012 builder reads from its manual_dir, and what their members look
# like (the train tar holds one tar per class, named by its WordNet id).
IMAGENET = "imagenet2012"
IMAGENET_TARS = (("ILSVRC2012_img_train.tar", re.compile(r"n\d{8}\.tar"), "n01440764.tar"),
                 ("ILSVRC2012_img_val.tar", re.compile(r"ILSVRC2012_val_\d{8}\.JPEG"),
                  "ILSVRC2012_val_00000001.JPEG"))
IMAGENET_TEST_TAR = "ILSVRC2012_img_test.tar"  # optional (unlabelled): the builder skips it.
IMAGENET_URL = "https://image-net.org/download-images"
FILE_FORMAT = "array_record"
LOCK_NAME = ".prepare.lock"


def manual_dir_of(data_dir: str) -> str:
  """tfds's default manual_dir: `DATA_DIR/downloads/manual`."""
  return fs.join(data_dir, "downloads", "manual")


def is_imagenet(name: str) -> bool:
  """Whether tfds name `name` ("imagenet2012", "imagenet2012:5.1.0") is ImageNet-1k."""
  return name.split(":")[0].split("/")[0] == IMAGENET


def check_imagenet_tars(manual_dir: str) -> None:
  """Raises a `UserError` unless both ImageNet tars are in `manual_dir` and look right.

  Reads only the first member header of each tar (cheap even for the 138 GB train tar).
  """
  names = [name for name, _, _ in IMAGENET_TARS]
  missing = [name for name in names if not fs.exists(fs.join(manual_dir, name))]
  if missing:
    what = ("no such folder" if not fs.is_dir(manual_dir) else
            "both are missing" if len(missing) == 2 else f"{missing[0]} is missing")
    raise cli.UserError(
        f"{IMAGENET} needs {' and '.join(names)} in {manual_dir} ({what}): download them from "
        f"{IMAGENET_URL} (registration needed) and put them there, or pass --manual_dir DIR")
  for name, member_pattern, example in IMAGENET_TARS:
    path = fs.join(manual_dir, name)
    try:
      with fs.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        first = tar.next()
    except (tarfile.TarError, OSError) as e:
      raise cli.UserError(f"{path} is not a readable tar file (an incomplete download?): "
                          f"{e}") from e
    if first is None or not member_pattern.fullmatch(os.path.basename(first.name)):
      found = "nothing" if first is None else repr(first.name)
      raise cli.UserError(f"{path} is not ImageNet's {name}: its first member is {found}, "
                          f"expected names like {example}")


def check_free_space(data_dir: str, manual_dir: str) -> None:
  """A `UserError` unless `data_dir`'s disk has room for ImageNet's records: about the tars'
  size, as they hold the tars' JPEG bytes unchanged (tfds cannot check: it does not know
  imagenet2012's size; the temporary shuffle buckets are deleted as the shards are written).
  A Cloud Storage data_dir has no disk to fill: nothing to check."""
  if not fs.is_local(data_dir):
    return
  needed = sum(fs.size(fs.join(manual_dir, name)) for name, _, _ in IMAGENET_TARS)
  existing = data_dir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  if free < needed:
    raise cli.UserError(f"{IMAGENET} needs about {needed / 1e9:.1f} GB free in {data_dir} (its "
                        f"records hold the tars' JPEG bytes), which has {free / 1e9:.1f} GB")


@contextlib.contextmanager
def exclusive_lock(directory: str) -> Iterator[None]:
  """Holds `directory/.prepare.lock`: a second preparation of the same dataset is refused
  (on a local disk; Cloud Storage has no flock, see the module docstring)."""
  if not fs.is_local(directory):
    yield
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, LOCK_NAME), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise cli.UserError(f"another preparation is running in {directory} (it holds "
                          f"{LOCK_NAME}); wait for it to finish") from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def remove_incomplete(dataset_dir: str, version: str) -> list[str]:
  """Deletes the `incomplete.<random suffix>_<version>` folders of interrupted runs (hold the
  lock)."""
  if not fs.is_dir(dataset_dir):
    return []
  stale = [fs.join(dataset_dir, name) for name in fs.listdir(dataset_dir)
           if re.fullmatch(rf"incomplete\.\w+_{re.escape(version)}", name)]
  for path in stale:
    fs.remove_tree(path)
  return stale


class _DropAbsentImagenetTestSplit(logging.Filter):
  """The builder warns when the optional test tar is absent; the summary says it instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (str(record.msg).startswith("ImageNet 2012 Challenge %s split not found")
                and record.args and str(record.args[0]) == "test")


def check_name(name: str) -> None:
  """A `UserError` naming the closest tfds dataset unless tfds has `name` (no TF import).

  Checked against tfds's own list: for an unknown name, tfds.builder looks on GCS.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base = name.split(":")[0].split("/")[0]
  known = tfds.list_builders(with_community_datasets=False)
  if base not in known:
    close = difflib.get_close_matches(base, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise cli.UserError(f"no tfds dataset named {base!r}{hint}")


# A download through a proxy needs no name resolution here.
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
                    "ALL_PROXY")
# Where tfds keeps its own copies of many datasets' files (MNIST's among them).
_TFDS_MIRROR = "storage.googleapis.com"


def check_online(name: str, homepage: str, dataset_dir: str) -> None:
  """A `UserError` when tfds must download `name` and this machine reaches neither the
  dataset's homepage host nor tfds's mirror (a name it cannot resolve, a connection refused or
  timing out after 5 s).

  Offline, tfds's downloader retries each file for about 200 s (urllib3's backoff over ten
  tries) before failing with a traceback, and leaves its temporary files in DATA_DIR/downloads;
  this says so before anything is written. Skipped when a proxy is set in the environment
  (the proxy makes the connections).
  """
  if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
    return
  errors = []
  for host in dict.fromkeys(filter(None, (parse.urlparse(homepage or "").hostname,
                                          _TFDS_MIRROR))):
    try:
      socket.create_connection((host, 443), timeout=5).close()
      return
    except OSError as e:
      errors.append(f"{host}: {getattr(e, 'strerror', None) or e or type(e).__name__}")
  raise cli.UserError(
      f"tfds must download {name}, but this machine cannot reach its servers "
      f"({'; '.join(errors)}): it looks offline. Prepare it where there is a network and copy "
      f"its folder to {dataset_dir} (or set HTTPS_PROXY)")


def _splits(builder: Any) -> str:
  return ", ".join(f"{split} {info.num_examples:,}" for split, info in
                   sorted(builder.info.splits.items()))


def _size(path: str) -> str:
  if not fs.is_local(path):
    return "size not counted on Cloud Storage"
  total = sum(os.path.getsize(os.path.join(root, f))
              for root, _, files in os.walk(path) for f in files)
  return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.2f} MB"


def prepare(name: str, data_dir: str, manual_dir: Optional[str] = None) -> Any:
  """Builds tfds dataset `name` in `data_dir` as array_record files; returns the builder.

  Prints what it does to stderr; tfds shows progress bars per split. Raises `UserError` for a
  mistake in the input (missing or wrong tars, an unknown name, a tfrecord copy in the way).
  """
  manual_dir = manual_dir or manual_dir_of(data_dir)
  check_name(name)
  imagenet = is_imagenet(name)
  if imagenet:
    check_imagenet_tars(manual_dir)  # before TensorFlow is imported or anything written
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with cli.user_errors(ValueError, AssertionError):  # a config or version it does not have
    builder = tfds.builder(name, data_dir=data_dir)
  # (tfds's is_prepared() warns about a folder that does not exist yet: look first.)
  info_file = fs.join(os.fspath(builder.data_dir), "dataset_info.json")
  if fs.exists(info_file) and builder.is_prepared():
    stored = getattr(builder.info.file_format, "value", builder.info.file_format)
    if stored not in (FILE_FORMAT, "parquet"):
      raise cli.UserError(
          f"{builder.data_dir} holds {name} as {stored} files, which cannot be read by index: "
          f"move or delete that folder (or pass another --data_dir) and rerun")
    print(f"{name} {builder.version} is already prepared in {builder.data_dir} ({stored}): "
          f"{_splits(builder)}; nothing to do", file=sys.stderr)
    return builder
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual and not (fs.is_dir(manual_dir) and fs.listdir(manual_dir)):
    raise cli.UserError(f"{name} needs a manual download in {manual_dir}, which is missing or "
                        f"empty. tfds says: {manual}")
  if imagenet:
    check_free_space(data_dir, manual_dir)
  dataset_dir = os.path.dirname(os.fspath(builder.data_dir))
  if not manual:
    check_online(name, builder.info.homepage, dataset_dir)
  with exclusive_lock(dataset_dir):
    for path in remove_incomplete(dataset_dir, str(builder.version)):
      print(f"removed {path}, left by an interrupted run", file=sys.stderr)
    source = f"from {manual_dir}" if manual else "(tfds downloads it)"
    print(f"preparing {name} {builder.version} in {builder.data_dir} {source}", file=sys.stderr)
    if imagenet and not fs.exists(fs.join(manual_dir, IMAGENET_TEST_TAR)):
      print(f"no {IMAGENET_TEST_TAR} there: no test split (it is unlabelled; DiT does not use "
            f"it)", file=sys.stderr)
    if manual:  # tfds prints "Downloading and preparing dataset Unknown size ...": ours say it
      # pylint: disable-next=protected-access
      builder._log_download_bytes = builder._log_download_done = lambda: None
    start = time.monotonic()
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    absl_logger = logging.getLogger("absl")
    drop = _DropAbsentImagenetTestSplit()
    absl_logger.addFilter(drop)
    try:
      # A file that stops being a tar halfway, a full disk: the user's to fix.
      with cli.user_errors(OSError, tarfile.TarError):
        builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)
    finally:
      absl_logger.removeFilter(drop)
  minutes = (time.monotonic() - start) / 60
  print(f"{name} {builder.version} ready in {builder.data_dir} ({FILE_FORMAT}, "
        f"{_size(os.fspath(builder.data_dir))}): {_splits(builder)}; {minutes:.1f} min",
        file=sys.stderr)
  return builder


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined in `values` (the program's own, see `cli.parse_flags`);
  the dataset name is its one positional argument."""
  flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets); train with --config.data.data_dir=DATA_DIR",
                      flag_values=values)
  flags.DEFINE_string("manual_dir", None, "where the manual download is (default: "
                      "DATA_DIR/downloads/manual)", flag_values=values)
  flags.DEFINE_bool("verbose", False, "keep the libraries' INFO logs", flag_values=values)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line from Python: `argv` (default: sys.argv[1:]), errors as one line."""
  cli.run(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> None:
  _run(*cli.parse_flags(define_flags, argv, "dit_jax.data.prepare"))


def _run(values: flags.FlagValues, argv: Sequence[str]) -> None:
  from dit_jax import logs  # pylint: disable=g-import-not-at-top
  logs.setup(verbose=values.verbose)
  if len(argv) != 2:
    what = "unexpected arguments: " + " ".join(argv[2:]) if argv[2:] else "no dataset name"
    raise cli.UserError(f"{what}: give one tfds dataset name, e.g. python -m "
                        "dit_jax.data.prepare imagenet2012 --data_dir DATA_DIR")
  name = argv[1]
  data_dir = fs.absolute(os.path.expanduser(values.data_dir or default_data_dir()))
  manual_dir = fs.absolute(os.path.expanduser(values.manual_dir)) if values.manual_dir else None
  if manual_dir and not fs.is_dir(manual_dir):
    raise cli.UserError(f"--manual_dir: no directory {manual_dir}")
  if fs.is_local(data_dir) and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise cli.UserError(f"--data_dir: {data_dir} is a file, not a directory")
  check_name(name)  # these two are fast: before TensorFlow loads
  if is_imagenet(name):
    check_imagenet_tars(manual_dir or manual_dir_of(data_dir))
  logs.setup(verbose=values.verbose, tensorflow=True)  # tfds needs it: load it without INFO lines
  try:
    prepare(name, data_dir, manual_dir)
  except KeyboardInterrupt:
    raise cli.UserError("interrupted: the partial build was removed; rerun the same command "
                        "to start it again") from None


if __name__ == "__main__":
  define_flags()
  cli.run_absl(lambda argv: _run(flags.FLAGS, argv))
