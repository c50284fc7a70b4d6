"""Graphs of AlignRec's Aggregator and the one propagation function every model uses (docs/method.md §5.2).

A graph is a sparse matrix A [n_dst, n_src] stored as an edge list (`Graph`): edge e adds `w[e] * x[src[e]]` to
row `dst[e]` of `propagate(graph, x) = A @ x`. Edges are sorted by destination so that the forward segment_sum
runs over sorted segment ids. The transposed edge list (sorted by source) is stored beside it: the backward pass
of `A @ x` is `A.T @ g`, which is one more propagation over the transposed edges (custom VJP) instead of XLA's
scatter transpose of a gather. For a symmetric graph the transpose *is* the graph, so `transpose()` returns the
same arrays and the backward reuses the forward propagation. The item-item kNN graph is NOT symmetric, so its
backward propagates over its own transposed edges.

Builders:
  user_item_graph: the symmetric-normalised bipartite adjacency Â = D^-1/2 [[0, R], [Rᵀ, 0]] D^-1/2 over
    users then items (train interactions only, no self-loops) and its user <- item block R̂ = Â[:U, U:].
  knn_graph: row-wise top-k cosine neighbours (self-loop included), "sym" normalised by ROW sums
    r_i^-1/2 S_ij r_j^-1/2 (not symmetrised), built in row blocks with `jax.lax.top_k`, never an n x n matrix.
"""

import dataclasses
import functools
from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np


@struct.dataclass
class Ell:
  """A sparse matrix as neighbour lists padded per degree bucket (ELLPACK in power-of-two buckets).

  Row r of the matrix is row `position[r]` of concat_b(sum_j weights_b[:, j] * x[neighbours_b[:, j]]) plus one
  trailing zero row (rows without entries point at it). Padding entries have weight 0. Every step is a gather or a
  dense reduction, which XLA:CPU runs vectorised over all cores, unlike the serial scatter of segment_sum.
  """
  neighbours: tuple  # per bucket [rows_b, cap_b] int32
  weights: tuple     # per bucket [rows_b, cap_b] float32
  position: jax.Array  # [n_rows] int32


@struct.dataclass
class Graph:
  """Sparse matrix [n_dst, n_src] as edges sorted by destination, plus its transpose sorted by source.

  src, dst: [n_edges] int32; w: [n_edges] float32. t_src, t_dst, t_w: the transposed edge list
  (edges of Aᵀ, sorted by their destination = the original source). For a symmetric graph they are the same arrays.
  """
  src: jax.Array
  dst: jax.Array
  w: jax.Array
  t_src: jax.Array
  t_dst: jax.Array
  t_w: jax.Array
  n_dst: int = struct.field(pytree_node=False)
  n_src: int = struct.field(pytree_node=False)
  ell: Optional["Ell"] = None    # the same matrix as padded neighbour lists (with_ell), for method="gather"
  t_ell: Optional["Ell"] = None  # ... and its transpose

  @property
  def n_edges(self) -> int:
    return int(self.src.shape[0])

  def transpose(self) -> "Graph":
    return Graph(self.t_src, self.t_dst, self.t_w, self.src, self.dst, self.w, n_dst=self.n_src, n_src=self.n_dst,
                 ell=self.t_ell, t_ell=self.ell)

  def to_dense(self) -> np.ndarray:
    """[n_dst, n_src] dense matrix (tests and small graphs only)."""
    out = np.zeros((self.n_dst, self.n_src), np.float64)
    np.add.at(out, (np.asarray(self.dst), np.asarray(self.src)), np.asarray(self.w, np.float64))
    return out


def from_coo(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, n_cols: int,
             symmetric: bool = False) -> Graph:
  """Graph of the matrix with entries A[rows[e], cols[e]] = vals[e] (duplicates add up).

  With `symmetric=True` the caller promises A == Aᵀ and the transpose shares the forward arrays.
  """
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  vals = np.asarray(vals, np.float32)
  order = np.lexsort((cols, rows))
  dst, src, w = rows[order].astype(np.int32), cols[order].astype(np.int32), vals[order]
  if symmetric:
    if n_rows != n_cols:
      raise ValueError(f"a symmetric graph must be square, got {n_rows} x {n_cols}")
    src, dst, w = jnp.asarray(src), jnp.asarray(dst), jnp.asarray(w)
    return Graph(src, dst, w, src, dst, w, n_dst=n_rows, n_src=n_cols)
  t_order = np.lexsort((rows, cols))
  t_dst, t_src, t_w = cols[t_order].astype(np.int32), rows[t_order].astype(np.int32), vals[t_order]
  return Graph(jnp.asarray(src), jnp.asarray(dst), jnp.asarray(w), jnp.asarray(t_src), jnp.asarray(t_dst),
               jnp.asarray(t_w), n_dst=n_rows, n_src=n_cols)


