"""One line per user error: the error handling shared by the command-line programs.

A `UserError` is a mistake in what the user asked for (a flag, a config key, a path, a file).
`run` reports it as `error: <message>` on one line of stderr and exits with status 1, without a
traceback; any other exception is a bug and keeps its traceback. With `DIT_VERBOSE=1` in the
environment, user errors show their traceback too (and the exception they came from).

The programs raise user errors before any expensive work and before writing anything. All six
take absl flags: `run_absl(main)` (`train.py`, `sample.py`, `python -m dit_jax.{evaluate,
convert,data.prepare,latents.extract}`) also turns flag errors into one line, and checks
`--config.KEY=...` overrides against the config file, naming the closest existing key
(`config: no key 'sample.cfg'; did you mean 'sample.cfg_scale'?`). `evaluate`, `convert` and
`data.prepare` can also be called from Python (`main(argv)`, as tests do, any number of times in
one process): `parse_flags` parses their flags, defined by their `define_flags(values)`, into a
FlagValues of their own, so they never clash with another program's flags.
"""
import contextlib
import difflib
import errno
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from dit_jax import host_memory

VERBOSE_ENV = "DIT_VERBOSE"  # set to 1: tracebacks for user errors too
CONFIG_FLAG = "config"  # the name of the programs' config file flag


class UserError(Exception):
  """A mistake in the user's input, reported as one line without a traceback."""


class WriteError(UserError):
  """An output could not be written (a full disk, a quota, a read-only or lost mount)."""


# The errors of a write that the machine refused, rather than of a bug.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


@contextlib.contextmanager
def write_errors() -> Iterator[None]:
  """Re-raises an OSError of a refused write (see WRITE_ERRNOS) as a WriteError naming the file.

  The writers name their file in the OSError (`OSError(errno, strerror, path)`): a failed
  `write` or `close` alone does not.
  """
  try:
    yield
  except OSError as e:
    if e.errno not in WRITE_ERRNOS:
      raise
    where = f" {e.filename}" if e.filename else ""
    raise WriteError(f"could not write{where}: {e.strerror} (errno {e.errno}); stopping") from e


def verbose() -> bool:
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
  """Re-raises exceptions of `types` (default: ValueError, OSError) as `UserError`.

  For a block that only validates input (config values, paths, file formats): its failures
  are the user's to fix. The original exception stays attached as the cause.
  """
  try:
    yield
  except UserError:
    raise
  except (types or (ValueError, OSError)) as e:
    raise UserError(str(e) or type(e).__name__) from e


