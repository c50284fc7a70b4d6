"""Training state on disk: the one orbax checkpointer of both stages and of the stage-1 feature table.

A checkpoint (a numbered step: finished epochs in stage 2, finished steps in stage 1) holds
  state: a tree of arrays (the trainer's {"params", "opt_state"}; the feature tables), restored into the structure
         of a freshly built one (or as saved)
  meta:  JSON: the loop's bookkeeping (train/loop.py; in stage 2 also the sampler's RNG state, the early-stopping
         state and the per-epoch history), a CRC32 of every saved array (`checksums`) and one of the meta itself
         (`meta_checksum`).
After each save the manager keeps the latest `keep_latest` checkpoints and the best one, whose step the meta of
every checkpoint names (`best_step`): the choice lives on disk, so a run resumed any number of times keeps the same
best checkpoint as an uninterrupted one. Writes are synchronous and orbax finalises a step by an atomic rename, so a
run killed at any moment leaves the previous complete checkpoint to resume from.

A run stopped by SIGTERM/SIGINT (train/preemption.py) also leaves `<directory>/preempted/<steps>`: the state in the
middle of a round, with the loop's sums of that round in its meta (`partial`). `restore_for_resume` prefers it when it
is newer than the latest finished step; the next finished step deletes it. Nothing else reads it: the numbered steps
stay finished rounds, and the best step is always one of them.

Every restore recomputes the checksums of what it read. A damaged or unreadable latest step (a flipped byte, a
deleted file) is moved to `<workdir>/damaged_checkpoints/` with a warning and the newest intact step is used.
"""

import contextlib
import errno
import json
import logging as pylogging
import os
import shutil
import sys
import time
import zlib
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from alignrec_jax.errors import ConfigError
from alignrec_jax.train import distributed


PREEMPTED = "preempted"  # <directory>/preempted/: the state of a round stopped by a signal (train/preemption.py)


DAMAGED, MISMATCH = "damaged", "mismatch"  # CheckpointError.kind: what the user does differs (retrain vs the config)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (damaged, missing, written by another model); the message is one line.

  `kind`: DAMAGED (a checksum differs: retrain or restore the files), MISMATCH (another model or feature width: rerun
  with the config it was trained with), or "" (either; orbax could not say)."""

  def __init__(self, message: str, kind: str = ""):
    super().__init__(message)
    self.kind = kind


def checksums(tree: Any) -> dict:
  """{leaf path: CRC32 of its dtype, shape and bytes} of a tree of host arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode())
    out[jax.tree_util.keystr(path)] = f"{zlib.crc32(a.data, crc) & 0xFFFFFFFF:08x}"
  return out


def meta_checksum(meta: dict) -> str:
  """CRC32 of the meta's JSON (keys sorted, its own `meta_checksum` left out): the bookkeeping a resume and
  results.json trust (best epoch, best metrics, history, sampler state) is covered as the arrays are."""
  text = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True)
  return f"{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"


def verify_meta(meta: dict, where: str) -> None:
  """Raises CheckpointError when the meta differs from its saved checksum (absent: a checkpoint from before it)."""
  expected = meta.get("meta_checksum")
  if expected is None:
    logging.warning("%s has no meta checksum (written by an older version): its meta is trusted unverified", where)
  elif meta_checksum(meta) != expected:
    raise CheckpointError(f"{where} is damaged: its meta (best epoch, metrics, history) differs from its saved "
                          "checksum", DAMAGED)


def verify(tree: Any, expected: Optional[dict], where: str) -> None:
  """Raises CheckpointError when `tree`'s checksums differ from `expected` (None: a checkpoint from before them)."""
  if expected is None:
    logging.warning("%s has no checksums (written by an older version): restored unverified", where)
    return
  got = checksums(tree)
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    raise CheckpointError(f"{where} is damaged: {len(bad)} of {len(expected)} arrays differ from their saved checksums "
                          f"(first: {bad[0]})", DAMAGED)


def check_shapes(restored: Any, target: Any, where: str) -> None:
  """Raises CheckpointError when a restored array's shape differs from the freshly built one (another model or feature
  width: orbax restores the saved shape whatever the target says)."""
  want = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    key = jax.tree_util.keystr(path)
    if key in want and np.shape(leaf) != want[key]:
      raise CheckpointError(f"{where} was written by another model or feature width: {key} has shape "
                            f"{np.shape(leaf)}, this config builds {want[key]}", MISMATCH)


