"""Cold-start items and sparse users: what leaves training, what is ranked, and that a seed gives the same split."""

import math

import ml_collections
import numpy as np
import pytest

from alignrec_jax import graph
from alignrec_jax.data import mmrec
from alignrec_jax.data import protocols
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.data.sampler import BPRSampler
from alignrec_jax.eval import evaluators
from alignrec_jax.eval import ranking
from alignrec_jax.train import checks
from configs import base


def _splits(n_users=30, n_items=40, seed=0):
  """Every user rates 8 distinct items: 6 train, 1 valid, 1 test."""
  rng = np.random.default_rng(seed)
  out = {"train": [], "valid": [], "test": []}
  for u in range(n_users):
    items = rng.choice(n_items, 8, replace=False)
    out["train"] += [(u, i) for i in items[:6]]
    out["valid"].append((u, items[6]))
    out["test"].append((u, items[7]))
  return {k: np.asarray(v, np.int32) for k, v in out.items()}


def _keys(pairs):
  return set(map(tuple, np.asarray(pairs).tolist()))


def test_cold_items_leave_every_warm_split_and_keep_all_their_rows():
  splits = _splits()
  pairs, cold = protocols.hold_out_cold_items(splits, 0.25, seed=3)
  every_cold = np.concatenate([cold["valid_cold"], cold["test_cold"]])
  n_interacted = len(np.unique(np.concatenate([p[:, 1] for p in splits.values()])))
  assert len(every_cold) == math.floor(0.25 * n_interacted + 0.5) == len(np.unique(every_cold))
  assert not set(cold["valid_cold"]) & set(cold["test_cold"])
  for name in ("train", "valid", "test"):
    assert not np.isin(pairs[name][:, 1], every_cold).any()
  for name in ("valid_cold", "test_cold"):
    assert np.isin(pairs[name][:, 1], cold[name]).all()
  # nothing lost, nothing duplicated: the five splits partition the original rows
  before = _keys(np.concatenate(list(splits.values())))
  after = [_keys(p) for p in pairs.values()]
  assert sum(len(a) for a in after) == len(before) and set().union(*after) == before


def test_a_seed_gives_the_same_cold_split_twice_and_another_seed_another():
  splits = _splits()
  first = protocols.hold_out_cold_items(splits, 0.2, seed=7)
  again = protocols.hold_out_cold_items(splits, 0.2, seed=7)
  other = protocols.hold_out_cold_items(splits, 0.2, seed=8)
  for name in ("valid_cold", "test_cold"):
    np.testing.assert_array_equal(first[1][name], again[1][name])
  for name in first[0]:
    np.testing.assert_array_equal(first[0][name], again[0][name])
  assert not np.array_equal(first[1]["test_cold"], other[1]["test_cold"])


def test_too_few_cold_items_is_an_error_naming_the_key():
  splits = _splits()
  n_interacted = len(np.unique(np.concatenate([p[:, 1] for p in splits.values()])))
  with pytest.raises(ValueError, match=f"config.data.cold_items=0.01 holds out 0 of the {n_interacted} items"):
    protocols.hold_out_cold_items(splits, 0.01, seed=0)


def test_train_fraction_keeps_a_rounded_share_of_each_users_rows_and_at_least_one():
  train = np.array([(0, i) for i in range(10)] + [(1, i) for i in range(3)] + [(2, 5)], np.int32)
  kept = protocols.keep_train_fraction(train, 0.25, seed=1)
  counts = np.bincount(kept[:, 0], minlength=3)
  np.testing.assert_array_equal(counts, [3, 1, 1])  # round(2.5) half up = 3, round(0.75) = 1, max(1, 0.25) = 1
  assert _keys(kept) <= _keys(train)
  order = [np.flatnonzero((train == row).all(1))[0] for row in kept]
  assert order == sorted(order)  # file order kept
  np.testing.assert_array_equal(kept, protocols.keep_train_fraction(train, 0.25, seed=1))
  assert not np.array_equal(kept, protocols.keep_train_fraction(train, 0.25, seed=2))
  assert protocols.keep_train_fraction(train, 1.0, seed=1) is train


def _write_dataset(root):
  splits = _splits()
  mmrec.write_inter(str(root / "toy.inter"), splits)
  return splits


def _data_config(root, **overrides):
  config = base.get_base_config().data
  config.update(dict(name="toy", root=str(root), image_feat="", **overrides))
  return config


def test_loaded_cold_items_never_reach_the_train_split_the_user_item_graph_or_the_sampler(tmp_path):
  _write_dataset(tmp_path)
  data = mmrec.load_dataset(_data_config(tmp_path, cold_items=0.25, split_seed=5))
  cold = np.concatenate(list(data.cold_items.values()))
  assert len(cold) >= 9 and len(data.valid_cold) and len(data.test_cold)
  assert not np.isin(data.train[:, 1], cold).any()
  _, user_item = graph.user_item_graph(data.train, data.n_users, data.n_items)
  is_cold = np.zeros((data.n_items, 1), np.float32)
  is_cold[cold] = 1.0
  assert float(np.abs(np.asarray(graph.propagate(user_item, is_cold))).max()) == 0.0  # no user aggregates one
  sampler = BPRSampler(data.train, data.n_items, batch_size=64, seed=0)
  for batch in sampler.epoch():
    assert not np.isin(batch["pos"], cold).any() and not np.isin(batch["neg"], cold).any()
  # the same seed loads the same split
  again = mmrec.load_dataset(_data_config(tmp_path, cold_items=0.25, split_seed=5))
  for name in ("train", "valid", "test", "valid_cold", "test_cold"):
    np.testing.assert_array_equal(data.split(name), again.split(name))


