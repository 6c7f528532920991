"""dit_jax.fs on local paths: whole-or-nothing writes, no clobbering, appends, named errors.
(The same functions on gs:// run against the emulator in test_gcs.py.)"""
import os
import stat

import pytest

from dit_jax import cli, fs


def test_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "a" / "b" / "file.txt"
  fs.write_text(target, "first")
  fs.write_text(target, "second")
  assert target.read_text() == "second"
  assert os.listdir(target.parent) == ["file.txt"]


def test_write_honours_the_umask_not_mkstemps_0600(tmp_path):
  old = os.umask(0o022)
  try:
    fs.write_text(tmp_path / "f", "x")
  finally:
    os.umask(old)
  assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_no_overwrite_refuses_and_keeps_the_file(tmp_path):
  target = tmp_path / "grid.png"
  fs.write_bytes(target, b"one", overwrite=False)
  with pytest.raises(FileExistsError, match="grid.png"):
    fs.write_bytes(target, b"two", overwrite=False)
  assert target.read_bytes() == b"one" and os.listdir(tmp_path) == ["grid.png"]


def test_append_and_read(tmp_path):
  target = tmp_path / "log.jsonl"
  fs.append_text(target, "1\n")
  fs.append_text(target, "2\n")
  assert fs.read_text(target) == "1\n2\n" and fs.exists(target) and not fs.is_dir(target)


def test_a_refused_write_names_the_file_and_leaves_nothing(tmp_path):
  os.symlink("/dev/full", tmp_path / "full")
  with pytest.raises(OSError) as error:
    fs.append_text(tmp_path / "full", "x" * 100)
  assert error.value.filename == str(tmp_path / "full") and error.value.errno == 28
  with pytest.raises(cli.WriteError, match=f"could not write {tmp_path}"), cli.write_errors():
    fs.append_text(tmp_path / "full", "x")


def test_paths_and_urls():
  assert fs.is_local("runs/x") and not fs.is_local("gs://bucket/runs")
  assert fs.absolute("gs://bucket/runs/") == "gs://bucket/runs"
  assert fs.absolute("runs") == os.path.join(os.getcwd(), "runs")
  assert fs.join("gs://bucket/runs", "checkpoints", "7") == "gs://bucket/runs/checkpoints/7"


def test_rename_and_remove_folders(tmp_path):
  fs.write_text(tmp_path / "src" / "inner" / "f", "x")
  fs.rename(tmp_path / "src", tmp_path / "dst")
  assert fs.listdir(tmp_path) == ["dst"] and fs.read_text(tmp_path / "dst" / "inner" / "f") == "x"
  fs.remove_tree(tmp_path / "dst")
  assert fs.listdir(tmp_path) == []
