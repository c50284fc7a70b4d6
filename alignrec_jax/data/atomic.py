"""The one atomic file writer for the results, tables and models the package leaves behind.

A file appears at its path only once completely written (a temporary file in the same folder, then a rename), with
the mode a plain open() would give it under the process's umask: `tempfile.mkstemp` alone creates 0600, which hides
results from the rest of the group. A failed write leaves neither the file nor its temporary file behind.
"""

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """A file object to write `path` through; the file replaces `path` when the block ends without an error."""
  directory = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}-", suffix=os.path.splitext(name)[1])
  try:
    mask = os.umask(0o022)  # read the umask (os.umask sets and returns it), then put it back
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
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


def write_text(path: str, text: str) -> None:
  """`text` at `path`, atomically."""
  with atomic_open(path) as f:
    f.write(text)


def save_npy(path: str, array) -> None:
  """`array` in numpy's .npy format at `path` (which keeps its name: no `.npy` is appended), atomically."""
  with atomic_open(path, "wb") as f:
    np.save(f, array)
