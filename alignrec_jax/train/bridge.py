"""The stage-1 -> stage-2 bridge: the item feature table of a stage-1 workdir.

`save_feature_table` writes, for the variants {"full", "mask_image", "mask_text"} (each `[n_items, d]` float32):
  <workdir>/features/<step 0>/   an orbax checkpoint of {variant: table} (the copy stage 2 restores), and
  <workdir>/image_feat.npy, image_feat_mask_image.npy, image_feat_mask_text.npy  (MMRec layout, row i = itemID i)
orbax finalises a checkpoint by an atomic rename and the `.npy` files are renamed into place, so a killed run leaves
either the complete table or no table. `load_feature_table` restores one variant and checks it against the dataset.
"""

import os
import shutil
from typing import Mapping

import numpy as np
import orbax.checkpoint as ocp

from alignrec_jax.data import atomic
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.train import distributed

VARIANTS = ("full", "mask_image", "mask_text")
NPY_NAMES = {"full": "image_feat.npy", "mask_image": "image_feat_mask_image.npy",
             "mask_text": "image_feat_mask_text.npy"}
_STEP = 0


def features_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "features")


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=create, max_to_keep=1)
  return ocp.CheckpointManager(directory, options=options)


def save_feature_table(workdir: str, tables: Mapping[str, np.ndarray]) -> None:
  """Writes the feature tables (see the module docstring); replaces an earlier table of the same workdir."""
  unknown = sorted(set(tables) - set(VARIANTS))
  if unknown or "full" not in tables:
    raise ValueError(f"feature variants must include 'full' and be among {VARIANTS}, got {sorted(tables)}")
  arrays = {k: np.asarray(v, np.float32) for k, v in tables.items()}
  shapes = {v.shape for v in arrays.values()}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"feature tables must all be [n_items, d] of one shape, got {[v.shape for v in arrays.values()]}")
  for name, table in arrays.items():
    if not np.isfinite(table).all():
      raise ValueError(f"the {name!r} feature table holds NaN/Inf values (diverged pre-training?)")
  directory = features_dir(workdir)
  # Several processes (jax.distributed): process 0 alone clears and writes files; the orbax save is collective.
  main = distributed.is_main_process()
  if main and os.path.isdir(directory):
    shutil.rmtree(directory)  # an old or partial table: the new one replaces it whole
  distributed.barrier("save_feature_table:cleared")
  manager = _manager(directory, create=True)
  try:
    manager.save(_STEP, args=ocp.args.StandardSave(arrays))
    manager.wait_until_finished()
  finally:
    manager.close()
  if not main:
    return
  for name, table in arrays.items():
    with atomic.atomic_open(os.path.join(workdir, NPY_NAMES[name]), "wb") as f:
      np.save(f, table)


def has_feature_table(workdir: str, n_items: int) -> bool:
  """True if `workdir` holds a complete table of every variant for `n_items` items."""
  try:
    for variant in VARIANTS:
      load_feature_table(workdir, n_items, variant)
  except DataError:
    return False
  return True


def load_feature_table(workdir: str, n_items: int, variant: str = "full") -> np.ndarray:
  """The `[n_items, d]` float32 table `variant` of a stage-1 workdir, restored from its orbax checkpoint."""
  if variant not in VARIANTS:
    raise ValueError(f"config.data.features_variant={variant!r} is not one of {VARIANTS}")
  directory = features_dir(workdir)
  hint = (f"run stage 1 first: python -m alignrec_jax.main --config=... --config.stage=extract "
          f"--workdir={os.path.abspath(workdir)}")
  if not os.path.isdir(directory):
    raise DataError(f"no stage-1 feature checkpoint in {directory} (data.features_from={workdir}); {hint}")
  manager = _manager(directory, create=False)
  try:
    if _STEP not in manager.all_steps():
      raise DataError(f"the stage-1 feature checkpoint in {directory} is incomplete (no finalised checkpoint: the "
                      f"extraction was interrupted?); {hint}")
    try:
      restored = manager.restore(_STEP, args=ocp.args.StandardRestore())
    except Exception as e:  # orbax raises many types for a damaged checkpoint
      raise DataError(f"the stage-1 feature checkpoint in {directory} cannot be read ({type(e).__name__}: {e}); "
                      f"{hint}") from None
  finally:
    manager.close()
  if variant not in restored:
    raise DataError(f"the stage-1 feature checkpoint in {directory} has no {variant!r} table (has {sorted(restored)}); "
                    f"{hint}")
  table = np.asarray(restored[variant], np.float32)
  if table.ndim != 2 or table.shape[0] != n_items:
    raise DataError(f"the stage-1 feature table in {directory} has shape {table.shape}, but the dataset has "
                    f"{n_items} items: features_from points at a workdir of another dataset")
  if not np.isfinite(table).all():
    raise DataError(f"the stage-1 feature table {variant!r} in {directory} holds NaN/Inf values")
  return table
