"""MMRec-exact ranking metrics: hand-computed cases and a plain-numpy reference on random data."""

import math

import numpy as np
import pytest

from alignrec_jax.data.mmrec import RecData
from alignrec_jax.eval import ranking


def _data(n_users, n_items, train, test, valid=None):
  arr = lambda x: np.asarray(x, np.int32).reshape(-1, 2)
  return RecData("t", n_users, n_items, arr(train), arr(valid if valid is not None else test), arr(test))


def test_hand_computed_single_user():
  # 1 user, 6 items; train item 0 masked; held-out {2, 5}. Scores rank items 0 > 1 > 2 > 3 > 4 > 5.
  data = _data(1, 6, [[0, 0]], [[0, 2], [0, 5]])
  split = ranking.make_eval_split(data, "test")
  user = np.ones((1, 1), np.float32)
  items = np.array([[6.], [5.], [4.], [3.], [2.], [1.]], np.float32)
  top = ranking.topk_items(user, items, split, k=5)
  np.testing.assert_array_equal(top, [[1, 2, 3, 4, 5]])  # item 0 masked
  m = ranking.metrics_from_topk(top, split, topk=(1, 2, 5), round_digits=None)
  # hits at ranks 2 and 5
  assert m["recall@1"] == 0 and m["recall@2"] == 0.5 and m["recall@5"] == 1.0
  assert m["precision@2"] == 0.5 and m["precision@5"] == pytest.approx(0.4)
  idcg2 = 1 + 1 / math.log2(3)
  assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg2)
  assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / idcg2)
  # MAP@5: (P@2 * 1 + P@5 * 1) / min(2, 5) = (1/2 + 2/5) / 2 ; MAP@2 = (1/2) / 2
  assert m["map@5"] == pytest.approx((0.5 + 0.4) / 2)
  assert m["map@2"] == pytest.approx(0.25)
  assert m["map@1"] == 0


def test_idcg_and_map_are_capped_by_k():
  # 3 held-out items, K = 1: a hit at rank 1 gives NDCG@1 = MAP@1 = 1 (ideal DCG capped at min(3, 1)).
  data = _data(1, 5, [[0, 4]], [[0, 0], [0, 1], [0, 2]])
  split = ranking.make_eval_split(data, "test")
  m = ranking.evaluate(np.ones((1, 1)), np.array([[5.], [2.], [1.], [3.], [9.]]), split, topk=(1, 2),
                       round_digits=None)
  assert m["ndcg@1"] == 1.0 and m["map@1"] == 1.0 and m["recall@1"] == pytest.approx(1 / 3)
  # rank 2 is item 3 (a miss): MAP@2 = (1 * 1) / min(3, 2)
  assert m["map@2"] == 0.5 and m["precision@2"] == 0.5


def test_valid_items_stay_candidates_when_testing():
  # MMRec masks only train items: the user's valid item 1 can be ranked first on the test split.
  data = _data(1, 4, [[0, 0]], test=[[0, 2]], valid=[[0, 1]])
  split = ranking.make_eval_split(data, "test")
  top = ranking.topk_items(np.ones((1, 1)), np.array([[9.], [8.], [7.], [1.]]), split, k=3)
  np.testing.assert_array_equal(top, [[1, 2, 3]])


def _reference_metrics(scores, train_sets, truth_sets, ks):
  """Plain numpy, user by user, following MMRec's metrics.py."""
  out = {f"{m}@{k}": [] for m in ranking.METRICS for k in ks}
  for u in truth_sets:
    s = scores[u].astype(np.float64).copy()
    s[list(train_sets.get(u, ()))] = -np.inf
    ranked = np.argsort(-s, kind="stable")[:max(ks)]
    hit = np.array([i in truth_sets[u] for i in ranked], float)
    n = len(truth_sets[u])
    for k in ks:
      h = hit[:k]
      out[f"recall@{k}"].append(h.sum() / n)
      out[f"precision@{k}"].append(h.sum() / k)
      dcg = sum(h[j] / math.log2(j + 2) for j in range(k))
      idcg = sum(1 / math.log2(j + 2) for j in range(min(n, k)))
      out[f"ndcg@{k}"].append(dcg / idcg)
      ap = sum((h[:j + 1].sum() / (j + 1)) * h[j] for j in range(k))
      out[f"map@{k}"].append(ap / min(n, k))
  return {key: float(np.mean(v)) for key, v in out.items()}


