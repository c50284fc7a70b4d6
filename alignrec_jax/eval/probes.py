"""The maths of the paper's intermediate evaluations of item feature tables, docs/method.md §9; the probe stage that
runs them (`--config.stage=probe`, feature specs, mask-modality training, results.json) is train/probe.py.

Metric classes (`config.probe.classes`), all evaluated with the MMRec full-ranking protocol of eval/ranking.py:
  zero_shot      no training: a user is the mean of the raw features of their train items, items are ranked by
                 cosine to it (ranking by user . item / |item|; the user's norm does not change a ranking).
  item_cf        no training: ItemKNNCBF as the MMRec reference: sim_ij = f_i.f_j / (|f_i||f_j| + shrink), keep the
                 top-k entries of each row (self included), score(u, .) = R_u S^k. S^k is built in item blocks,
                 scores in user blocks by scatter-adding neighbour rows, so no n_items x n_items or n_users x n_items
                 matrix exists. Exact score ties (items no train item has as a neighbour) rank by item id.
  mask_modality  stage 2 (train/stage2.py, with `config.train` as given) on the unmasked table and on tables whose
                 masked items (the first round(mask_ratio * n_items) of a seeded permutation, saved as
                 `<workdir>/mask_items.npy` and reused; `probe.mask_items` reuses another run's file) take the rows
                 of the stage-1 mask_image / mask_text extraction, or are zeroed for a plain `.npy` table.
"""

import functools
import os
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.errors import ConfigError
from alignrec_jax.eval import ranking

CLASSES = ("zero_shot", "item_cf", "mask_modality")
_EPS = 1e-12
_MAX_BLOCK_ELEMENTS = 1 << 24  # rows x n_items per jitted block (64 MB of float32)


# --------------------------------------------------------------------------------------------------- zero-shot

@jax.jit
def _add_rows(acc: jax.Array, features: jax.Array, users: jax.Array, items: jax.Array) -> jax.Array:
  """acc[users[j]] += features[items[j]]; padding entries carry user id len(acc) and are dropped."""
  return acc.at[users].add(features[items], mode="drop")


def user_mean_features(features: np.ndarray, train: np.ndarray, n_users: int, chunk: int = 1 << 14) -> np.ndarray:
  """[n_users, d]: each user's mean train-item feature (0 for users without train items).

  Accumulated in fixed-size interaction chunks so that no [n_train, d] gather is ever materialised.
  """
  feats = jnp.asarray(features, jnp.float32)
  acc = jnp.zeros((n_users, feats.shape[1]), jnp.float32)
  for start in range(0, len(train), chunk):
    rows = train[start:start + chunk]
    users = np.full(chunk, n_users, np.int32)
    items = np.zeros(chunk, np.int32)
    users[:len(rows)], items[:len(rows)] = rows[:, 0], rows[:, 1]
    acc = _add_rows(acc, feats, users, items)
  counts = np.bincount(train[:, 0], minlength=n_users).astype(np.float32)
  return np.asarray(acc) / np.maximum(counts, 1.0)[:, None]


