"""gs:// against a local GCS emulator (the `gcs_bucket` fixture, tests/gcs_emulator.py).

What works there: epath files and folders through gcsfs, and our orbax checkpoints (arrays
through tensorstore), in this process and in a subprocess. What differs from a local disk is
pinned here too: GCS has no append and no empty folders.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from dit_jax.train.checkpointing import Checkpointer


def test_epath_files(gcs_bucket):
  run = epath.Path(gcs_bucket) / "run"
  notes = run / "notes.txt"
  assert not notes.exists()
  notes.write_text("step 1\n")
  (run / "config.json").write_text("{}")
  assert notes.read_text() == "step 1\n"
  assert notes.is_file() and run.is_dir()
  assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.txt"]
  assert [str(p) for p in run.glob("*.txt")] == [f"{gcs_bucket}/run/notes.txt"]

  notes.rename(run / "renamed.txt")  # gcsfs: objects.move (tests/gcs_emulator.py adds it)
  assert not notes.exists()
  assert (run / "renamed.txt").read_text() == "step 1\n"
  with pytest.raises(FileExistsError):
    (run / "renamed.txt").rename(run / "config.json")
  with pytest.raises(FileNotFoundError):
    (run / "missing.txt").read_text()


def test_epath_folders(gcs_bucket):
  root = epath.Path(gcs_bucket)
  source = root / "source"
  (source / "sub").mkdir(parents=True)
  (source / "a.txt").write_text("a")
  (source / "sub" / "b.txt").write_text("b")

  source.rename(root / "target")  # every object under the prefix is moved
  assert not source.exists()
  assert sorted(p.name for p in (root / "target").iterdir()) == ["a.txt", "sub"]
  assert (root / "target" / "sub" / "b.txt").read_text() == "b"

  (root / "target").rmtree()
  assert not (root / "target").exists()
  assert not list(root.iterdir())


def test_epath_mkdir_makes_nothing_on_gcs(gcs_bucket):
  """GCS has no folders, only name prefixes: mkdir succeeds and leaves nothing behind, so
  `exists()` after `mkdir()` is False until a file is written under the folder."""
  folder = epath.Path(gcs_bucket) / "empty"
  folder.mkdir()
  assert not folder.exists()
  (folder / "file").write_text("x")
  assert folder.is_dir()


def test_epath_append_overwrites_on_gcs(gcs_bucket):
  """gcsfs has no append: open('a') warns and then overwrites the file."""
  log = epath.Path(gcs_bucket) / "log.txt"
  log.write_text("one\n")
  with pytest.warns(UserWarning, match="Append mode 'a' is not supported"):
    with log.open("a") as f:
      f.write("two\n")
  assert log.read_text() == "two\n"


def _state(seed: int) -> dict:
  """Random bits in every position (a bit flip anywhere shows), in three dtypes."""
  rng = np.random.default_rng(seed)
  return {
      "params": {"w": jnp.asarray(rng.standard_normal((3, 5), np.float32)),
                 "w_bf16": jnp.asarray(rng.standard_normal((4,), np.float32), jnp.bfloat16)},
      "step": jnp.asarray(seed, jnp.int32),
  }


def test_checkpoint_save_restore_and_steps(gcs_bucket):
  """Our checkpoints (async orbax: StandardSave state + JSON config) on gs://, keep=2."""
  directory = f"{gcs_bucket}/ckpt"
  config = {"model": {"depth": 2}, "run": {"seed": 7}}
  writer = Checkpointer(directory, keep=2, keep_period=None, async_save=True)
  try:
    for step in (1, 2, 3):
      assert writer.save(step, _state(step), config)
    writer.wait()
  finally:
    writer.close()

  reader = Checkpointer(directory, keep=2, keep_period=None)
  try:
    assert reader.manager.all_steps() == [2, 3]  # step 1 deleted from the bucket (keep=2)
    assert reader.latest_step() == 3
    assert reader.saved_config(3) == config
    expected = _state(3)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, expected)
    restored = reader.restore(3, abstract)
  finally:
    reader.close()
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  assert not epath.Path(directory, "1").exists()


def test_subprocess_inherits_the_emulator(gcs_bucket):
  """A subprocess (as train.py would be) lists steps and reads arrays written here."""
  directory = f"{gcs_bucket}/ckpt"
  with ocp.CheckpointManager(directory) as manager:
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(5))))
    manager.wait_until_finished()
  code = textwrap.dedent("""
      import sys
      import numpy as np
      import orbax.checkpoint as ocp
      from etils import epath
      epath.Path(sys.argv[2], "from_subprocess.txt").write_text("ok")
      with ocp.CheckpointManager(sys.argv[1]) as manager:
        state = manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        print(manager.all_steps(), np.asarray(state["state"]["params"]["w"]).tobytes().hex())
      """)
  result = subprocess.run([sys.executable, "-c", code, directory, gcs_bucket], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy(), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  steps, w_hex = result.stdout.splitlines()[-1].rsplit(" ", 1)
  assert steps == "[5]"
  assert w_hex == np.asarray(_state(5)["params"]["w"]).tobytes().hex()
  assert epath.Path(gcs_bucket, "from_subprocess.txt").read_text() == "ok"