def test_matches_numpy_reference_on_random_data():
  rng = np.random.default_rng(0)
  n_users, n_items, d = 120, 300, 8
  pairs = np.unique(np.stack([rng.integers(0, n_users, 6000), rng.integers(0, n_items, 6000)], 1), axis=0)
  labels = rng.choice(3, len(pairs), p=[0.7, 0.15, 0.15])
  data = _data(n_users, n_items, pairs[labels == 0], pairs[labels == 2], pairs[labels == 1])
  user_emb = rng.normal(size=(n_users, d)).astype(np.float32)
  item_emb = rng.normal(size=(n_items, d)).astype(np.float32)
  scores = np.asarray(user_emb, np.float64) @ np.asarray(item_emb, np.float64).T
  train_sets, truth_sets = {}, {}
  for u, i in data.train:
    train_sets.setdefault(u, set()).add(i)
  for u, i in data.test:
    truth_sets.setdefault(u, set()).add(i)
  ks = (5, 10, 20, 50)
  want = _reference_metrics(scores, train_sets, truth_sets, ks)
  split = ranking.make_eval_split(data, "test")
  # small user batches exercise the batching and the mask padding
  got = ranking.evaluate(user_emb, item_emb, split, topk=ks, batch_users=7, round_digits=None)
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_rounds_to_four_decimals_by_default():
  data = _data(3, 7, [[0, 0], [1, 1], [2, 2]], [[0, 3], [1, 4], [2, 5], [2, 6], [0, 6]])
  split = ranking.make_eval_split(data, "test")
  rng = np.random.default_rng(1)
  m = ranking.evaluate(rng.normal(size=(3, 4)), rng.normal(size=(7, 4)), split, topk=(5,))
  for value in m.values():
    assert value == round(value, 4)


def test_popularity_groups_sum_back_to_overall():
  rng = np.random.default_rng(2)
  n_users, n_items = 80, 200
  pairs = np.unique(np.stack([rng.integers(0, n_users, 4000), (rng.pareto(1.0, 4000) * 10).astype(int) % n_items],
                             1), axis=0)
  labels = rng.choice(3, len(pairs), p=[0.8, 0.1, 0.1])
  data = _data(n_users, n_items, pairs[labels == 0], pairs[labels == 2], pairs[labels == 1])
  split = ranking.make_eval_split(data, "test")
  for fractions in [(0.2,), (0.2, 0.4, 0.6, 0.8)]:
    groups = ranking.popularity_groups(data, fractions)
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(n_items))
    m = ranking.evaluate(rng.normal(size=(n_users, 6)), rng.normal(size=(n_items, 6)), split, item_groups=groups,
                         round_digits=None)
    for key, overall in m.items():
      if key == "groups":
        continue
      assert sum(g[key] for g in m["groups"].values()) == pytest.approx(overall, abs=1e-9), key
  pop = data.item_popularity()
  head = ranking.popularity_groups(data, (0.2,))["head"]
  assert pop[head].min() >= np.delete(pop, head).max()


