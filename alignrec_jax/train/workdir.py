"""A workdir belongs to one run: an exclusive lock while a stage runs in it, and the resolved config its checkpoints
were written with.

Lock: `<workdir>/.lock`, an advisory `flock` held for the whole run (the kernel drops it when the process dies, even
by SIGKILL) and holding the holder's pid, host and start time. A second run on the workdir fails at once naming the
holder; a lock file left by a dead process (its flock is gone) is taken over with a warning that names it. The lock
is re-entrant within one process (`--config.stage=all` holds it over the stages it runs) and only process 0 of a
multi-process run takes it: all processes share one workdir. Each stage takes it through `claimed`.

Stored config: `<checkpoint dir>/run_config.json`, written before the first checkpoint of a directory. A resume
(the directory holds a finished checkpoint) with a config that differs from it in any key that can change what is
trained is refused with one line listing the keys. Not compared, because they cannot change the checkpoint's
numbers: `train.epochs` (a finished run may be continued), `stage`, logging and checkpoint-retention keys, the
sections the directory's stage never reads (see `STAGE2_IGNORED` and `STAGE1_KEYS`) and other models' own sections
(`model.<other model>.*`).
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket

from absl import logging

from alignrec_jax.data import atomic

LOCK_NAME = ".lock"
CONFIG_NAME = "run_config.json"

# Stage 2 (`<workdir>/checkpoints`): every key except these prefixes.
STAGE2_IGNORED = ("stage", "train.epochs", "train.log_every_steps", "train.keep_checkpoints", "pretrain.",
                  "probe.", "export.")
# Stage 1 (`<workdir>/pretrain`): only what pre-training reads (prefixes), minus logging/checkpoint cadence.
STAGE1_KEYS = ("seed", "data.root", "data.items_file", "data.synthetic", "pretrain.", "train.num_devices")
STAGE1_IGNORED = ("pretrain.log_every", "pretrain.checkpoint_every", "pretrain.extract_batch_size")


class WorkdirError(RuntimeError):
  """The workdir is in use by another run, or holds a run with other settings; the message is one line."""


_held = {}  # lock path -> [fd, depth] of the locks this process holds


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace")
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "an unknown process"
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')})"


def _acquire(path: str) -> int:
  for _ in range(10):  # retried only when the file was replaced between open and flock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirError(f"workdir {os.path.dirname(path)} is in use by {_describe(holder)}: wait for that run to "
                           f"end or use another --workdir (lock file {path})") from None
      raise
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:  # the previous holder removed the file after we opened it: lock the new one instead
      os.close(fd)
      continue
    stale = _read_holder(fd)
    if stale:
      logging.warning("workdir %s: taking over the lock of %s, which is no longer running", os.path.dirname(path),
                      _describe(stale))
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(mine) + "\n").encode("utf-8"))
    return fd
  raise WorkdirError(f"could not lock {path}: it keeps being replaced by another process")


@contextlib.contextmanager
def locked(workdir: str, main_process: bool = True):
  """Holds `<workdir>/.lock` for the body; raises WorkdirError at once when another live run holds it."""
  if not main_process:
    yield
    return
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  if path in _held:
    _held[path][1] += 1
  else:
    _held[path] = [_acquire(path), 1]
  try:
    yield
  finally:
    _held[path][1] -= 1
    if not _held[path][1]:
      fd = _held.pop(path)[0]
      with contextlib.suppress(OSError):
        os.unlink(path)  # while still locked: a waiting opener then sees a replaced file and retries
      os.close(fd)


def flatten(tree, prefix: str = "") -> dict:
  """{dotted key: leaf} of nested dicts."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _matches(key: str, patterns) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def resolved_config(config) -> dict:
  """The config as flat {"section.key": JSON value} (tuples become lists, as on disk)."""
  return flatten(json.loads(config.to_json_best_effort()))


