"""The atomic writer: files get the mode a plain open() gives them, and a failed write leaves nothing behind."""

import os
import stat

import numpy as np
import pytest

from alignrec_jax.data import atomic


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_of_a_plain_open_under_the_umask(tmp_path, mask):
  old = os.umask(mask)
  try:
    open(tmp_path / "plain.txt", "w", encoding="utf-8").close()
    atomic.write_json(str(tmp_path / "a.json"), {"a": 1})
    atomic.write_text(str(tmp_path / "a.md"), "# a\n")
    atomic.save_npy(str(tmp_path / "a.npy"), np.arange(3))
  finally:
    os.umask(old)
  for name in ("plain.txt", "a.json", "a.md", "a.npy"):  # 0o644, 0o664, 0o600: open()'s 0o666 less the umask
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask, name


def test_a_failure_mid_write_leaves_no_file_no_temporary_file_and_the_previous_file(tmp_path):
  with pytest.raises(RuntimeError):
    with atomic.atomic_open(str(tmp_path / "out.txt")) as f:
      f.write("half of it")
      raise RuntimeError("killed mid-write")
  path = str(tmp_path / "results.json")
  atomic.write_json(path, {"epoch": 1})
  with pytest.raises(TypeError):  # json.dump fails after it has written the first key
    atomic.write_json(path, {"epoch": 2, "bad": object()})
  assert os.listdir(tmp_path) == ["results.json"]
  assert open(path, encoding="utf-8").read() == '{\n  "epoch": 1\n}\n'  # indent 2 and a trailing newline


def test_save_npy_writes_the_exact_path(tmp_path):
  atomic.save_npy(str(tmp_path / "table.tmp"), np.eye(2, dtype=np.float32))  # np.save(path) would append .npy
  assert os.listdir(tmp_path) == ["table.tmp"]
  np.testing.assert_array_equal(np.load(tmp_path / "table.tmp"), np.eye(2))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_folder_replaces_the_old_one_whole_with_the_mode_of_makedirs_or_not_at_all(tmp_path, mask):
  target = tmp_path / "run"
  old = os.umask(mask)
  try:
    with atomic.atomic_dir(str(target)) as d:
      open(os.path.join(d, "a"), "w", encoding="utf-8").close()
    os.makedirs(tmp_path / "plain")
    with atomic.atomic_dir(str(target)) as d:  # replaces the first folder whole
      open(os.path.join(d, "b"), "w", encoding="utf-8").close()
    with pytest.raises(RuntimeError):
      with atomic.atomic_dir(str(target)) as d:
        open(os.path.join(d, "c"), "w", encoding="utf-8").close()
        raise RuntimeError("killed while filling it")
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path)) == ["plain", "run"] and os.listdir(target) == ["b"]
  assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o777 & ~mask