def test_sparse_users_change_train_only(tmp_path):
  splits = _write_dataset(tmp_path)
  data = mmrec.load_dataset(_data_config(tmp_path, train_fraction=0.2))
  np.testing.assert_array_equal(np.bincount(data.train[:, 0]), np.ones(30))  # round(1.2) = 1 of 6 rows
  np.testing.assert_array_equal(data.valid, splits["valid"])
  np.testing.assert_array_equal(data.test, splits["test"])
  assert not data.cold_items and data.held_out_splits() == ("valid", "test")


def test_cold_metrics_rank_the_cold_items_only():
  # 1 user, items 0..5; warm items {0, 1, 2} (0 in train), cold test items {3, 4, 5}, the user took cold item 4.
  data = mmrec.RecData("t", 1, 6, train=np.array([[0, 0]], np.int32), valid=np.array([[0, 1]], np.int32),
                       test=np.array([[0, 2]], np.int32), valid_cold=np.zeros((0, 2), np.int32),
                       test_cold=np.array([[0, 4]], np.int32),
                       cold_items={"valid_cold": np.zeros(0, np.int32), "test_cold": np.array([3, 4, 5], np.int32)})
  split = ranking.make_eval_split(data, "test_cold")
  assert split.n_items == 3 and split.mask_items.size == 0
  user = np.ones((1, 1), np.float32)
  # warm items score far above every cold item; among the cold ones item 5 > 4 > 3: item 4 is 2nd, not 4th or 5th
  items = np.array([[100.], [90.], [80.], [1.], [2.], [3.]], np.float32)
  m = ranking.evaluate(user, items, split, topk=(1, 2, 3), round_digits=None)
  assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
  assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
  # the warm test split ranks the warm items only: cold items scored above it do not push it down
  warm = ranking.make_eval_split(data, "test")
  items_cold_high = np.array([[3.], [1.], [2.], [50.], [60.], [70.]], np.float32)
  w = ranking.evaluate(user, items_cold_high, warm, topk=(1, 2), round_digits=None)
  assert w["recall@1"] == 1.0  # item 0 is masked (train), item 2 beats item 1


def test_cold_evaluators_are_added_and_cold_settings_are_checked(tmp_path):
  _write_dataset(tmp_path)
  config = base.get_base_config()
  config.data = _data_config(tmp_path, cold_items=0.25)
  data = mmrec.load_dataset(config.data)
  specs = evaluators.specs(data, config)
  assert sorted(specs) == ["test", "test_cold", "valid", "valid_cold"]
  assert {name: spec.split for name, spec in specs.items()}["test_cold"] == "test_cold"
  with config.unlocked():
    config.eval.select_on = "test_cold"
  with pytest.raises(checks.ConfigError, match="config.eval.select_on='test_cold'"):
    checks.check_eval(config)
  config.eval.select_on = "valid_cold"
  config.data.cold_items = 0.0
  with pytest.raises(checks.ConfigError, match="config.eval.select_on='valid_cold' needs cold-start items"):
    checks.check_eval(config)
  config.data.cold_items = 1.0
  with pytest.raises(checks.ConfigError, match="config.data.cold_items=1.0"):
    checks.check_protocols(config)
  config.data.cold_items, config.data.train_fraction = 0.2, 0.0
  with pytest.raises(checks.ConfigError, match="config.data.train_fraction=0.0"):
    checks.check_protocols(config)


def test_a_bad_fraction_in_the_file_is_a_data_error_naming_the_file(tmp_path):
  _write_dataset(tmp_path)
  with pytest.raises(DataError, match=r"toy.inter: config.data.cold_items=0.01"):
    mmrec.load_dataset(_data_config(tmp_path, cold_items=0.01))


def test_a_cold_split_over_all_items_ranks_like_its_candidate_split(tmp_path):
  # the probes score every item; masking the items outside a split's candidates must give its exact metrics
  _write_dataset(tmp_path)
  data = mmrec.load_dataset(_data_config(tmp_path, cold_items=0.25, split_seed=2))
  rng = np.random.default_rng(0)
  user_emb = rng.standard_normal((data.n_users, 4)).astype(np.float32)
  item_emb = rng.standard_normal((data.n_items, 4)).astype(np.float32)
  for name in data.held_out_splits():
    split = ranking.make_eval_split(data, name)
    full = ranking.over_all_items(data, split)
    assert full.n_items == data.n_items and full.candidates is None
    expected = ranking.evaluate(user_emb, item_emb, split, topk=(1, 5), round_digits=None)
    assert ranking.evaluate(user_emb, item_emb, full, topk=(1, 5), round_digits=None) == expected
    top = ranking.topk_items(user_emb, item_emb, full, k=5)
    assert np.isin(top, split.candidates).all()