def _spmm(src, dst, w, x, n_dst):
  """sum_e w[e] * x[src[e]] into row dst[e]; dst sorted. x: [n_src, d] -> [n_dst, d]."""
  return jax.ops.segment_sum(w[:, None].astype(x.dtype) * x[src], dst, num_segments=n_dst, indices_are_sorted=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _propagate(n_dst, n_src, arrays, x):
  src, dst, w, _, _, _ = arrays
  return _spmm(src, dst, w, x, n_dst)


def _propagate_fwd(n_dst, n_src, arrays, x):
  return _propagate(n_dst, n_src, arrays, x), arrays


def _propagate_bwd(n_dst, n_src, arrays, g):
  _, _, _, t_src, t_dst, t_w = arrays
  zeros = jax.tree.map(_zero_cotangent, arrays)  # edges are constants: no gradient flows to them
  return zeros, _spmm(t_src, t_dst, t_w, g, n_src)


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.integer):
    return np.zeros(a.shape, dtype=jax.dtypes.float0)
  return jnp.zeros_like(a)


_propagate.defvjp(_propagate_fwd, _propagate_bwd)


def _ell_of(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int) -> Ell:
  """Ell of the entries (rows, cols, vals), which must be sorted by row."""
  degree = np.bincount(rows, minlength=n_rows)
  starts = np.concatenate([[0], np.cumsum(degree)])
  caps = np.where(degree > 0, 1 << np.ceil(np.log2(np.maximum(degree, 1))).astype(np.int64), 0)
  position = np.full(n_rows, -1, np.int64)
  neighbours, weights, offset = [], [], 0
  for cap in np.unique(caps[caps > 0]):
    bucket_rows = np.flatnonzero(caps == cap)
    slot = np.arange(cap)
    real = slot[None, :] < degree[bucket_rows][:, None]
    edge = np.where(real, starts[bucket_rows][:, None] + slot[None, :], 0)
    neighbours.append(jnp.asarray(np.where(real, cols[edge], 0).astype(np.int32)))
    weights.append(jnp.asarray(np.where(real, vals[edge], 0).astype(np.float32)))
    position[bucket_rows] = offset + np.arange(len(bucket_rows))
    offset += len(bucket_rows)
  position[position < 0] = offset  # rows without entries: the trailing zero row
  return Ell(tuple(neighbours), tuple(weights), jnp.asarray(position.astype(np.int32)))


def with_ell(graph: Graph) -> Graph:
  """`graph` plus its padded neighbour lists (and those of its transpose), for propagate(method="gather").

  Built on the host once per graph; the padding costs at most 2x the edges (1.36x on the baby user-item graph).
  """
  src, dst, w = (np.asarray(a) for a in (graph.src, graph.dst, graph.w))
  ell = _ell_of(dst, src, w, graph.n_dst)
  if graph.t_src is graph.src:  # symmetric: the transpose is the graph itself
    return dataclasses.replace(graph, ell=ell, t_ell=ell)
  t_src, t_dst, t_w = (np.asarray(a) for a in (graph.t_src, graph.t_dst, graph.t_w))
  return dataclasses.replace(graph, ell=ell, t_ell=_ell_of(t_dst, t_src, t_w, graph.n_src))


def _ell_mm(ell: Ell, x: jax.Array) -> jax.Array:
  # A fused gather-multiply-sum per bucket (an einsum would lower to a slow batched matmul on CPU).
  rows = [jnp.sum(w.astype(x.dtype)[:, :, None] * x[n], axis=1) for n, w in zip(ell.neighbours, ell.weights)]
  rows.append(jnp.zeros((1, x.shape[1]), x.dtype))
  return jnp.concatenate(rows)[ell.position]


@jax.custom_vjp
def _propagate_ell(ell: Ell, t_ell: Ell, x: jax.Array) -> jax.Array:
  return _ell_mm(ell, x)


def _propagate_ell_fwd(ell, t_ell, x):
  return _ell_mm(ell, x), (ell, t_ell)


def _propagate_ell_bwd(res, g):
  ell, t_ell = res
  zeros = jax.tree.map(_zero_cotangent, (ell, t_ell))  # the graph is a constant
  return zeros[0], zeros[1], _ell_mm(t_ell, g)  # the backward of A @ x is Aᵀ @ g: one more propagation


_propagate_ell.defvjp(_propagate_ell_fwd, _propagate_ell_bwd)

PROPAGATION_METHODS = ("gather", "segment_sum", "autodiff")