def fingerprint(settings: dict, stage: int) -> dict:
  """The keys of `settings` (a config as JSON, nested or flat) that can change what `stage` (1 or 2) trains."""
  flat = flatten(settings)
  if stage == 1:
    return {k: v for k, v in flat.items() if _matches(k, STAGE1_KEYS) and not _matches(k, STAGE1_IGNORED)}
  # another model's own section (config.model.<other>.*) cannot change this model's run
  own = f"model.{flat.get('model.name')}."
  return {k: v for k, v in flat.items() if not _matches(k, STAGE2_IGNORED)
          and not (k.startswith("model.") and k.count(".") >= 2 and not k.startswith(own))}


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds a finished orbax step (a folder named by its step number)."""
  return os.path.isdir(directory) and any(n.isdigit() and os.path.isdir(os.path.join(directory, n))
                                          for n in os.listdir(directory))


def check_or_record(config, directory: str, stage: int, main_process: bool = True) -> None:
  """Refuses a resume of `directory` with other settings; records the config when the directory has no checkpoint.

  Raises WorkdirError listing every differing key (stored -> now).
  """
  if _check(config, directory, stage) and main_process:
    os.makedirs(directory, exist_ok=True)
    atomic.write_json(os.path.join(directory, CONFIG_NAME), json.loads(config.to_json_best_effort()))


def _check(config, directory: str, stage: int) -> bool:
  """check_or_record's check; True when `config` is still to be recorded for `directory`."""
  path = os.path.join(directory, CONFIG_NAME)
  now = fingerprint(resolved_config(config), stage)
  if has_checkpoint(directory):
    if not os.path.isfile(path):
      logging.warning("%s holds checkpoints but no %s (written by an older version): its settings cannot be "
                      "checked; recording the current ones", directory, CONFIG_NAME)
      return True
    else:
      try:
        with open(path, "r", encoding="utf-8") as f:
          stored = fingerprint(json.load(f), stage)
      except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}); use a fresh --workdir") from None
      # keys only one side has (added or removed by a code update) keep their old behaviour: not compared
      diff = [k for k in sorted(set(stored) & set(now)) if stored[k] != now[k]]
      if diff:
        changes = "; ".join(f"{k}: {stored[k]!r} -> {now[k]!r}" for k in diff)
        raise WorkdirError(f"{directory} holds a run with other settings ({changes}); a resume may change only "
                           "train.epochs: rerun with the stored values or use a fresh --workdir")
      return False
  return True


def check_usable(workdir: str) -> None:
  """A workdir that is a file, or a folder this user cannot create or write, fails here in one line."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable by this user")


@contextlib.contextmanager
def claimed(command, workdir: str, records=(), main_process: bool = True):
  """A stage's hold on `workdir`: usable, locked, every `(config, directory, stage)` of `records` checked against
  what that checkpoint directory holds (all of them before any is recorded), then recorded, and the `command`'s
  config written to `<workdir>/config.json`. A refused run writes nothing, and a run that fails before its first
  checkpoint leaves the workdir as it found it (`_undo`): no tokenizer, dataset or recorded config of a run that
  never trained refuses the corrected command."""
  created = not os.path.isdir(workdir)
  check_usable(workdir)
  try:
    with _claimed(command, workdir, records, main_process):
      yield
  except BaseException:
    if created and main_process:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # only when empty: the failed run made it and left nothing in it
    raise


@contextlib.contextmanager
def _claimed(command, workdir: str, records, main_process: bool):
  with locked(workdir, main_process):
    found = set(os.listdir(workdir))
    command_path = os.path.join(workdir, "config.json")
    old_command = _read_bytes(command_path)
    try:
      pending = [(config, directory) for config, directory, stage in records if _check(config, directory, stage)]
      if main_process:
        for config, directory in pending:
          os.makedirs(directory, exist_ok=True)
          atomic.write_json(os.path.join(directory, CONFIG_NAME), json.loads(config.to_json_best_effort()))
        atomic.write_json(command_path, json.loads(command.to_json_best_effort()))
      yield
    except BaseException:
      if main_process:
        _undo(workdir, found, command_path, old_command)
      raise


def _read_bytes(path: str):
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def _holds_checkpoint(path: str) -> bool:
  """Whether `path` (a checkpoint folder or a workdir entry) holds a finished or a preemption checkpoint."""
  return has_checkpoint(path) or has_checkpoint(os.path.join(path, "preempted"))


def _undo(workdir: str, found: set, command_path: str, old_command) -> None:
  """After a failed stage: removes what it added to `workdir` (entries not in `found`) and restores config.json,
  unless it added a checkpoint, which the error message then names and a rerun resumes from."""
  added = [os.path.join(workdir, name) for name in os.listdir(workdir) if name not in found and name != LOCK_NAME]
  if any(_holds_checkpoint(path) for path in added):
    return
  for path in added:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(path)
  if old_command is not None and _read_bytes(command_path) != old_command:
    with contextlib.suppress(OSError), atomic.atomic_open(command_path, "wb") as f:
      f.write(old_command)