def zero_shot_embeddings(features: np.ndarray, data: mmrec.RecData) -> tuple[np.ndarray, np.ndarray]:
  """(user [n_users, d], item [n_items, d]) whose dot product ranks items by cosine to the user's mean feature."""
  users = user_mean_features(features, data.train, data.n_users)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return users, (features / np.maximum(norms, _EPS)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- item-CF

@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(block: jax.Array, block_norm: jax.Array, features: jax.Array, norms: jax.Array, shrink: float,
               k: int) -> tuple[jax.Array, jax.Array]:
  """Row-wise top-k (values [b, k], ids [b, k]) of the shrunk cosine of `block` [b, d] against every item."""
  sim = (block @ features.T) / (block_norm[:, None] * norms[None, :] + shrink)
  return jax.lax.top_k(sim, k)


def item_knn(features: np.ndarray, k: int = 10, shrink: float = 10.0,
             block_rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """ItemKNNCBF's S^k as (values [n_items, k] float32, neighbour ids [n_items, k] int32), built in item blocks of
  `block_rows` rows (default: as many as fit a 64 MB similarity block)."""
  n_items = features.shape[0]
  k = min(k, n_items)
  feats = jnp.asarray(features, jnp.float32)
  norms = jnp.linalg.norm(feats, axis=1)
  block = max(1, min(n_items, block_rows or _MAX_BLOCK_ELEMENTS // n_items))
  values, indices = [], []
  for start in range(0, n_items, block):
    rows = np.arange(start, start + block) % n_items  # the last block wraps around: one compiled shape
    v, i = _knn_block(feats[rows], norms[rows], feats, norms, float(shrink), k=k)
    n = min(block, n_items - start)
    values.append(np.asarray(v)[:n])
    indices.append(np.asarray(i)[:n])
  return np.concatenate(values), np.concatenate(indices).astype(np.int32)


def _cf_topk_fn(knn_val: jax.Array, knn_idx: jax.Array, rows: jax.Array, items: jax.Array, mask_rows: jax.Array,
                mask_cols: jax.Array, batch: int, k: int) -> jax.Array:
  """Top-k of R_block S^k: row r gets S^k[items[j]] for every j with rows[j] = r (padding rows = batch: dropped)."""
  n_items, knn_k = knn_idx.shape
  scores = jnp.zeros((batch, n_items), jnp.float32)
  scores = scores.at[jnp.repeat(rows, knn_k), knn_idx[items].reshape(-1)].add(knn_val[items].reshape(-1),
                                                                             mode="drop")
  scores = scores.at[mask_rows, mask_cols].set(-jnp.inf, mode="drop")
  return jax.lax.top_k(scores, k)[1]


_cf_topk = jax.jit(_cf_topk_fn, static_argnames=("batch", "k"))


def _block_train_items(split: ranking.EvalSplit, start: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(block-local rows, items) of the train items of split users start..start+n, padded to a power of two with
  row `batch` (dropped by the scatters) so that few shapes are compiled."""
  lo, hi = split.mask_indptr[start], split.mask_indptr[start + n]
  size = max(1024, 1 << max(0, int(hi - lo - 1).bit_length()))
  rows = np.full(size, batch, np.int32)
  items = np.zeros(size, np.int32)
  rows[:hi - lo] = np.repeat(np.arange(n, dtype=np.int32), np.diff(split.mask_indptr[start:start + n + 1]))
  items[:hi - lo] = split.mask_items[lo:hi]
  return rows, items


def item_cf_topk(knn: tuple[np.ndarray, np.ndarray], split: ranking.EvalSplit, k: int = 50,
                 batch_users: int = 4096, history: Optional[ranking.EvalSplit] = None) -> np.ndarray:
  """[n_eval, k] item ids ranked by ItemKNNCBF scores R_u S^k for the split's users, the split's mask applied.

  history: the users' train items R_u when the split masks more than them (ranking.over_all_items); by default
  the split's mask, which is then exactly the train items."""
  knn_val, knn_idx = (jnp.asarray(a) for a in knn)
  n_items = split.n_items
  k = min(k, n_items)
  batch = max(1, min(batch_users, _MAX_BLOCK_ELEMENTS // n_items, len(split.users)))
  out = []
  for start in range(0, len(split.users), batch):
    n = min(batch, len(split.users) - start)
    rows, cols = _block_train_items(split, start, n, batch)  # the entries to mask
    hist_rows, hist_cols = (rows, cols) if history is None else _block_train_items(history, start, n, batch)
    ids = _cf_topk(knn_val, knn_idx, hist_rows, hist_cols, rows, cols, batch=batch, k=k)
    out.append(np.asarray(ids)[:n])
  return np.concatenate(out) if out else np.zeros((0, k), np.int32)


# --------------------------------------------------------------------------------------------------- mask-modality

def masked_item_set(n_items: int, ratio: float, seed: int, path: str, reuse: str = "") -> np.ndarray:
  """The sorted ids of the masked items: the first round(ratio * n_items) of a seeded permutation.

  The permutation is saved at `path` (or read from `reuse`, or from `path` if it exists) so that every run masks the
  same items.
  """
  if not 0.0 < ratio < 1.0:
    raise ConfigError(f"config.probe.mask_ratio={ratio} must lie strictly between 0 and 1")
  source = os.path.expanduser(reuse) if reuse else (path if os.path.isfile(path) else "")
  if source:
    perm = np.load(source)
    if perm.ndim != 1 or len(perm) != n_items or not np.array_equal(np.sort(perm), np.arange(n_items)):
      raise mmrec.DataError(f"{source}: expected a permutation of the {n_items} item ids (a mask_items.npy "
                            "written by a probe run on the same dataset)")
  else:
    perm = np.random.default_rng(seed).permutation(n_items)
  if source != path:  # this workdir keeps the permutation it used
    atomic.save_npy(path, perm.astype(np.int64))
  return np.sort(perm[:int(round(ratio * n_items))])


def masked_tables(tables: Mapping[str, np.ndarray], masked: np.ndarray) -> dict[str, np.ndarray]:
  """{variant: table}: the full table with the masked items' rows from each mask variant, or zeroed if none."""
  full = tables["full"]
  out = {}
  variants = [v for v in ("mask_image", "mask_text") if v in tables]
  for variant in variants or ["zeroed"]:
    table = full.copy()
    table[masked] = tables[variant][masked] if variant in tables else 0.0
    out[variant] = table
  return out


def evaluate_topk(topk_ids: np.ndarray, split: ranking.EvalSplit, ev, item_groups) -> dict:
  return ranking.metrics_from_topk(topk_ids, split, tuple(ev.topk), tuple(ev.metrics), item_groups=item_groups)


def probe_features(features: np.ndarray, data: mmrec.RecData, splits: Mapping[str, ranking.EvalSplit],
                   classes: Sequence[str], ev: ml_collections.ConfigDict, item_cf_k: int = 10,
                   item_cf_shrink: float = 10.0, item_groups: Optional[Mapping[str, np.ndarray]] = None
                   ) -> dict[str, dict]:
  """Zero-shot and item-CF metrics of one `[n_items, d]` table: {class: {split: metrics}}."""
  out = {}
  k = max(ev.topk)
  if "zero_shot" in classes:
    user_emb, item_emb = zero_shot_embeddings(features, data)
    out["zero_shot"] = {
        name: evaluate_topk(ranking.topk_items(user_emb, item_emb, split, k, ev.batch_users), split, ev,
                             item_groups)
        for name, split in splits.items()}
  if "item_cf" in classes:
    knn = item_knn(features, item_cf_k, item_cf_shrink)
    out["item_cf"] = {}
    for name, split in splits.items():
      history = ranking.make_user_split(data, split.users)  # the train items, whatever else the split masks
      out["item_cf"][name] = evaluate_topk(item_cf_topk(knn, split, k, ev.batch_users, history), split, ev,
                                            item_groups)
  return out


def format_probe_table(results: dict, metric: str = "recall@20") -> str:
  """One line per feature table: the test `metric` of every class (and of the popularity reference)."""
  lines = [f"test {metric}"]
  for name, classes in results.get("probe", {}).items():
    cells = []
    for cls, value in classes.items():
      if cls == "mask_modality":
        cells += [f"mask/{v}={r['test'].get(metric, float('nan')):.4f}" for v, r in value.items()]
      else:
        cells.append(f"{cls}={value['test'].get(metric, float('nan')):.4f}")
    lines.append(f"  {name:<24} " + "  ".join(cells))
  pop = results.get("probe_reference", {}).get("popularity")
  if pop:
    lines.append(f"  {'(popularity)':<24} {pop['test'].get(metric, float('nan')):.4f}")
  return "\n".join(lines)
