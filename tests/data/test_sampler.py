"""BPR triplet sampling: coverage, negatives, padding, sharding, determinism and resumable state."""

import numpy as np
import pytest

from alignrec_jax.data.sampler import BPRSampler, shard


def _train(seed=0, n_users=50, n_items=40):
  rng = np.random.default_rng(seed)
  pairs = {(u, i) for u in range(n_users) for i in rng.choice(n_items - 3, size=rng.integers(3, 15), replace=False)}
  return np.asarray(sorted(pairs), np.int32), n_items  # items n_items-3.. never occur in train


def test_epoch_covers_every_row_once_and_pads_the_last_batch():
  train, n_items = _train()
  sampler = BPRSampler(train, n_items, batch_size=64, seed=3)
  batches = list(sampler.epoch())
  assert len(batches) == sampler.steps_per_epoch == -(-len(train) // 64)
  assert all(b["users"].shape == (64,) for b in batches)
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = cat["weight"] == 1
  assert real.sum() == len(train) and np.all(cat["weight"][~real] == 0)
  got = sorted(zip(cat["users"][real], cat["pos"][real]))
  assert got == sorted(map(tuple, train.tolist()))


def test_negatives_are_train_items_outside_the_users_train_set():
  train, n_items = _train()
  sampler = BPRSampler(train, n_items, batch_size=128, seed=0)
  owned = {tuple(p) for p in train.tolist()}
  occurring = set(train[:, 1].tolist())
  negs = []
  for _ in range(20):
    for b in sampler.epoch():
      for u, n in zip(b["users"], b["neg"]):
        assert (u, n) not in owned
        assert n in occurring
      negs.append(b["neg"])
  counts = np.bincount(np.concatenate(negs), minlength=n_items)[sorted(occurring)]
  assert counts.min() > 0.5 * counts.mean()  # roughly uniform over the occurring items


def test_shards_are_contiguous_and_divisibility_is_checked():
  train, n_items = _train()
  sampler = BPRSampler(train, n_items, batch_size=64, seed=1)
  flat = next(BPRSampler(train, n_items, batch_size=64, seed=1).epoch())
  sharded = next(sampler.epoch(4))
  assert sharded["users"].shape == (4, 16)
  np.testing.assert_array_equal(sharded["pos"].reshape(-1), flat["pos"])
  with pytest.raises(ValueError, match="divisible"):
    next(BPRSampler(train, n_items, batch_size=62, seed=1).epoch(4))
  with pytest.raises(ValueError, match="equal shards"):
    shard({"users": np.zeros(6)}, 4)


def test_each_process_keeps_its_devices_rows_of_the_same_global_batches():
  train, n_items = _train()
  reference = BPRSampler(train, n_items, batch_size=64, seed=2)
  whole = list(reference.epoch(4))
  for p in range(2):  # process p of 2 with 2 devices each: global devices 2p, 2p+1
    sampler = BPRSampler(train, n_items, batch_size=64, seed=2)
    mine = list(sampler.epoch(4, slice(2 * p, 2 * p + 2)))
    assert len(mine) == len(whole)
    for x, y in zip(mine, whole):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k][2 * p:2 * p + 2])
    assert sampler.get_state() == reference.get_state()  # the checkpointed state is the same in every process


def test_seeded_and_resumable():
  train, n_items = _train()
  a = BPRSampler(train, n_items, batch_size=64, seed=7)
  b = BPRSampler(train, n_items, batch_size=64, seed=7)
  c = BPRSampler(train, n_items, batch_size=64, seed=8)
  ea, eb, ec = next(a.epoch()), next(b.epoch()), next(c.epoch())
  np.testing.assert_array_equal(ea["neg"], eb["neg"])
  assert not np.array_equal(ea["users"], ec["users"])
  list(a.epoch())  # a finishes epoch 1 (its first epoch was fully drawn on the first next())
  state = a.get_state()
  want = list(a.epoch())
  fresh = BPRSampler(train, n_items, batch_size=64, seed=123)
  fresh.set_state(state)
  for x, y in zip(want, fresh.epoch()):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_bad_arguments():
  train, n_items = _train()
  with pytest.raises(ValueError, match="batch_size"):
    BPRSampler(train, n_items, batch_size=0, seed=0)
  with pytest.raises(ValueError, match="no negative"):
    BPRSampler(np.array([[0, 0], [0, 1], [1, 0]]), 2, batch_size=2, seed=0)
