"""Evaluation protocols on top of a dataset's own split: cold-start items and sparse users (docs/method.md §8.2).

Both are seeded by `data.split_seed`, so that every model and every training seed of a comparison sees the same
split, and both leave the data unchanged at their defaults (`data.cold_items=0`, `data.train_fraction=1`).

Cold-start items (`data.cold_items = f`): a fraction f of the items that have any interaction is held out of training
entirely. Every interaction of a cold item leaves train, valid and test; the cold items are dealt by item into two
halves, and the interactions of the first half (from all three original splits) form `valid_cold`, those of the
second `test_cold`. A user keeps every interaction with warm items where it was. The user-item graph and the BPR
sampler are built from train and never see a cold item; the item features (and the item-item graph built from
them) cover every item. Evaluation ranks each cold split over its own cold items only (the usual cold-start
protocol: which of the new items will the user take?), and the warm splits over the warm items only.

Sparse users (`data.train_fraction = f`): each user keeps a seeded f of its train interactions (rounded, at least
one); valid and test are untouched. Applied after the cold-item hold-out when both are set.
"""

from typing import Mapping

import numpy as np

from alignrec_jax.errors import ConfigError

_COLD_STREAM = 1   # separate random streams of data.split_seed, so that one protocol does not shift the other
_SPARSE_STREAM = 2


def hold_out_cold_items(splits: Mapping[str, np.ndarray], fraction: float,
                        seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Holds a seeded fraction of the interacted items out of training.

  Args:
    splits: {"train", "valid", "test"}: [n, 2] (user, item) pairs.
    fraction: share of the items with at least one interaction to hold out, 0 < fraction < 1.
    seed: data.split_seed.

  Returns:
    (pairs, cold_items): pairs = {"train", "valid", "test", "valid_cold", "test_cold"} with every row of a cold item
    moved out of train/valid/test into the cold split of its item (rows keep their file order); cold_items =
    {"valid_cold", "test_cold"}: the sorted item ids dealt to each cold split.
  """
  if not 0.0 < fraction < 1.0:
    raise ConfigError(f"config.data.cold_items={fraction!r} must lie strictly between 0 and 1")
  interacted = np.unique(np.concatenate([splits[s][:, 1] for s in ("train", "valid", "test")]))
  n_cold = int(np.floor(fraction * len(interacted) + 0.5))
  if n_cold < 2 or n_cold > len(interacted) - 1:
    raise ConfigError(f"config.data.cold_items={fraction!r} holds out {n_cold} of the {len(interacted)} items with "
                      "interactions: it must leave at least 2 cold items (one per cold split) and 1 warm item")
  rng = np.random.default_rng([seed, _COLD_STREAM])
  cold = rng.permutation(interacted)[:n_cold]  # the first half goes to valid_cold, the rest to test_cold
  half = n_cold // 2
  cold_items = {"valid_cold": np.sort(cold[:half]).astype(np.int32), "test_cold": np.sort(cold[half:]).astype(np.int32)}
  n_items = int(interacted.max()) + 1
  owner = np.zeros(n_items, np.int8)  # 0 warm, 1 valid_cold, 2 test_cold
  owner[cold_items["valid_cold"]] = 1
  owner[cold_items["test_cold"]] = 2
  pairs = {}
  for name in ("train", "valid", "test"):
    pairs[name] = splits[name][owner[splits[name][:, 1]] == 0]
  every = np.concatenate([splits[s] for s in ("train", "valid", "test")])
  for label, name in ((1, "valid_cold"), (2, "test_cold")):
    pairs[name] = every[owner[every[:, 1]] == label]
  return pairs, cold_items


def keep_train_fraction(train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A seeded `fraction` of each user's train rows (rounded half up, at least one), in their original order."""
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"config.data.train_fraction={fraction!r} must lie in (0, 1]")
  if fraction == 1.0 or not len(train):
    return train
  users = train[:, 0].astype(np.int64)
  rng = np.random.default_rng([seed, _SPARSE_STREAM])
  order = np.lexsort((rng.random(len(train)), users))  # each user's rows in a random order
  counts = np.bincount(users)
  first = np.cumsum(counts) - counts  # a user's first position in `order`
  rank = np.empty(len(train), np.int64)
  rank[order] = np.arange(len(train)) - first[users[order]]
  keep = np.maximum(1, np.floor(fraction * counts + 0.5).astype(np.int64))
  return train[np.sort(np.flatnonzero(rank < keep[users]))]