def test_bad_arguments():
  data = _data(1, 3, [[0, 0]], [[0, 1]])
  with pytest.raises(ValueError, match=r"splits \('valid', 'test'\) of this dataset, not 'train'"):
    ranking.make_eval_split(data, "train")
  with pytest.raises(ValueError, match="exists only with cold-start items"):
    data.split("test_cold")
  split = ranking.make_eval_split(data, "test")
  with pytest.raises(ValueError, match="2 rows, the dataset has 3 items"):
    ranking.topk_items(np.ones((1, 2)), np.ones((2, 2)), split, k=1)
  with pytest.raises(ValueError, match="fractions"):
    ranking.popularity_groups(data, (1.5,))


def test_sharding_over_devices_gives_the_same_ranking():
  import jax
  rng = np.random.default_rng(3)
  n_users, n_items = 37, 90
  pairs = np.unique(np.stack([rng.integers(0, n_users, 900), rng.integers(0, n_items, 900)], 1), axis=0)
  labels = rng.choice(3, len(pairs), p=[0.7, 0.15, 0.15])
  data = _data(n_users, n_items, pairs[labels == 0], pairs[labels == 2], pairs[labels == 1])
  split = ranking.make_eval_split(data, "test")
  user_emb, item_emb = rng.normal(size=(n_users, 5)), rng.normal(size=(n_items, 5))
  one = ranking.topk_items(user_emb, item_emb, split, k=20, batch_users=8, num_devices=1)
  for n_dev in range(2, jax.local_device_count() + 1):
    np.testing.assert_array_equal(
        ranking.topk_items(user_emb, item_emb, split, k=20, batch_users=8, num_devices=n_dev), one)


def _hits_via_topk(user_emb, item_emb, split, k):
  top = ranking.topk_items(user_emb, item_emb, split, k=k, num_devices=1)
  return np.where(ranking.hits_matrix(top, split), top, -1)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_path_gives_the_hits_of_the_top_k_list(ties):
  """The rank path (no top-k) puts every held-out item at its top-k position, ties to the lower item id, on 1 to 4
  devices; held-out items that are also train items (masked) are never hits; users with up to 5 held-out items
  exercise several truth-count buckets."""
  import jax
  rng = np.random.default_rng(4)
  n_users, n_items, k = 300, 400, 50
  pairs = np.unique(np.stack([rng.integers(0, n_users, 9000), rng.integers(0, n_items, 9000)], 1), axis=0)
  labels = rng.choice(3, len(pairs), p=[0.8, 0.1, 0.1])
  train = pairs[labels == 0]
  test = np.concatenate([pairs[labels == 2], train[:40]])  # 40 held-out items that are also train items
  data = _data(n_users, n_items, train, test, pairs[labels == 1])
  split = ranking.make_eval_split(data, "test")
  assert split.truth_len.max() >= 5 and ranking._rank_path_applies(split, k)
  if ties:  # integer embeddings: many exactly equal scores
    user_emb = rng.integers(-2, 3, size=(n_users, 3)).astype(np.float32)
    item_emb = rng.integers(-2, 3, size=(n_items, 3)).astype(np.float32)
  else:
    user_emb = rng.normal(size=(n_users, 8)).astype(np.float32)
    item_emb = rng.normal(size=(n_items, 8)).astype(np.float32)
  want = _hits_via_topk(user_emb, item_emb, split, k)
  assert (want >= 0).sum() > 100
  for n_dev in range(1, jax.local_device_count() + 1):
    np.testing.assert_array_equal(ranking.hit_items(user_emb, item_emb, split, k=k, num_devices=n_dev), want)


def test_rank_path_steps_aside_when_a_user_has_fewer_candidates_than_k():
  # item catalogue of 6, user 0 has 4 train items: only 2 candidates for k = 3, so masked items enter its top 3.
  data = _data(2, 6, [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]], [[0, 4], [1, 5]])
  split = ranking.make_eval_split(data, "test")
  assert not ranking._rank_path_applies(split, 3)
  user_emb, item_emb = np.ones((2, 1), np.float32), np.arange(6, 0, -1, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(ranking.hit_items(user_emb, item_emb, split, k=3),
                                _hits_via_topk(user_emb, item_emb, split, 3))
