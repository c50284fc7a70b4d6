"""Full-ranking evaluation, computed exactly as the MMRec toolbox does (docs/method.md §8).

For every user of the valid (or test) split, all items are scored, the user's *train* items are masked (and nothing
else: valid items stay candidates when testing, as in MMRec), and the top max(K) items are kept. Then, with
hit_k = 1 if the item at rank k is one of the user's held-out items G_u:

  Recall@K    = sum_{k<=K} hit_k / |G_u|
  Precision@K = sum_{k<=K} hit_k / K
  NDCG@K      = [sum_{k<=K} hit_k / log2(k+1)] / [sum_{k=1}^{min(|G_u|,K)} 1 / log2(k+1)]
  MAP@K       = [sum_{k<=K} (sum_{j<=k} hit_j / k) hit_k] / min(|G_u|, K)

averaged over users and, as MMRec prints them, rounded to 4 decimals (`round_digits=None` keeps full precision).

Scoring runs jitted in user batches on the accelerator and only the ranks of the held-out items come back (the "rank
path" below: the same positions as a top-k list, without the top-k); the metrics are computed in numpy.

Popularity groups (long-tail analysis): `item_groups` maps a group name to its item ids. A group's metrics count only
the hits on that group's items in the outer sums above, with every other term unchanged, so the groups' values add
up to the overall value (before rounding) and read as "the share of Recall@20 earned on tail items".
"""

import dataclasses
from typing import Mapping, Optional, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from alignrec_jax.data.mmrec import RecData, interactions_to_csr