class _MuteOrbaxErrors(pylogging.Filter):
  """While a restore may fail, orbax and asyncio log the failure at length; the caller reports it in one line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno < pylogging.ERROR


@contextlib.contextmanager
def _quiet_failures():
  mute = _MuteOrbaxErrors()
  handlers = list(pylogging.getLogger().handlers)  # handler filters also see records of child loggers
  for h in handlers:
    h.addFilter(mute)
  try:
    yield
  finally:
    for h in handlers:
      h.removeFilter(mute)


def _drop_closed_loop_noise() -> None:
  """After a failed restore, tensorstore's pending reads complete into orbax's closed asyncio loop and each prints a
  `RuntimeError: Event loop is closed` traceback (as an unraisable exception): noise that hides the one-line cause.
  From then on only that exception is dropped; every other unraisable exception still reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _quarantine(manager: ocp.CheckpointManager, directory: str, step: int) -> None:
  """Moves step `step` of `directory` to `<parent>/damaged_checkpoints/` (kept for inspection, out of orbax's way)."""
  if distributed.is_main_process():
    target = os.path.join(os.path.dirname(directory), "damaged_checkpoints",
                          f"{os.path.basename(directory)}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(directory, str(step)), target)
    logging.warning("moved the damaged checkpoint %d to %s", step, target)
  distributed.barrier(f"quarantine:{step}")
  manager.reload()


def _disk_full(e: BaseException) -> bool:
  text = str(e)
  return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "RESOURCE_EXHAUSTED" in text \
      or "No space left" in text


def what_to_do(kind: str) -> str:
  """The advice that ends a CheckpointError of `kind`."""
  if kind == DAMAGED:
    return "retrain in a fresh --workdir, or put back an undamaged copy of its files"
  if kind == MISMATCH:
    return "rerun with the config it was trained with, or use a fresh --workdir for another model or config"
  return ("rerun with the config it was trained with; if that is the config, it is damaged: retrain in a fresh "
          "--workdir")


def restore_failed(where: str, e: Exception) -> CheckpointError:
  """The one-line error for an orbax restore that raised (a damaged or incompatible checkpoint)."""
  _drop_closed_loop_noise()
  cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
  return CheckpointError(f"{where} cannot be restored ({cause}); it is damaged or was written by another "
                         "model/config")


class Checkpointer:
  """The package's one orbax checkpointer: numbered steps of {"state": a tree of arrays, "meta": JSON} under
  `directory`, keeping the latest `keep_latest` steps and the one the meta names as `best_step`.

  Stage 1 (`<workdir>/pretrain/`), stage 2 (`<workdir>/checkpoints/`) and the stage-1 feature table
  (`<workdir>/features/`) all go through it; `label` names the checkpoints in messages."""

  def __init__(self, directory: str, keep_latest: int = 1, label: str = "checkpoint", create: bool = True):
    if keep_latest < 1:
      raise ConfigError(f"config.train.keep_checkpoints={keep_latest} must be >= 1")
    self.directory = os.path.abspath(directory)
    self.keep_latest = keep_latest
    self.label = label
    # No orbax retention policy: which steps to keep depends on the best step recorded in the meta (save below).
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=create)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return list(self.manager.all_steps())

  def meta(self, step: int) -> dict:
    """The JSON meta of step `step` alone (no arrays are read)."""
    where = f"{self.label} {step} in {self.directory}"
    try:
      with _quiet_failures():
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # orbax raises many types for a damaged or incompatible checkpoint
      raise restore_failed(where, e) from e
    verify_meta(meta, where)
    meta.pop("meta_checksum", None)
    return meta

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (host copies are taken) and `meta` as step `step`, then deletes every step but the latest
    `keep_latest` and `meta["best_step"]`. Synchronous: the step is complete (renamed into place) on return."""
    state = jax.tree.map(np.asarray, state)
    meta = dict(meta, checksums=checksums(state))
    meta["meta_checksum"] = meta_checksum(meta)
    try:
      with _quiet_failures():  # orbax's writer threads log a failed write at length (260 lines for a full disk)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
    except Exception as e:  # orbax raises ValueError, OSError, ... for a write that failed
      _drop_closed_loop_noise()
      for name in os.listdir(self.directory):  # its temporary folder of this step: never a finished checkpoint
        if name.startswith(f"{step}.") and "tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      full = "the disk is full: free space or use another --workdir; " if _disk_full(e) else ""
      raise CheckpointError(f"{self.label} {step} in {self.directory} could not be written ({full}{cause})") from e
    steps = sorted(self.manager.all_steps())
    keep = set(steps[-self.keep_latest:]) | {meta.get("best_step")}
    for old in steps:
      if old not in keep:
        self.manager.delete(old)
    self.drop_preempted()  # the finished step supersedes a preemption checkpoint of its round

  def _preempted(self, create: bool) -> "Checkpointer":
    return Checkpointer(os.path.join(self.directory, PREEMPTED), label=f"preemption {self.label}", create=create)

  def save_preempted(self, state: Any, meta: dict) -> int:
    """Saves the state of an unfinished round (train/loop.py puts its sums into `meta["partial"]`) as
    `<directory>/preempted/<meta["steps"]>`, replacing an older one; the numbered steps are left as they are.
    Returns the step number."""
    self.drop_preempted()
    with self._preempted(create=True) as ckpt:
      ckpt.save(int(meta["steps"]), state, meta)
    return int(meta["steps"])

  def drop_preempted(self) -> None:
    path = os.path.join(self.directory, PREEMPTED)
    if distributed.is_main_process() and os.path.isdir(path):
      shutil.rmtree(path)
    if jax.process_count() > 1:
      distributed.barrier(f"drop_preempted:{self.label}")  # not the path: each process may have its own workdir

  def restore_for_resume(self, like: Any = None) -> Optional[tuple[int, Any, dict]]:
    """`restore_latest`, or the preemption checkpoint when there is one newer than it (more steps done): where a
    run resumes. A preemption checkpoint that is damaged or older is ignored with a warning (the run repeats its
    round from the latest finished step, to the same end)."""
    latest = self.restore_latest(like)
    path = os.path.join(self.directory, PREEMPTED)
    if not os.path.isdir(path):
      return latest
    with self._preempted(create=False) as ckpt:
      try:
        preempted = ckpt.restore_latest(like, quarantine=False)
      except CheckpointError as e:
        logging.warning("%s; resuming from the latest finished checkpoint instead", e)
        preempted = None
    if preempted is None:
      return latest
    if latest is not None and latest[2].get("steps", 0) >= preempted[2].get("steps", 0):
      logging.warning("the preemption checkpoint in %s is older than %s's step %d: ignored", path, self.label,
                      latest[0])
      return latest
    return preempted

  def restore(self, step: int, like: Any = None) -> tuple[Any, dict]:
    """(state, meta) of step `step`, in the structure of `like` (None: as saved), checksums verified.

    Raises CheckpointError (one line) for a missing, unreadable, damaged or incompatible step."""
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no {self.label} for step {step} in {self.directory} (have: {self.manager.all_steps()})")
    target = None if like is None else jax.tree.map(np.asarray, like)
    where = f"{self.label} {step} in {self.directory}"
    try:
      with _quiet_failures():
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged or incompatible checkpoint
      raise restore_failed(where, e) from e
    meta = dict(restored["meta"])
    verify_meta(meta, where)
    meta.pop("meta_checksum", None)
    state = jax.tree.map(np.asarray, restored["state"])
    verify(state, meta.pop("checksums", None), where)
    if target is not None:
      check_shapes(state, target, where)
    return state, meta

  def restore_latest(self, like: Any = None, quarantine: bool = True) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest intact checkpoint; None when there is none at all.

    A step that cannot be restored is skipped with a warning and, with `quarantine`, once an older step restores,
    moved to `<parent>/damaged_checkpoints/` so that the run can write that step again. Raises CheckpointError, moving
    nothing, when no step restores (typically a checkpoint of another model or feature width)."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, like)
      except CheckpointError as e:
        failed.append((step, e))
        logging.warning("%s; falling back to the previous checkpoint", e)
        continue
      # Moved only once an older step restores: when none does, the model/config differs (nothing is damaged)
      for bad, _ in failed if quarantine else ():
        _quarantine(self.manager, self.directory, bad)
      return step, state, meta
    if failed:
      kinds = {e.kind for _, e in failed}
      kind = kinds.pop() if len(kinds) == 1 else ""
      raise CheckpointError(f"no {self.label} in {self.directory} can be restored (none was moved): {failed[-1][1]}; "
                            + what_to_do(kind), kind)
    return None

  def close(self) -> None:
    with _quiet_failures():
      self.manager.close()


def restore_best_params(directory: str, params_like: Any, opt_state_like: Any) -> tuple[Any, dict]:
  """(params, meta) of the best epoch's checkpoint under `directory` (e.g. `<workdir>/checkpoints`), verified.

  Reads only: a damaged latest step is skipped (not moved) to find the recorded best step."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory} (train with this --workdir first)")
  like = {"params": params_like, "opt_state": opt_state_like}
  with Checkpointer(directory) as ckpt:
    latest = ckpt.restore_latest(like, quarantine=False)
    if latest is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    step, state, meta = latest
    best = meta.get("best_step")
    if best != step:
      if best not in ckpt.all_steps():
        raise CheckpointError(f"the best epoch's checkpoint (step {best}) is missing from {directory}")
      state, meta = ckpt.restore(best, like)
    return state["params"], meta
