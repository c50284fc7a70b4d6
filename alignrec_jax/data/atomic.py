"""The one atomic writer for the results, tables, models and folders the package leaves behind (and the one reader
of the JSON objects it writes).

A file (or folder) appears at its path only once completely written (a temporary one beside it, then a rename),
with the mode a plain open() (or os.makedirs) would give it under the process's umask: `tempfile.mkstemp` and
`mkdtemp` alone create 0600/0700, which hides results from the rest of the group. A failed write leaves neither
the new file nor its temporary one behind.
"""

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np


def _umask() -> int:
  mask = os.umask(0o022)  # read the umask (os.umask sets and returns it), then put it back
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """A file object to write `path` through; the file replaces `path` when the block ends without an error."""
  directory = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}-", suffix=os.path.splitext(name)[1])
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
  except BaseException:
    os.unlink(tmp)
    raise
  os.replace(tmp, path)


def write_json(path: str, obj, indent: int = 2) -> None:
  """`obj` as JSON (with a trailing newline) at `path`, atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=indent)
    f.write("\n")


def read_json_object(path: str) -> dict:
  """The JSON object `write_json` wrote at `path`; ValueError naming the file when it is not valid JSON or holds
  something else than an object (the readers of results.json and comparison.json add what the file should be)."""
  try:
    with open(path, "r", encoding="utf-8") as f:
      value = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def write_text(path: str, text: str) -> None:
  """`text` at `path`, atomically."""
  with atomic_open(path) as f:
    f.write(text)


def save_npy(path: str, array) -> None:
  """`array` in numpy's .npy format at `path` (which keeps its name: no `.npy` is appended), atomically."""
  with atomic_open(path, "wb") as f:
    np.save(f, array)


@contextlib.contextmanager
def atomic_dir(path: str):
  """A new empty folder to fill; it replaces `path` (a folder, or nothing) when the block ends without an error."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
  try:
    os.chmod(tmp, 0o777 & ~_umask())
    yield tmp
    if os.path.isdir(path):  # a folder rename cannot overwrite one: the old folder goes aside first
      old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
      os.rename(path, os.path.join(old, "previous"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
