"""Scoring items that have no train interactions: cold-start items and items added to a trained run.

A recommender scores an item by the dot product with its vector. An item never seen in training has no trained ID
embedding, and in AlignRec its content view is that same ID embedding gated by the features, so the paper's model
gives it an untrained vector (lfm2k: the cold items' Recall@20 falls from 0.70 at epoch 20 to 0.37 at the epoch warm
early stopping selects, docs/experiments.md). The neighbour rule takes the content signal from the features instead:

  v_new = sum_j w_j v_j / sum_j w_j,  j in the k trained items most similar to the new item,  w_j = cos(f_new, f_j)

where f is the model's content features (`Recommender.content_slots`; several slots: each row L2-normalised, then
concatenated, so the similarity is the slots' mean cosine) and v the trained item vectors that evaluation scores
with. Only items with train interactions are neighbours, so an added item never changes an existing vector, and a
cold item in the inductive protocol (data.cold_inductive) gets exactly what the same item added later gets.
`model.cold_start='neighbours'` applies it to every item without train interactions during evaluation and export;
`Run.add_items` (export.py) applies it to new items.
"""

from typing import Mapping, Optional, Sequence

import numpy as np

from alignrec_jax.errors import ConfigError

BLOCK_ROWS = 2048  # query rows per similarity block: memory O(BLOCK_ROWS * n_anchors)


def similarity_rows(features: Mapping[str, np.ndarray], slots: Sequence[str]) -> np.ndarray:
  """[n, sum d] rows whose dot products are the mean cosine over `slots` (zero rows stay zero)."""
  parts = []
  for slot in slots:
    f = np.asarray(features[slot], np.float32)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    parts.append(f / np.where(norms > 0, norms, 1.0))
  return np.concatenate(parts, axis=1) / np.sqrt(len(slots))


class NeighbourRule:
  """The neighbour rule over fixed anchors (the trained items).

  anchor_ids: [n_a] item ids with train interactions; anchor_rows: their `similarity_rows`; k: neighbours per item.
  """

  def __init__(self, anchor_ids: np.ndarray, anchor_rows: np.ndarray, k: int):
    if not len(anchor_ids):
      raise ValueError("no trained item to attach new items to")
    self.anchor_ids = np.asarray(anchor_ids, np.int64)
    self.anchor_rows = np.asarray(anchor_rows, np.float32)
    self.k = int(min(max(k, 1), len(anchor_ids)))

  def neighbours(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item ids [n, k], cosine weights [n, k] float64) of each query row's k most similar anchors, most similar
    first (ties: the lower item id)."""
    rows = np.asarray(rows, np.float32)
    ids, sims = [], []
    for start in range(0, len(rows), BLOCK_ROWS):
      s = rows[start:start + BLOCK_ROWS] @ self.anchor_rows.T  # [b, n_a]
      top = np.argsort(-s, axis=1, kind="stable")[:, :self.k]
      ids.append(self.anchor_ids[top])
      sims.append(np.take_along_axis(s, top, axis=1).astype(np.float64))
    if not ids:
      return np.zeros((0, self.k), np.int64), np.zeros((0, self.k))
    return np.concatenate(ids), np.concatenate(sims)

  def vectors(self, item_emb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[n, d] float32 vectors of the query rows from the trained item vectors `item_emb` [I, d]."""
    return mix(item_emb, *self.neighbours(rows))


def mix(item_emb: np.ndarray, ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
  """[n, d] float32: each row's neighbour vectors item_emb[ids] averaged with weights sims / sum(sims)."""
  total = sims.sum(axis=1, keepdims=True)
  ok = np.abs(total) > 1e-12  # weights that cancel (or a zero feature row): the plain mean
  weights = np.where(ok, sims / np.where(ok, total, 1.0), 1.0 / sims.shape[1])
  return np.einsum("nk,nkd->nd", weights, np.asarray(item_emb, np.float64)[ids]).astype(np.float32)


def trained_items(train: np.ndarray, n_items: int) -> np.ndarray:
  """[n_items] bool: the items with at least one train interaction."""
  has = np.zeros(n_items, bool)
  has[np.asarray(train)[:, 1]] = True
  return has


def rule_for(data, slots: Sequence[str], k: int) -> tuple[NeighbourRule, np.ndarray]:
  """(the rule anchored on `data`'s trained items, the similarity rows of every item [n_items, ...])."""
  rows = similarity_rows(data.features, slots)
  has = trained_items(data.train, data.n_items)
  return NeighbourRule(np.flatnonzero(has), rows[has], k), rows


class ColdStart:
  """model.cold_start='neighbours' for a dataset: the items without train interactions and their neighbours, found
  once; `__call__(item_emb)` gives the table evaluation and export score with."""

  def __init__(self, data, slots: Sequence[str], k: int):
    rule, rows = rule_for(data, slots, k)
    self.items = np.flatnonzero(~trained_items(data.train, data.n_items))
    self.ids, self.sims = rule.neighbours(rows[self.items])

  def __call__(self, item_emb) -> np.ndarray:
    item_emb = np.array(item_emb, np.float32)
    if len(self.items):
      item_emb[self.items] = mix(item_emb, self.ids, self.sims)
    return item_emb


def cold_start(model, data, config) -> Optional[ColdStart]:
  """The ColdStart of config.model.cold_start for `model` on `data` (None for 'own'); `data` must still hold the
  features. ValueError for an ID-only model, which has no content to find neighbours by."""
  if config.model.cold_start != "neighbours":
    return None
  slots = model.content_slots(data)
  if not slots:
    raise ConfigError(f"config.model.cold_start='neighbours' needs a content model; {config.model.name!r} scores items "
                      "by their ID embedding alone (set model.cold_start='own')")
  return ColdStart(data, slots, int(config.model.knn_k))
