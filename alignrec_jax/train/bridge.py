"""The stage-1 -> stage-2 bridge: the item feature table of a stage-1 workdir.

`save_feature_table` writes, for the variants {"full", "mask_image", "mask_text"} (each `[n_items, d]` float32):
  <workdir>/features/0/   a checkpoint of {variant: table} (train/state.Checkpointer, the format of both stages'
                          training checkpoints; the copy stage 2 restores), and
  <workdir>/image_feat.npy, image_feat_mask_image.npy, image_feat_mask_text.npy  (MMRec layout, row i = itemID i)
`load_dataset` is the dataset stage 2 trains on: the interactions, with the feature table of `data.features_from`
in the image slot when it is set.
orbax finalises a checkpoint by an atomic rename and the `.npy` files are renamed into place, so a killed run leaves
either the complete table or no table. `load_feature_table` restores one variant and checks it against the dataset.
"""

import dataclasses
import os
import shutil
from typing import Mapping

import ml_collections
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.data import synthetic
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError
from alignrec_jax.train import distributed
from alignrec_jax.train import state as state_lib

VARIANTS = ("full", "mask_image", "mask_text")
NPY_NAMES = {"full": "image_feat.npy", "mask_image": "image_feat_mask_image.npy",
             "mask_text": "image_feat_mask_text.npy"}
_STEP = 0


def features_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "features")


def _checkpointer(directory: str, create: bool) -> state_lib.Checkpointer:
  return state_lib.Checkpointer(directory, label="stage-1 feature checkpoint", create=create)


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
      raise DataError(f"the {name!r} feature table holds NaN/Inf values (diverged pre-training?)")
  directory = features_dir(workdir)
  # Several processes (jax.distributed): process 0 alone clears and writes files; the orbax save is collective.
  main = distributed.is_main_process()
  if main and os.path.isdir(directory):
    shutil.rmtree(directory)  # an old or partial table: the new one replaces it whole
  distributed.barrier("save_feature_table:cleared")
  with _checkpointer(directory, create=True) as ckpt:
    ckpt.save(_STEP, arrays, {})
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
    raise ConfigError(f"config.data.features_variant={variant!r} is not one of {VARIANTS}")
  directory = features_dir(workdir)
  hint = (f"run stage 1 first: python -m alignrec_jax.main --config=... --config.stage=extract "
          f"--workdir={os.path.abspath(workdir)}")
  if not os.path.isdir(directory):
    raise DataError(f"no stage-1 feature checkpoint in {directory} (data.features_from={workdir}); {hint}")
  with _checkpointer(directory, create=False) as ckpt:
    if _STEP not in ckpt.all_steps():
      raise DataError(f"the stage-1 feature checkpoint in {directory} is incomplete (no finalised checkpoint: the "
                      f"extraction was interrupted?); {hint}")
    try:
      restored, _ = ckpt.restore(_STEP)
    except state_lib.CheckpointError as e:
      raise DataError(f"{e}; {hint}") from None
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


def load_dataset(data_config: ml_collections.ConfigDict) -> mmrec.RecData:
  """`mmrec.load_dataset`, after generating the default data (process 0 first) when `data.synthetic`, and with the
  stage-1 table of `data.features_from` (variant `data.features_variant`) in the image slot when it is set."""
  if data_config.synthetic:  # process 0 generates it once, the others then find it
    distributed.main_process_first(synthetic.ensure_synthetic_dataset, os.path.expanduser(data_config.root))
  data = mmrec.load_dataset(data_config)
  if not data_config.features_from:
    return data
  table = load_feature_table(os.path.expanduser(data_config.features_from), data.n_items,
                             variant=data_config.features_variant)
  return dataclasses.replace(data, features={**data.features, "image": table})
