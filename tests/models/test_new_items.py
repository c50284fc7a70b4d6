"""The neighbour rule for items without train interactions (models/new_items.py) and the inductive kNN graph."""

import dataclasses

import numpy as np
import pytest

from alignrec_jax import graph as graph_lib
from alignrec_jax.data.mmrec import RecData
from alignrec_jax.models import new_items


def _data(features, train):
  n = len(features)
  return RecData(name="t", n_users=2, n_items=n, train=np.asarray(train, np.int32), valid=np.zeros((0, 2), np.int32),
                 test=np.zeros((0, 2), np.int32), features={"image": np.asarray(features, np.float32)})


def test_an_item_without_train_rows_gets_the_cosine_weighted_mean_of_its_k_nearest_trained_items():
  # items 0-2 trained, item 3 cold; cos(f3, f0) = 1, cos(f3, f1) = 0.6, cos(f3, f2) = 0 (hand-computed)
  features = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [2.0, 0.0]]
  data = _data(features, [(0, 0), (0, 1), (1, 2)])
  item_emb = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]], np.float32)
  out = new_items.ColdStart(data, ("image",), k=2)(item_emb)
  np.testing.assert_allclose(out[3], [1.0 / 1.6, 0.6 / 1.6, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(out[:3], item_emb[:3])  # trained items keep their vectors


def test_several_slots_weigh_neighbours_by_the_mean_cosine():
  image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  text = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
  rows = new_items.similarity_rows({"image": image, "text": text}, ("image", "text"))
  expected = (1.0 + np.sqrt(0.5)) / 2  # item 2 vs item 0: image cosine 1, text cosine 1/sqrt(2)
  assert rows[2] @ rows[0] == pytest.approx(expected, rel=1e-6)
  assert rows[2] @ rows[1] == pytest.approx((0.0 + np.sqrt(0.5)) / 2, rel=1e-6)


def test_neighbours_are_found_among_the_anchors_only_and_k_is_capped():
  rule = new_items.NeighbourRule(np.array([5, 7]), np.array([[1.0, 0.0], [0.0, 1.0]]), k=10)
  ids, sims = rule.neighbours(np.array([[0.0, 1.0]]))
  np.testing.assert_array_equal(ids, [[7, 5]])
  np.testing.assert_allclose(sims, [[1.0, 0.0]])


def test_a_members_knn_graph_equals_the_graph_of_the_members_alone_and_leaves_the_others_out():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(9, 4)).astype(np.float32)
  members = np.array([0, 2, 3, 5, 8])
  dense = graph_lib.knn_graph(features, 3, members=members).to_dense()
  alone = graph_lib.knn_graph(features[members], 3).to_dense()
  np.testing.assert_allclose(dense[np.ix_(members, members)], alone, rtol=1e-6)
  others = np.setdiff1d(np.arange(9), members)
  assert not dense[others].any() and not dense[:, others].any()


def test_inductive_data_builds_its_graphs_over_the_warm_items():
  data = _data(np.eye(4), [(0, 0), (1, 1)])
  cold = {"valid_cold": np.array([2], np.int32), "test_cold": np.array([3], np.int32)}
  assert dataclasses.replace(data, cold_items=cold).graph_members() is None  # transductive: every item
  np.testing.assert_array_equal(dataclasses.replace(data, cold_items=cold, inductive=True).graph_members(), [0, 1])