METRICS = ("recall", "ndcg", "precision", "map")
_MAX_SCORE_ELEMENTS = 1 << 26  # user batch x n_items cap (256 MB of float32 scores) for big catalogues


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """What evaluating one split needs, prepared once.

  users: [n_eval] int32, the unique users of the split (ascending).
  mask_indptr, mask_items: CSR over `users` of the train items to mask.
  truth_indptr, truth_items: CSR over `users` of the held-out items G_u (sorted, de-duplicated).
  n_items: number of ranked items.
  candidates: None when every item is ranked; else the [n_items] item ids ranked (cold-start protocol), and the
    mask and truth items above are positions in it. `evaluate` takes the full item table and picks these rows.
  """
  name: str
  users: np.ndarray
  mask_indptr: np.ndarray
  mask_items: np.ndarray
  truth_indptr: np.ndarray
  truth_items: np.ndarray
  n_items: int
  candidates: Optional[np.ndarray] = None
  # Host-side batch plans of the rank path, built once per (users, k, devices) and reused every epoch.
  plans: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def truth_len(self) -> np.ndarray:
    return np.diff(self.truth_indptr)


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sub-CSR of the given rows."""
  starts, ends = indptr[rows], indptr[rows + 1]
  lengths = ends - starts
  new_indptr = np.zeros(len(rows) + 1, np.int64)
  np.cumsum(lengths, out=new_indptr[1:])
  gather = np.repeat(starts - new_indptr[:-1], lengths) + np.arange(new_indptr[-1])
  return new_indptr, indices[gather]


def make_eval_split(data: RecData, split: str) -> EvalSplit:
  """Prepares a held-out split of `data` (valid, test, or with cold-start items valid_cold, test_cold) for
  full-ranking evaluation over the items `data.candidates(split)` ranks."""
  if split not in data.held_out_splits():
    raise ValueError(f"can only evaluate the splits {data.held_out_splits()} of this dataset, not {split!r}")
  pairs = np.unique(data.split(split), axis=0)  # G_u is a set, as in MMRec
  users = np.unique(pairs[:, 0]).astype(np.int32)
  truth_indptr_all, truth_all = interactions_to_csr(pairs, data.n_users)
  truth_indptr, truth_items = _csr_rows(truth_indptr_all, truth_all, users)
  train_indptr, train_items = data.train_csr()
  mask_indptr, mask_items = _csr_rows(train_indptr, train_items, users)
  candidates = data.candidates(split)
  if candidates is None:
    return EvalSplit(split, users, mask_indptr, mask_items, truth_indptr, truth_items, data.n_items)
  position = np.full(data.n_items, -1, np.int64)
  position[candidates] = np.arange(len(candidates))
  truth_items = position[truth_items].astype(np.int32)
  if (truth_items < 0).any():
    raise ValueError(f"split {split!r} holds items outside the items it is ranked over")
  # train items that are not candidates need no mask (the cold splits' candidates never occur in train)
  keep = position[mask_items] >= 0
  row = np.repeat(np.arange(len(users)), np.diff(mask_indptr))
  mask_indptr = np.concatenate([[0], np.cumsum(np.bincount(row[keep], minlength=len(users)))]).astype(np.int64)
  mask_items = position[mask_items[keep]].astype(np.int32)
  return EvalSplit(split, users, mask_indptr, mask_items, truth_indptr, truth_items, len(candidates),
                   np.asarray(candidates, np.int32))


def over_all_items(data: RecData, split: EvalSplit) -> EvalSplit:
  """`split` in item-id space over every item, the items outside its candidates masked with the train items, for
  code that scores every item (the probes). The same ranking as `split`'s (ties still go to the lower item id).
  Its mask holds |users| x |items outside| entries: meant for probe-sized data."""
  if split.candidates is None:
    return split
  n_users = len(split.users)
  train_indptr, train_items = _csr_rows(*data.train_csr(), split.users)
  outside = np.setdiff1d(np.arange(data.n_items), split.candidates)
  rows = np.concatenate([np.repeat(np.arange(n_users), np.diff(train_indptr)), np.repeat(np.arange(n_users),
                                                                                        len(outside))])
  items = np.concatenate([train_items, np.tile(outside, n_users)])
  keys = np.unique(rows.astype(np.int64) * data.n_items + items)
  mask_indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // data.n_items, minlength=n_users))])
  return EvalSplit(split.name, split.users, mask_indptr.astype(np.int64), (keys % data.n_items).astype(np.int32),
                   split.truth_indptr, split.candidates[split.truth_items].astype(np.int32), data.n_items)


def make_user_split(data: RecData, users: np.ndarray, exclude_seen: bool = True, name: str = "users") -> EvalSplit:
  """A split of any users (in the given order, repeats allowed) with no held-out items, for `topk_items`: their
  train items masked exactly as `make_eval_split` masks them (`exclude_seen`), or nothing masked."""
  users = np.asarray(users, np.int32).reshape(-1)
  if exclude_seen:
    mask_indptr, mask_items = _csr_rows(*data.train_csr(), users)
  else:
    mask_indptr, mask_items = np.zeros(len(users) + 1, np.int64), np.zeros(0, np.int32)
  empty_indptr = np.zeros(len(users) + 1, np.int64)
  return EvalSplit(name, users, mask_indptr, mask_items, empty_indptr, np.zeros(0, np.int32), data.n_items)


def _masked_topk_fn(user_emb: jax.Array, item_emb: jax.Array, users: jax.Array, mask_rows: jax.Array,
                 mask_cols: jax.Array, k: int) -> jax.Array:
  """Top-k item ids of `user_emb[users] @ item_emb.T` with (mask_rows, mask_cols) set to -inf.

  Padding entries of the mask use row index len(users) and are dropped by the scatter.
  """
  scores = user_emb[users] @ item_emb.T
  scores = scores.at[mask_rows, mask_cols].set(-jnp.inf, mode="drop")
  return jax.lax.top_k(scores, k)[1]


_masked_topk = jax.jit(_masked_topk_fn, static_argnames=("k",))


# The same function on every local device, each on its own slice of users (embeddings replicated).
_masked_topk_pmap = jax.pmap(_masked_topk_fn, in_axes=(0, 0, 0, 0, 0, None), static_broadcasted_argnums=(5,))


def _bucket(n: int, minimum: int = 1024) -> int:
  """Next power of two >= n, so that mask sizes reuse a handful of compiled shapes."""
  return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def _batch_masks(split: EvalSplit, start: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Padded (users [batch], mask_rows [size], mask_cols [size]) for split users start..start+n (batch-local rows)."""
  lo, hi = split.mask_indptr[start], split.mask_indptr[start + n]
  size = _bucket(hi - lo)
  mask_rows = np.full(size, batch, np.int32)  # out-of-range row: dropped by the scatter
  mask_cols = np.zeros(size, np.int32)
  mask_rows[:hi - lo] = np.repeat(np.arange(n, dtype=np.int32), np.diff(split.mask_indptr[start:start + n + 1]))
  mask_cols[:hi - lo] = split.mask_items[lo:hi]
  users = np.zeros(batch, np.int32)
  users[:n] = split.users[start:start + n]
  return users, mask_rows, mask_cols


