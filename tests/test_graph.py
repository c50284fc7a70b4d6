"""Graph construction (spec alignrec.md §5.2) and the one propagation function with its custom VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignrec_jax import graph as graph_lib


def test_user_item_graph_is_symmetric_normalised_without_self_loops():
  train = np.array([[0, 0], [0, 1], [1, 1], [2, 0], [2, 2], [2, 1]])
  n_users, n_items = 4, 4  # user 3 and item 3 have no train interactions
  adj, user_item = graph_lib.user_item_graph(train, n_users, n_items)
  dense = adj.to_dense()
  R = np.zeros((n_users, n_items))
  R[train[:, 0], train[:, 1]] = 1
  A = np.block([[np.zeros((4, 4)), R], [R.T, np.zeros((4, 4))]])
  deg = A.sum(1)
  dinv = np.zeros(8)
  dinv[deg > 0] = deg[deg > 0] ** -0.5
  np.testing.assert_allclose(dense, A * np.outer(dinv, dinv), rtol=1e-6)
  np.testing.assert_allclose(dense, dense.T)
  assert np.all(np.diag(dense) == 0)
  assert np.all(dense[3] == 0) and np.all(dense[:, 7] == 0)
  np.testing.assert_allclose(user_item.to_dense(), dense[:4, 4:], rtol=1e-6)
  # R̂_ui = 1 / sqrt(d_u d_i): user 0 has 2 items, item 1 has 3 users.
  np.testing.assert_allclose(user_item.to_dense()[0, 1], 1 / np.sqrt(2 * 3), rtol=1e-6)


def test_knn_graph_matches_the_dense_reference_and_is_not_symmetric():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(23, 7)).astype(np.float32)
  k = 4
  g = graph_lib.knn_graph(feats, k, block_rows=5)  # several blocks, the last one partial
  fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  S = fn @ fn.T
  Sk = np.zeros_like(S)
  top = np.argsort(-S, axis=1)[:, :k]
  np.put_along_axis(Sk, top, np.take_along_axis(S, top, 1), 1)
  r = Sk.sum(1)
  want = Sk * np.outer(r ** -0.5, r ** -0.5)
  dense = g.to_dense()
  np.testing.assert_allclose(dense, want, atol=1e-6)
  assert g.n_edges == 23 * k
  assert np.all(np.diag(dense) > 0)  # the self-loop is one of the k neighbours
  assert not np.allclose(dense, dense.T)


def test_knn_graph_hand_computed():
  # Three 2-d items: cos(0,1) = 0.8, cos(0,2) = 0, cos(1,2) = 0.6. k = 2.
  feats = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
  dense = graph_lib.knn_graph(feats, 2).to_dense()
  # rows: 0 -> {0: 1, 1: .8}, 1 -> {1: 1, 0: .8}, 2 -> {2: 1, 1: .6}; row sums 1.8, 1.8, 1.6
  r = np.array([1.8, 1.8, 1.6])
  want = np.array([[1, .8, 0], [.8, 1, 0], [0, .6, 1]]) / np.sqrt(np.outer(r, r))
  np.testing.assert_allclose(dense, want, rtol=1e-6)


def test_knn_k_out_of_range():
  with pytest.raises(ValueError, match="knn_k"):
    graph_lib.knn_graph(np.ones((3, 2), np.float32), 4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_propagate_and_its_vjp_match_dense(symmetric):
  rng = np.random.default_rng(1)
  if symmetric:
    adj, _ = graph_lib.user_item_graph(rng.integers(0, 6, size=(20, 2)), 6, 6)
    g = adj
  else:
    g = graph_lib.knn_graph(rng.normal(size=(9, 5)).astype(np.float32), 3)
  dense = g.to_dense()
  x = jnp.asarray(rng.normal(size=(g.n_src, 4)).astype(np.float32))
  cot = rng.normal(size=(g.n_dst, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(graph_lib.propagate(g, x)), dense @ np.asarray(x), atol=1e-5)
  grad = jax.jit(jax.grad(lambda g_, x_: jnp.sum(graph_lib.propagate(g_, x_) * cot), argnums=1))(g, x)
  np.testing.assert_allclose(np.asarray(grad), dense.T @ cot, atol=1e-5)
  auto = jax.grad(lambda x_: jnp.sum(graph_lib.propagate(g, x_, "autodiff") * cot))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(auto), atol=1e-5)


def test_propagate_rectangular_and_shape_check():
  _, user_item = graph_lib.user_item_graph(np.array([[0, 0], [1, 2], [1, 1]]), 2, 3)
  x = jnp.arange(6.0).reshape(3, 2)
  np.testing.assert_allclose(np.asarray(graph_lib.propagate(user_item, x)), user_item.to_dense() @ np.asarray(x),
                             rtol=1e-6)
  g = jax.grad(lambda x_: jnp.sum(graph_lib.propagate(user_item, x_)))(x)
  np.testing.assert_allclose(np.asarray(g), user_item.to_dense().T @ np.ones((2, 2)), rtol=1e-6)
  with pytest.raises(ValueError, match="source nodes"):
    graph_lib.propagate(user_item, jnp.ones((2, 2)))


@pytest.mark.parametrize("kind", ["symmetric", "knn", "rectangular"])
def test_gather_propagation_and_its_vjp_match_dense(kind):
  """The padded-neighbour-list (ELL) path: forward and custom-VJP backward equal the dense products, including rows
  without entries (users/items of degree 0) and degrees that span several buckets."""
  rng = np.random.default_rng(5)
  if kind == "symmetric":
    pairs = np.concatenate([rng.integers(0, 30, size=(200, 2)), np.zeros((40, 2), np.int64)])  # user 0, item 0 busy
    g, _ = graph_lib.user_item_graph(pairs, 31, 31)  # user 30 and item 30 have no edges
  elif kind == "knn":
    g = graph_lib.knn_graph(rng.normal(size=(25, 6)).astype(np.float32), 4)
  else:
    _, g = graph_lib.user_item_graph(np.concatenate([rng.integers(0, 12, size=(60, 2)), [[3, 14]]]), 13, 15)
  g = graph_lib.with_ell(g)
  assert max(len(g.ell.neighbours), len(g.t_ell.neighbours)) >= 2  # several degree buckets (kNN: the transpose)
  dense = g.to_dense()
  x = jnp.asarray(rng.normal(size=(g.n_src, 3)).astype(np.float32))
  cot = rng.normal(size=(g.n_dst, 3)).astype(np.float32)
  out = jax.jit(lambda g_, x_: graph_lib.propagate(g_, x_, "gather"))(g, x)
  np.testing.assert_allclose(np.asarray(out), dense @ np.asarray(x), atol=1e-5)
  grad = jax.jit(jax.grad(lambda g_, x_: jnp.sum(graph_lib.propagate(g_, x_, "gather") * cot), argnums=1))(g, x)
  np.testing.assert_allclose(np.asarray(grad), dense.T @ cot, atol=1e-5)


def test_gather_without_neighbour_lists_falls_back_to_segment_sum():
  g, _ = graph_lib.user_item_graph(np.array([[0, 0], [1, 1]]), 2, 2)
  x = jnp.arange(8.0).reshape(4, 2)
  np.testing.assert_allclose(np.asarray(graph_lib.propagate(g, x, "gather")),
                             np.asarray(graph_lib.propagate(g, x, "segment_sum")))
  with pytest.raises(ValueError, match="unknown propagation method"):
    graph_lib.propagate(g, x, "bcsr")
