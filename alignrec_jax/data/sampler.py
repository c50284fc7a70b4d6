"""BPR training triplets (docs/method.md §5.4), vectorised in numpy.

Each epoch visits every train interaction (user, positive item) once, in an order shuffled by a seeded
`np.random.Generator`, in batches of the configured size. Each row gets one negative drawn uniformly from the items
that occur in the train split, redrawn while it is one of the user's train items (all rows at once, then only the
offending ones again). The last, smaller batch is padded to the full batch size with `weight = 0` rows, so that
jitted / pmapped shapes never change; the losses count only rows with weight 1. Batches can be split into
`n_shards` equal contiguous shards (one per device): arrays then have shape [n_shards, batch_size / n_shards].
"""

import json
from typing import Iterator

import numpy as np

from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError


class BPRSampler:
  """Seeded, resumable BPR triplet sampler. The generator state is part of the training checkpoint."""

  def __init__(self, train: np.ndarray, n_items: int, batch_size: int, seed: int):
    """train: [n_train, 2] (user, item) interactions; n_items: catalogue size."""
    train = np.asarray(train, np.int64)
    if train.ndim != 2 or train.shape[1] != 2 or not len(train):
      raise ConfigError(f"BPRSampler needs a non-empty [n, 2] array of (user, item) pairs, got shape {train.shape}")
    if batch_size < 1:
      raise ConfigError(f"config.train.batch_size={batch_size} must be >= 1")
    self.users = train[:, 0]
    self.items = train[:, 1]
    self.n_items = int(n_items)
    self.batch_size = int(batch_size)
    self.candidates = np.unique(self.items)  # items occurring in train
    self.train_keys = np.unique(self.users * self.n_items + self.items)  # sorted (user, item) keys
    self._check_every_user_has_a_negative()
    self.rng = np.random.default_rng(seed)

  def _check_every_user_has_a_negative(self) -> None:
    per_user = np.bincount(self.train_keys // self.n_items)
    full = np.flatnonzero(per_user >= len(self.candidates))
    if full.size:
      raise DataError(f"user {full[0]} has every train item in its train set: no negative item can be sampled")

  @property
  def n_rows(self) -> int:
    return len(self.users)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.n_rows // self.batch_size)

  def _in_train(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    keys = users * self.n_items + items
    pos = np.minimum(np.searchsorted(self.train_keys, keys), len(self.train_keys) - 1)
    return self.train_keys[pos] == keys

  def negatives(self, users: np.ndarray) -> np.ndarray:
    """[n] one uniform negative per user id, never one of that user's train items."""
    neg = self.candidates[self.rng.integers(0, len(self.candidates), size=len(users))]
    bad = np.flatnonzero(self._in_train(users, neg))
    while bad.size:
      neg[bad] = self.candidates[self.rng.integers(0, len(self.candidates), size=bad.size)]
      bad = bad[self._in_train(users[bad], neg[bad])]
    return neg

  def epoch(self, n_shards: int = 0, rows: slice = slice(None)) -> Iterator[dict]:
    """Yields the batches of one epoch: dicts of `users`, `pos`, `neg` (int32) and `weight` (float32).

    Shapes: [batch_size], or [n_shards, batch_size / n_shards] when n_shards > 0. The whole epoch (order and
    negatives) is drawn up front, so the generator state after this call is that of the next epoch.
    `rows` keeps only those shards of every batch: under `jax.distributed` each process draws the same global
    batches (same seed, same state) and keeps the shards of its own devices (train/parallel.py, `local_rows`).
    """
    if n_shards and self.batch_size % n_shards:
      raise ConfigError(f"config.train.batch_size={self.batch_size} must be divisible by the number of devices "
                        f"({n_shards})")
    order = self.rng.permutation(self.n_rows)
    users, pos = self.users[order], self.items[order]
    neg = self.negatives(users)
    weight = np.ones(self.n_rows, np.float32)
    pad = self.steps_per_epoch * self.batch_size - self.n_rows
    if pad:  # padding rows repeat the first rows (valid ids) with weight 0
      users, pos, neg = (np.concatenate([a, a[:pad]]) for a in (users, pos, neg))
      weight = np.concatenate([weight, np.zeros(pad, np.float32)])
    arrays = {"users": users.astype(np.int32), "pos": pos.astype(np.int32), "neg": neg.astype(np.int32),
              "weight": weight}
    for step in range(self.steps_per_epoch):
      sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
      batch = {k: v[sl] for k, v in arrays.items()}
      yield {k: v[rows] for k, v in shard(batch, n_shards).items()} if n_shards else batch

  def get_state(self) -> str:
    """The generator state as a JSON string (checkpointed with the model)."""
    return json.dumps(self.rng.bit_generator.state)

  def set_state(self, state: str) -> None:
    self.rng.bit_generator.state = json.loads(state)


def shard(batch: dict, n_shards: int) -> dict:
  """[B] arrays -> [n_shards, B / n_shards] contiguous shards (device d gets rows d*B/n .. (d+1)*B/n - 1)."""
  out = {}
  for key, value in batch.items():
    if value.shape[0] % n_shards:
      raise ValueError(f"batch of {value.shape[0]} rows cannot be split into {n_shards} equal shards")
    out[key] = value.reshape(n_shards, value.shape[0] // n_shards, *value.shape[1:])
  return out