def check_new_output(flag: str, path: str) -> None:
  """A `UserError` unless `path` (a local path or a `gs://` URL) can become a new output file:
  it must not exist (outputs are never overwritten), and its local folder, or its bucket, must.
  (A Cloud Storage folder is only a prefix: it needs no creating.)"""
  from dit_jax import fs  # pylint: disable=import-outside-toplevel
  if fs.exists(path):
    raise UserError(f"{flag}: {path} already exists; refusing to overwrite it")
  if fs.is_local(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise UserError(f"{flag}: no directory {folder}")
    return
  bucket = fs.bucket_of(path)
  if not fs.exists(bucket):
    raise UserError(f"{flag}: no bucket {bucket} (or no access to it)")


def python_command() -> str:
  """The interpreter running this program, as a command to print for the user: relative to the
  current directory when it lies under it (`.venv/bin/python` from the repository root, which
  works in a fresh shell where a bare `python` may lack the packages), else its full path."""
  executable = sys.executable or "python3"
  relative = os.path.relpath(executable)
  return relative if not relative.startswith("..") else executable


def import_torch(what: str) -> Any:
  """torch, or a user error saying how to install it (requirements.txt leaves it out)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"{what} needs PyTorch, which requirements.txt leaves out: install it with "
                    ".venv/bin/pip install -r requirements-dev.txt") from e
  return torch


def _exit_with_error(message: str) -> None:
  """`error: <message>` on stderr, on one line whatever the message holds; exit status 1."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def run(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls `main`; a `UserError`, or a JAX backend that cannot start (JAX_PLATFORMS), becomes
  `error: <message>` on stderr and exit status 1, a Ctrl-C that the program did not handle
  itself one line and exit status 130."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    if verbose():
      raise
    _exit_with_error(str(e))
  except RuntimeError as e:  # JAX_PLATFORMS names a backend this machine cannot start
    if verbose() or not str(e).startswith("Unable to initialize backend"):
      raise
    platforms = os.environ.get("JAX_PLATFORMS")
    _exit_with_error(f"JAX_PLATFORMS={platforms}: {e}" if platforms else str(e))
  except KeyboardInterrupt:
    if verbose():
      raise
    print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    sys.exit(130)


def run_absl(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with one-line flag and config errors (see the module docstring).

  First, before anything starts JAX, a CPU-only run keeps the host memory XLA frees for its
  next step (`host_memory.retain_freed_memory`).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  host_memory.retain_freed_memory()
  run(app.run, main, flags_parser=parse_absl_flags)


def parse_flags(define_flags: Callable[[Any], None], argv: Optional[Sequence[str]],
                program: str) -> tuple[Any, list[str]]:
  """A program's flags, parsed as `run_absl` parses them, for calling it from Python.

  Args:
    define_flags: defines the program's flags in the `absl.flags.FlagValues` it is given.
    argv: the command line after the program's name (None: `sys.argv[1:]`).
    program: the program's name, argv[0] of what is returned.
  Returns:
    (a new FlagValues holding only the program's flags, parsed; `[program, *positionals]`).
  Raises:
    UserError: a flag error (unknown, malformed, missing), as the command line reports it.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  define_flags(values)
  try:
    return values, values([program, *(sys.argv[1:] if argv is None else argv)])
  except flags.Error as e:
    raise UserError(str(e)) from e


def define_distributed_flags() -> None:
  """The flags of a multi-process run that the environment does not describe."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def start_distributed() -> None:
  """Starts this process: JAX's distributed runtime from `define_distributed_flags`' flags, or
  from the environment with DIT_DISTRIBUTED=auto (TPU pods, SLURM); logs the process and its
  devices. Call after absl parsed the flags (XLA_FLAGS). TensorFlow is not imported here: the
  code that needs it imports it with the accelerators hidden (`logs.import_tensorflow`)."""
  import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  if flag_values.coordinator_address:
    check_distributed_flags(flag_values.coordinator_address, flag_values.num_processes,
                            flag_values.process_id)
    jax.distributed.initialize(flag_values.coordinator_address, flag_values.num_processes,
                               flag_values.process_id)
  elif os.environ.get("DIT_DISTRIBUTED") == "auto":
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # no cluster in the environment to join
      raise UserError(f"DIT_DISTRIBUTED=auto: JAX found no multi-process environment to join "
                      f"({e}); unset it on one machine, or pass --coordinator_address, "
                      "--num_processes and --process_id") from e
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())


def check_distributed_flags(address: str, num_processes: Optional[int],
                            process_id: Optional[int]) -> None:
  """`UserError` unless the flags describe a process of a multi-process run."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address: expected host:port, got {address!r}")
  if num_processes is None or process_id is None:
    raise UserError("--coordinator_address needs --num_processes and --process_id too")
  if num_processes < 1:
    raise UserError(f"--num_processes: must be positive, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id: must be in [0, {num_processes}) for --num_processes="
                    f"{num_processes}, got {process_id}")


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """Parses absl flags after checking the config files and overrides they name."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  values = flags.FLAGS
  if CONFIG_FLAG in values:  # the programs' `config_flags.DEFINE_config_file("config", ...)`
    check_config_flag(values.read_flags_from_files(list(argv), force_gnu=False), CONFIG_FLAG)
  try:
    return values(list(argv))
  except flags.Error as e:
    raise UserError(str(e)) from e


def check_config_flag(argv: Sequence[str], name: str = "config") -> None:
  """Loads the config file `--name` names and checks every `--name.KEY` override exists."""
  spec = _flag_value(argv, name)
  if spec is None:
    return  # absl reports a missing required flag itself.
  config = load_config_file(spec, name)
  prefix = re.compile(rf"^--?(no)?{re.escape(name)}\.")
  for arg in argv:
    if arg == "--":
      break
    match = prefix.match(arg)
    if match:
      check_config_key(config, arg[match.end():].split("=", 1)[0], name)


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The last value of `--name=VALUE` or `--name VALUE` in argv (None: not given)."""
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    for dashes in ("-", "--"):
      if arg.startswith(f"{dashes}{name}="):
        value = arg.split("=", 1)[1]
      elif arg == f"{dashes}{name}" and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def load_config_file(spec: str, name: str = "config") -> Any:
  """`get_config([arg])` of a config file given as `path[:arg]`, as ml_collections calls it."""
  _, colon, arg = spec.partition(":")
  module = load_config_module(spec, name)
  try:
    return module.get_config(arg) if colon else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    # The config file is the user's code, and its argument the user's input.
    raise UserError(f"--{name}={spec}: {type(e).__name__}: {e}") from e


def load_config_module(spec: str, name: str = "config") -> Any:
  """The module of a config file given as `path[:arg]`, imported from its path (as
  ml_collections imports it), for what it defines besides `get_config` (a sweep's `get_hyper`)."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise UserError(f"--{name}: no such file {path!r}")
  try:
    module_spec = importlib.util.spec_from_file_location(f"_{name}_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--{name}={spec}: {type(e).__name__}: {e}") from e
  return module


def config_keys(config: Any, prefix: str = "") -> list[str]:
  """Every key of a ConfigDict, nested ones dotted (`sample.cfg_scale`), sections included."""
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, "items") and hasattr(value, "lock"):  # a nested ConfigDict
      keys.extend(config_keys(value, f"{prefix}{key}."))
  return keys


def check_config_key(config: Any, key: str, name: str = "config") -> None:
  """Raises a `UserError` naming the closest existing key when `key` is not in `config`."""
  node = config
  for i, part in enumerate(key.split(".")):
    if "[" in part:
      return  # indexing into a sequence: ml_collections checks it.
    if not (hasattr(node, "items") and part in node):
      raise UserError(f"{name}: no key {key!r}{_suggestion(config, key, i)}")
    node = node[part]


def _suggestion(config: Any, key: str, depth: int) -> str:
  """`; did you mean 'x'?` for the closest key: a sibling first, else the same name in any
  section (`cfg_scale` -> `sample.cfg_scale`); empty when nothing is close."""
  parts = key.split(".")
  section = config
  for part in parts[:depth]:
    section = section[part]
  keys = config_keys(config)
  if hasattr(section, "keys"):
    siblings = list(section.keys())
    match = (difflib.get_close_matches(parts[depth], siblings, n=1)
             or [k for k in siblings if k.startswith(parts[depth]) or parts[depth].startswith(k)])
    if match:
      fixed = ".".join(parts[:depth] + match[:1])
      rest = ".".join([fixed] + parts[depth + 1:])  # the same path under the corrected name
      return f"; did you mean {rest if rest in keys else fixed!r}?"
  by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}  # the shallowest key per name
  match = difflib.get_close_matches(parts[-1], list(by_leaf), n=1)
  return f"; did you mean {by_leaf[match[0]]!r}?" if match else ""