def propagate(graph: Graph, x: jax.Array, method: str = "segment_sum") -> jax.Array:
  """A @ x for A = `graph` [n_dst, n_src] and x [n_src, d] -> [n_dst, d]. The one propagation of every model.

  method: "segment_sum" (custom VJP: the backward is a propagation over the transposed edges); "gather" (the same
    with padded neighbour lists, all gathers: faster on XLA:CPU, see bench/propagation.py; used for graphs
    built `with_ell`, others fall back to segment_sum); or "autodiff" (plain segment_sum, XLA's own transpose; kept
    for the benchmark).
  """
  if x.shape[0] != graph.n_src:
    raise ValueError(f"propagate: x has {x.shape[0]} rows but the graph has {graph.n_src} source nodes")
  if method == "gather" and graph.ell is not None:
    return _propagate_ell(graph.ell, graph.t_ell, x)
  if method in ("segment_sum", "gather"):
    arrays = (graph.src, graph.dst, graph.w, graph.t_src, graph.t_dst, graph.t_w)
    return _propagate(graph.n_dst, graph.n_src, arrays, x)
  if method == "autodiff":
    return _spmm(graph.src, graph.dst, graph.w, x, graph.n_dst)
  raise ValueError(f"unknown propagation method {method!r}; expected one of {PROPAGATION_METHODS}")


# ----------------------------------------------------------------------------------------------- user-item graph


def user_item_graph(train: np.ndarray, n_users: int, n_items: int) -> tuple[Graph, Graph]:
  """The LightGCN adjacency and its user <- item block (docs/method.md §5.2a).

  Args:
    train: [n_train, 2] (user, item) train interactions; a repeated pair counts twice, as the reference's coo does.
  Returns:
    adj: symmetric Â = D^-1/2 A D^-1/2 [(U + I), (U + I)], users first then items (item i is node U + i); no
      self-loops; nodes of degree 0 have no edges.
    user_item: R̂ = Â[:U, U:] [U, I], R̂_ui = R_ui / sqrt(d_u d_i) (users aggregating their train items).
  """
  train = np.asarray(train, np.int64)
  users, items = train[:, 0], train[:, 1]
  deg_u = np.bincount(users, minlength=n_users).astype(np.float64)
  deg_i = np.bincount(items, minlength=n_items).astype(np.float64)
  vals = (1.0 / np.sqrt(deg_u[users] * deg_i[items])).astype(np.float32)
  n = n_users + n_items
  rows = np.concatenate([users, items + n_users])
  cols = np.concatenate([items + n_users, users])
  adj = from_coo(rows, cols, np.concatenate([vals, vals]), n, n, symmetric=True)
  user_item = from_coo(users, items, vals, n_users, n_items)
  return adj, user_item


# ----------------------------------------------------------------------------------------------- item-item graph


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(block: jax.Array, all_rows: jax.Array, k: int):
  """Top-k cosine neighbours of the rows `block` [b, d] among `all_rows` [n, d] (both already L2-normalised)."""
  return jax.lax.top_k(block @ all_rows.T, k)


def knn_graph(features: np.ndarray, k: int, block_rows: int = 4096,
              members: Optional[np.ndarray] = None) -> Graph:
  """Row-wise top-k cosine kNN graph, "sym" normalised by row sums, not symmetrised (docs/method.md §5.2b).

  S_ij = cos(F_i, F_j); row i keeps its k largest entries (itself included); r_i = sum of row i's kept values;
  S̃_ij = r_i^-1/2 S_ij r_j^-1/2 (a zero row sum gives weight 0). h_mm = S̃ @ P is `propagate(graph, P)`.
  Built from `block_rows` rows at a time, so memory is O(block_rows * n_items), never n x n.

  Args:
    features: [n_items, d_f] raw item features (the initial table; the graph is never rebuilt).
    members: None (every item), or the sorted item ids the graph is built over: only their rows have edges and only
      they are neighbours, so the other items take no part (the inductive cold-start protocol's held-out items).
  Returns:
    Graph [n_items, n_items] with len(members) * k edges.
  """
  features = np.asarray(features, np.float32)
  if members is not None:
    members = np.asarray(members, np.int64)
    sub = knn_graph(features[members], k, block_rows)
    return from_coo(members[np.asarray(sub.dst)], members[np.asarray(sub.src)], np.asarray(sub.w),
                    features.shape[0], features.shape[0])
  n = features.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"model.knn_k = {k} must lie in [1, n_items = {n}]")
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  # A zero feature row would give NaN cosines in the reference; here it is a row of zeros (similarity 0).
  normed = jnp.asarray(features / np.where(norms > 0, norms, 1.0))
  values, indices = [], []
  for start in range(0, n, block_rows):
    v, i = _knn_block(normed[start:start + block_rows], normed, k)
    values.append(np.asarray(v))
    indices.append(np.asarray(i))
  values = np.concatenate(values).astype(np.float64)  # [n, k]
  indices = np.concatenate(indices).astype(np.int64)
  row_sum = values.sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    inv_sqrt = np.power(row_sum, -0.5)
  inv_sqrt[~np.isfinite(inv_sqrt)] = 0.0
  rows = np.repeat(np.arange(n), k)
  cols = indices.reshape(-1)
  weights = inv_sqrt[rows] * values.reshape(-1) * inv_sqrt[cols]
  return from_coo(rows, cols, weights.astype(np.float32), n, n)