def _local_topk(user_emb, item_emb, split: EvalSplit, lo: int, hi: int, k: int, batch_users: int,
                n_dev: int) -> np.ndarray:
  """Top-k of split users lo..hi on the first `n_dev` local devices (a pmap over them when there are several)."""
  per_device = max(1, min(batch_users, _MAX_SCORE_ELEMENTS // max(1, split.n_items)) // n_dev)
  per_device = min(per_device, -(-(hi - lo) // n_dev)) if hi > lo else 1
  out = []
  if n_dev == 1:
    user_emb, item_emb = jnp.asarray(user_emb), jnp.asarray(item_emb)
    for start in range(lo, hi, per_device):
      n = min(per_device, hi - start)
      users, rows, cols = _batch_masks(split, start, n, per_device)
      out.append(np.asarray(_masked_topk(user_emb, item_emb, users, rows, cols, k))[:n])
  else:
    user_emb, item_emb = flax.jax_utils.replicate((jnp.asarray(user_emb), jnp.asarray(item_emb)),
                                                  jax.local_devices()[:n_dev])
    for start in range(lo, hi, per_device * n_dev):
      chunks = [(s, min(per_device, hi - s)) for s in range(start, start + per_device * n_dev, per_device)]
      parts = [_batch_masks(split, s, max(n, 0), per_device) if n > 0 else
               (np.zeros(per_device, np.int32), np.full(1024, per_device, np.int32), np.zeros(1024, np.int32))
               for s, n in chunks]
      size = max(p[1].size for p in parts)
      pad = lambda a, fill: np.concatenate([a, np.full(size - a.size, fill, np.int32)])
      users = np.stack([p[0] for p in parts])
      rows = np.stack([pad(p[1], per_device) for p in parts])
      cols = np.stack([pad(p[2], 0) for p in parts])
      idx = np.asarray(_masked_topk_pmap(user_emb, item_emb, users, rows, cols, k))
      out.extend(idx[d, :n] for d, (_, n) in enumerate(chunks) if n > 0)
  return np.concatenate(out, axis=0) if out else np.zeros((0, k), np.int32)


def topk_items(user_emb, item_emb, split: EvalSplit, k: int = 50, batch_users: int = 4096,
               num_devices: int = 0) -> np.ndarray:
  """[n_eval, k] item ids ranked by `user_emb @ item_emb.T` for the split's users, train items masked.

  The users are sharded over every device: across processes (contiguous blocks, gathered back so that every
  process returns the whole ranking) and, within a process, over its local devices with pmap.

  Args:
    user_emb: [n_users, d] representations indexed by user id (all users).
    item_emb: [n_items, d].
    num_devices: local devices to use (0 = all).
  """
  n_dev = num_devices or jax.local_device_count()
  if item_emb.shape[0] != split.n_items:
    raise ValueError(f"item_emb has {item_emb.shape[0]} rows, the dataset has {split.n_items} items")
  k = min(k, split.n_items)
  return _over_processes(lambda lo, hi: _local_topk(user_emb, item_emb, split, lo, hi, k, batch_users, n_dev),
                         len(split.users), k, fill=0)


def _over_processes(local_fn, n_eval: int, k: int, fill: int) -> np.ndarray:
  """[n_eval, k] int32 rows of `local_fn(lo, hi)` ([hi - lo, k] for split users lo..hi): each process computes a
  contiguous block of users and the blocks are gathered back, so that every process returns all the rows."""
  n_proc = jax.process_count()
  if n_proc == 1:
    return local_fn(0, n_eval)
  block = -(-n_eval // n_proc)
  lo = min(n_eval, jax.process_index() * block)
  hi = min(n_eval, lo + block)
  local = np.full((block, k), fill, np.int32)
  local[:hi - lo] = local_fn(lo, hi)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [n_proc, block, k]
  return gathered.reshape(-1, k)[:n_eval]


# ------------------------------------------------------------------------------------- the rank path (no top-k)
#
# Every metric above depends only on WHERE the user's held-out items land in the top max(K), so instead of a top-k
# over all items (XLA:CPU's TopK is most of an evaluation pass; docs/experiments.md) each held-out
# item t gets its rank directly: the number of the user's candidates that beat it,
#   rank(t) = #{j unmasked : s_j > s_t  or  (s_j == s_t and j < t)},
# which is exactly its position in `jax.lax.top_k`'s list (ties go to the lower item id). The count is a fused
# compare-and-sum over the user's score row; masked (train) items are counted over all items and their share is
# subtracted, so the [users, items] matrix is never scattered into. Users are grouped by their number of held-out
# items (most have one), scored in small chunks that stay in cache. Used when every user keeps at least max(K)
# candidates (then a masked held-out item can never enter the top max(K)); otherwise the top-k path runs.

_RANK_CHUNK = 64          # users scored together: a [64, n_items] score tile that stays in cache
_RANK_BATCH_CHUNKS = 64   # chunks per jitted call


def _chunk_ranks(item_emb_t, user_emb, truth, mask_rows, mask_cols, k):
  """Ranks [c, T] of the held-out items `truth` [c, T] (-1 = padding -> k) of one chunk of users [c, d].

  item_emb_t: [d, n] (items along the fast axis: faster on CPU than contracting [n, d]).
  mask_rows/mask_cols [M]: the chunk's masked (row, item) pairs; row c marks padding.
  """
  scores = user_emb @ item_emb_t  # [c, n]; every comparison below reads this one matrix (bit-identical values)
  truth_scores = jnp.take_along_axis(scores, jnp.maximum(truth, 0), axis=1)  # [c, T]
  item_ids = jnp.arange(item_emb_t.shape[1], dtype=jnp.int32)

  def beats(s, ids, t_score, t_id):
    return (s > t_score) | ((s == t_score) & (ids < t_id))
  count = jnp.sum(beats(scores[:, None, :], item_ids, truth_scores[:, :, None], truth[:, :, None]), axis=-1,
                  dtype=jnp.int32)
  c = user_emb.shape[0]
  rows = jnp.minimum(mask_rows, c - 1)
  masked = beats(scores[rows, mask_cols][:, None], mask_cols[:, None], truth_scores[rows], truth[rows])
  masked = (masked & (mask_rows < c)[:, None]).astype(jnp.int32)
  count = count - jax.ops.segment_sum(masked, mask_rows, num_segments=c + 1)[:c]
  return jnp.where(truth >= 0, count, k)


def _ranks_fn(user_emb, item_emb_t, users, truth, mask_rows, mask_cols, k):
  """users [nc, c], truth [nc, c, T], mask_* [nc, M] -> ranks [nc, c, T], one chunk at a time."""
  return jax.lax.map(lambda a: _chunk_ranks(item_emb_t, user_emb[a[0]], a[1], a[2], a[3], k),
                     (users, truth, mask_rows, mask_cols))


_ranks = jax.jit(_ranks_fn, static_argnames=("k",))
_transpose = jax.jit(jnp.transpose)  # a materialised [d, n] copy, made once per evaluation
_ranks_pmap = jax.pmap(_ranks_fn, in_axes=(None, None, 0, 0, 0, 0, None), static_broadcasted_argnums=(6,))


def _ragged_positions(lengths: np.ndarray) -> np.ndarray:
  """0..len-1 for every row of a ragged layout, concatenated."""
  return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _rank_plan(split: EvalSplit, lo: int, hi: int, n_dev: int) -> list:
  """Padded host batches for split users lo..hi: [(rows [n], T, users, truth, mask_rows, mask_cols)].

  A truth item that is also a train item of the user is masked (score -inf in the top-k path): never a hit.
  """
  key = (lo, hi, n_dev)
  if key in split.plans:
    return split.plans[key]
  rows_all = np.arange(lo, hi)
  truth_len = split.truth_len[lo:hi]
  t_users = np.repeat(split.users[lo:hi], truth_len)
  t_items = split.truth_items[split.truth_indptr[lo]:split.truth_indptr[hi]]
  mask_len = np.diff(split.mask_indptr)
  mask_keys = np.repeat(split.users.astype(np.int64), mask_len) * split.n_items + split.mask_items
  t_items = np.where(np.isin(t_users.astype(np.int64) * split.n_items + t_items, mask_keys), -1, t_items)
  t_start = np.cumsum(truth_len) - truth_len  # offset of each row's first truth item in t_items
  buckets = np.maximum(1, 1 << np.maximum(0, np.ceil(np.log2(np.maximum(truth_len, 1)))).astype(np.int64))
  per_call = _RANK_CHUNK * _RANK_BATCH_CHUNKS * n_dev
  plan = []
  for bucket in np.unique(buckets):
    group = np.flatnonzero(buckets == bucket)
    for start in range(0, len(group), per_call):
      sel = group[start:start + per_call]  # positions in lo..hi
      n_chunks = -(-len(sel) // _RANK_CHUNK)
      n_chunks = -(-n_chunks // (4 * n_dev)) * 4 * n_dev  # few distinct shapes, little padding
      padded = n_chunks * _RANK_CHUNK
      users = np.zeros(padded, np.int32)
      users[:len(sel)] = split.users[lo + sel]
      truth = np.full((padded, int(bucket)), -1, np.int32)
      lens = truth_len[sel]
      r = np.repeat(np.arange(len(sel)), lens)
      cpos = _ragged_positions(lens)
      truth[r, cpos] = t_items[np.repeat(t_start[sel], lens) + cpos]
      mlens = mask_len[lo + sel]
      mr = np.repeat(np.arange(len(sel)), mlens)
      mc = split.mask_items[np.repeat(split.mask_indptr[lo + sel], mlens) + _ragged_positions(mlens)]
      chunk_of = mr // _RANK_CHUNK
      per_chunk = np.bincount(chunk_of, minlength=n_chunks)
      size = 1 << int(max(1, per_chunk.max(initial=1)) - 1).bit_length()
      mask_rows = np.full((n_chunks, size), _RANK_CHUNK, np.int32)
      mask_cols = np.zeros((n_chunks, size), np.int32)
      within = np.arange(len(mr)) - np.repeat(np.cumsum(per_chunk) - per_chunk, per_chunk)
      mask_rows[chunk_of, within] = mr % _RANK_CHUNK
      mask_cols[chunk_of, within] = mc
      plan.append((rows_all[sel] - lo, int(bucket), users.reshape(n_chunks, _RANK_CHUNK),
                   truth.reshape(n_chunks, _RANK_CHUNK, -1), mask_rows, mask_cols))
  split.plans[key] = plan
  return plan


def _local_hit_items(user_emb, item_emb, split: EvalSplit, lo: int, hi: int, k: int, n_dev: int) -> np.ndarray:
  """[hi - lo, k] int32: the held-out item at each rank < k of split users lo..hi, -1 where there is no hit."""
  out = np.full((hi - lo, k), -1, np.int32)
  user_emb, item_emb_t = jnp.asarray(user_emb), _transpose(jnp.asarray(item_emb))
  for rows, _, users, truth, mask_rows, mask_cols in _rank_plan(split, lo, hi, n_dev):
    if n_dev == 1:
      ranks = _ranks(user_emb, item_emb_t, users, truth, mask_rows, mask_cols, k)
    else:
      split_dev = lambda a: a.reshape(n_dev, -1, *a.shape[1:])
      ranks = _ranks_pmap(user_emb, item_emb_t, split_dev(users), split_dev(truth), split_dev(mask_rows),
                          split_dev(mask_cols), k)
    ranks = np.asarray(ranks).reshape(-1, truth.shape[-1])[:len(rows)]
    truth = truth.reshape(-1, truth.shape[-1])[:len(rows)]
    r, c = np.nonzero(ranks < k)
    out[rows[r], ranks[r, c]] = truth[r, c]
  return out


def _rank_path_applies(split: EvalSplit, k: int) -> bool:
  """True when every user keeps >= k unmasked candidates (then masked items never reach the top k)."""
  return len(split.users) > 0 and split.n_items - int(np.diff(split.mask_indptr).max(initial=0)) >= k


def hit_items(user_emb, item_emb, split: EvalSplit, k: int = 50, batch_users: int = 4096,
              num_devices: int = 0) -> np.ndarray:
  """[n_eval, k] int32: the held-out item at each of the top k ranks of every split user, -1 where none is.

  The same ranking as `topk_items` (train items masked, ties to the lower item id), restricted to what the metrics
  read; computed by the rank path when it applies (see above), else from `topk_items`. Sharded like `topk_items`.
  """
  n_dev = num_devices or jax.local_device_count()
  if item_emb.shape[0] != split.n_items:
    raise ValueError(f"item_emb has {item_emb.shape[0]} rows, the dataset has {split.n_items} items")
  k = min(k, split.n_items)
  if not _rank_path_applies(split, k):
    top = topk_items(user_emb, item_emb, split, k, batch_users, num_devices)
    return np.where(hits_matrix(top, split), top, -1).astype(np.int32)
  return _over_processes(lambda lo, hi: _local_hit_items(user_emb, item_emb, split, lo, hi, k, n_dev),
                         len(split.users), k, fill=-1)


def hits_matrix(topk: np.ndarray, split: EvalSplit) -> np.ndarray:
  """[n_eval, k] bool: is the item at rank k one of the user's held-out items."""
  n_eval, k = topk.shape
  row_of_truth = np.repeat(np.arange(n_eval, dtype=np.int64), split.truth_len)
  truth_keys = row_of_truth * split.n_items + split.truth_items
  topk_keys = np.arange(n_eval, dtype=np.int64)[:, None] * split.n_items + topk
  return np.isin(topk_keys, truth_keys)


def _metric_curves(hits: np.ndarray, outer_hits: np.ndarray, truth_len: np.ndarray) -> dict[str, np.ndarray]:
  """Per-rank metric curves [max_k] averaged over users. `outer_hits` are the hits counted in the outer sums."""
  max_k = hits.shape[1]
  ranks = np.arange(1, max_k + 1, dtype=np.float64)
  outer = outer_hits.astype(np.float64)
  capped = np.minimum(truth_len[:, None], ranks[None, :])  # min(|G_u|, K)
  discount = 1.0 / np.log2(ranks + 1.0)
  idcg_prefix = np.concatenate([[0.0], np.cumsum(discount)])
  idcg = idcg_prefix[capped.astype(np.int64)]
  precision_at = np.cumsum(hits, axis=1) / ranks  # sum_{j<=k} hit_j / k: uses every hit
  curves = {
      "recall": np.cumsum(outer, axis=1) / truth_len[:, None],
      "precision": np.cumsum(outer, axis=1) / ranks,
      "ndcg": np.cumsum(outer * discount, axis=1) / idcg,
      "map": np.cumsum(precision_at * outer, axis=1) / capped,
  }
  return {name: curve.mean(axis=0) for name, curve in curves.items()}


def _select(curves: Mapping[str, np.ndarray], topk: Sequence[int], metrics: Sequence[str],
            round_digits: Optional[int]) -> dict[str, float]:
  out = {}
  for metric in metrics:
    if metric not in curves:
      raise ValueError(f"unknown metric {metric!r}; known: {METRICS}")
    for k in topk:
      value = float(curves[metric][k - 1])
      out[f"{metric}@{k}"] = round(value, round_digits) if round_digits is not None else value
  return out


def metrics_from_topk(topk_ids: np.ndarray, split: EvalSplit, topk: Sequence[int] = (5, 10, 20, 50),
                      metrics: Sequence[str] = METRICS, round_digits: Optional[int] = 4,
                      item_groups: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  """MMRec metrics from ranked item ids `[n_eval, >= max(topk)]`.

  Returns {"recall@20": ..., ...}; with `item_groups`, also {"groups": {name: {"recall@20": ...}}}.
  """
  if max(topk) > topk_ids.shape[1]:
    raise ValueError(f"asked for K={max(topk)} but only {topk_ids.shape[1]} ranked items were given")
  topk_ids = topk_ids[:, :max(topk)]
  hits = hits_matrix(topk_ids, split)
  return metrics_from_hit_items(np.where(hits, topk_ids, -1), split, topk, metrics, round_digits, item_groups)


def metrics_from_hit_items(hit_ids: np.ndarray, split: EvalSplit, topk: Sequence[int] = (5, 10, 20, 50),
                           metrics: Sequence[str] = METRICS, round_digits: Optional[int] = 4,
                           item_groups: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  """MMRec metrics from `hit_ids` [n_eval, >= max(topk)]: the held-out item at each rank, -1 where none is."""
  if max(topk) > hit_ids.shape[1]:
    raise ValueError(f"asked for K={max(topk)} but only {hit_ids.shape[1]} ranks were given")
  hit_ids = hit_ids[:, :max(topk)]
  hits = hit_ids >= 0
  truth_len = split.truth_len.astype(np.float64)
  result = _select(_metric_curves(hits, hits, truth_len), topk, metrics, round_digits)
  if item_groups:
    result["groups"] = {}
    for name, items in item_groups.items():
      in_group = np.zeros(split.n_items, bool)
      in_group[np.asarray(items, dtype=np.int64)] = True
      curves = _metric_curves(hits, hits & in_group[np.maximum(hit_ids, 0)], truth_len)
      result["groups"][name] = _select(curves, topk, metrics, round_digits)
  return result


def evaluate(user_emb, item_emb, split: EvalSplit, topk: Sequence[int] = (5, 10, 20, 50), batch_users: int = 4096,
             item_groups: Optional[Mapping[str, np.ndarray]] = None, metrics: Sequence[str] = METRICS,
             round_digits: Optional[int] = 4) -> dict:
  """Full-ranking metrics of the scores `user_emb @ item_emb.T` on one split (see the module docstring).

  item_emb: [n_items, d] of every item; a split with `candidates` ranks those rows only (item_groups: item ids).
  """
  if split.candidates is not None:
    if item_groups:  # item ids -> positions among the candidates; other items are never ranked
      position = np.full(item_emb.shape[0], -1, np.int64)
      position[split.candidates] = np.arange(len(split.candidates))
      item_groups = {name: position[np.asarray(items, np.int64)] for name, items in item_groups.items()}
      item_groups = {name: p[p >= 0] for name, p in item_groups.items()}
    item_emb = item_emb[split.candidates]
  ranked = hit_items(user_emb, item_emb, split, k=max(topk), batch_users=batch_users)
  if ranked.shape[1] < max(topk):  # fewer items than K (a small cold split): ranks past the last item hit nothing
    ranked = np.pad(ranked, ((0, 0), (0, max(topk) - ranked.shape[1])), constant_values=-1)
  return metrics_from_hit_items(ranked, split, topk, metrics, round_digits, item_groups)


def popularity_groups(data: RecData, head_fractions: Sequence[float] = (0.2,)) -> dict[str, np.ndarray]:
  """Item groups by train popularity: `(0.2,)` -> head (top 20% of items) and tail (the other 80%).

  Several fractions give consecutive bands, e.g. (0.2, 0.4, 0.6, 0.8) -> popularity quintiles "q1" (most popular)
  to "q5". Ties are broken by item id so that the groups are deterministic.
  """
  fractions = sorted(float(f) for f in head_fractions)
  if not fractions or fractions[0] <= 0 or fractions[-1] >= 1:
    raise ValueError(f"popularity group fractions must lie strictly between 0 and 1, got {tuple(head_fractions)}")
  popularity = data.item_popularity()
  order = np.lexsort((np.arange(data.n_items), -popularity))  # most popular first
  cuts = [0] + [int(round(f * data.n_items)) for f in fractions] + [data.n_items]
  bands = [np.sort(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
  if len(bands) == 2:
    return {"head": bands[0], "tail": bands[1]}
  return {f"q{i + 1}": band for i, band in enumerate(bands)}
