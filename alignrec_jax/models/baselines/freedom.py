"""FREEDOM: a frozen item-item kNN graph and a denoised (degree-sensitively pruned) user-item graph.

Paper: X. Zhou, Z. Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
Recommendation", ACM MM 2023 (arXiv 2211.06924). Reference implementation: MMRec, src/models/freedom.py and
src/configs/model/FREEDOM.yaml (github.com/enoche/MMRec); the grids of the AlignRec authors' FREEDOM.yaml
(github.com/sjtulyf123/AlignRec_CIKM24).

Item-item graph, built once from the initial features and frozen: for each modality, row i links to its top-k
cosine neighbours (itself included) with weight 1/k (the binary kNN matrix normalised by its row sums k,
r_i^-1/2 r_j^-1/2); with two modalities S = mm_image_weight * S_image + (1 - mm_image_weight) * S_text.
User-item graph: Â = D^-1/2 A D^-1/2 for evaluation; for training, every epoch (`epoch_inputs`) keeps
int(|E| (1 - dropout)) train edges drawn WITHOUT replacement with probability ∝ 1/sqrt(d_u d_i) (Gumbel top-k,
the distribution of torch.multinomial without replacement), renormalised by the kept graph's own degrees.

  h = S^{n_mm_layers} E_i;  (H_u, H_i) = LightGCN(E_u, E_i) over n_ui_layers on the epoch's graph;  h_i = H_i + h
  L = BPR(H_u, h_p, h_n) + reg_weight * sum_m BPR(H_u, f_m[p], f_m[n]),  f_m = F_m W_m + b_m [I, d]
with BPR = -(1/B) sum_b log sigmoid(<u, p> - <u, n>) and F_m the trainable feature tables (the modality
projections enter the loss only, not the scores). scores: H_u · h_i on the full graph.
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignrec_jax import graph as graph_lib
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import uia
from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline
from alignrec_jax.models.batch import whole_batch


@struct.dataclass
class FreedomInputs(baseline.Sizes):
  """adj: full Â [(U+I), (U+I)] (evaluation); train_adj: the epoch's pruned graph (the full one until the hook runs);
  mm_adj: the frozen item-item graph [I, I]; features: {slot: [I, d_f]}; edge_users/edge_items [E] int32 and
  edge_probs [E] float32 (∝ 1/sqrt(d_u d_i)): the train edges the pruning samples from."""
  adj: graph_lib.Graph
  train_adj: graph_lib.Graph
  mm_adj: graph_lib.Graph
  features: dict
  edge_users: jax.Array
  edge_items: jax.Array
  edge_probs: jax.Array


def binary_knn_graph(features: np.ndarray, k: int,
                     members: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """FREEDOM's kNN graph of one modality as COO (rows, cols, values): top-k cosine columns of each row, weight
  1/(k + 1e-7) (MMRec's compute_normalized_laplacian of the binary kNN matrix). features: [I, d_f]; members as
  graph.knn_graph's."""
  g = graph_lib.knn_graph(features, k, members=members)  # only its edges (row i -> its top-k) are used, not its cosine weights
  rows, cols = np.asarray(g.dst, np.int64), np.asarray(g.src, np.int64)
  row_sum = 1e-7 + np.bincount(rows, minlength=features.shape[0]).astype(np.float64)
  values = row_sum[rows] ** -0.5 * row_sum[cols] ** -0.5
  return rows, cols, values


def pruned_user_item_graph(users: np.ndarray, items: np.ndarray, keep: np.ndarray, n_users: int,
                           n_items: int) -> graph_lib.Graph:
  """Symmetric graph [(U+I), (U+I)] of the kept edges `keep` (indices into users/items), each weighted
  1/sqrt((d_u + 1e-7)(d_i + 1e-7)) with the degrees of the kept edges (MMRec's _normalize_adj_m)."""
  u, i = users[keep].astype(np.int64), items[keep].astype(np.int64)
  deg_u = 1e-7 + np.bincount(u, minlength=n_users).astype(np.float64)
  deg_i = 1e-7 + np.bincount(i, minlength=n_items).astype(np.float64)
  vals = (deg_u[u] ** -0.5 * deg_i[i] ** -0.5).astype(np.float32)
  n = n_users + n_items
  return graph_lib.from_coo(np.concatenate([u, i + n_users]), np.concatenate([i + n_users, u]),
                            np.concatenate([vals, vals]), n, n, symmetric=True)


def sample_kept_edges(key: jax.Array, probs: np.ndarray, n_keep: int) -> np.ndarray:
  """[n_keep] distinct edge indices drawn without replacement with probability ∝ probs (Gumbel top-k)."""
  gumbel = np.asarray(jax.random.gumbel(key, probs.shape, jnp.float32), np.float64)
  scores = np.log(probs.astype(np.float64)) + gumbel
  return np.sort(np.argpartition(-scores, n_keep - 1)[:n_keep])


class FreedomNet(baseline.GraphNet):
  """Returns {"user" [U, d], "item" [I, d], "feat": {slot: f_m [I, d]}} for the user-item graph `adj`."""
  n_mm_layers: int
  n_ui_layers: int

  @nn.compact
  def __call__(self, inputs: FreedomInputs, adj: graph_lib.Graph) -> dict:
    d = self.embedding_size
    _, h, user, item = self.lightgcn(adj, self.n_ui_layers)
    for _ in range(self.n_mm_layers):
      h = self.propagate(inputs.mm_adj, h)
    feat = {}
    for slot, _ in baseline.MODALITIES:
      if slot in inputs.features:
        table = baseline.feature_param(self, f"{slot}_embedding", inputs.features[slot])
        feat[slot] = baseline.dense(d, table.shape[1], f"{slot}_trs")(table)  # PyTorch default Linear init
    return {"user": user, "item": item + h, "feat": feat}


@register("freedom")
class Freedom(baseline.PrunedGraphBaseline):
  """The model contract (alignrec_jax.models) for FREEDOM, with the per-epoch pruning hook `epoch_inputs`."""
  inputs_change_per_epoch = True  # the user-item graph is pruned anew every epoch
  defaults = {"knn_k": 10, "n_mm_layers": 1, "n_ui_layers": 2, "mm_image_weight": 0.1, "dropout": 0.8,
              "reg_weight": 1e-3}
  grid = {"model.freedom.dropout": [0.9, 0.85, 0.8], "model.freedom.reg_weight": [0.07, 0.05, 0.03],
          "optim.lr": [0.002, 0.001, 0.0005, 0.0003]}

  def __init__(self, config):
    super().__init__(config)
    if not 0.0 <= self.hp.dropout < 1.0:
      raise ConfigError(f"config.model.freedom.dropout={self.hp.dropout} must lie in [0, 1)")
    if not 0.0 <= self.hp.mm_image_weight <= 1.0:
      raise ConfigError(f"config.model.freedom.mm_image_weight={self.hp.mm_image_weight} must lie in [0, 1]")
    if self.hp.knn_k < 1:
      raise ConfigError(f"config.model.freedom.knn_k={self.hp.knn_k} must be >= 1")

  def content_slots(self, data) -> tuple[str, ...]:
    return tuple(slot for slot, _, _ in baseline.modalities(data))

  def build_inputs(self, data) -> FreedomInputs:
    found = baseline.require_modalities(data, self.name)
    k = int(self.hp.knn_k)
    parts = {slot: binary_knn_graph(f, k, data.graph_members()) for slot, _, f in found}
    if len(parts) == 2:  # the reference mixes the two modalities' graphs
      scale = {"image": self.hp.mm_image_weight, "text": 1.0 - self.hp.mm_image_weight}
    else:
      scale = {slot: 1.0 for slot in parts}
    rows = np.concatenate([parts[s][0] for s in parts])
    cols = np.concatenate([parts[s][1] for s in parts])
    vals = np.concatenate([scale[s] * parts[s][2] for s in parts])
    mm_adj = graph_lib.from_coo(rows, cols, vals, data.n_items, data.n_items)

    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    users, items = data.train[:, 0].astype(np.int64), data.train[:, 1].astype(np.int64)
    deg_u = 1e-7 + np.bincount(users, minlength=data.n_users).astype(np.float64)
    deg_i = 1e-7 + np.bincount(items, minlength=data.n_items).astype(np.float64)
    probs = (deg_u[users] ** -0.5 * deg_i[items] ** -0.5).astype(np.float32)
    return FreedomInputs(adj=adj, train_adj=adj, mm_adj=mm_adj, features={s: jnp.asarray(f) for s, _, f in found},
                         edge_users=jnp.asarray(users, jnp.int32), edge_items=jnp.asarray(items, jnp.int32),
                         edge_probs=jnp.asarray(probs), n_users=data.n_users, n_items=data.n_items)

  def epoch_inputs(self, inputs: FreedomInputs, rng: jax.Array, epoch: int) -> FreedomInputs:
    """Degree-sensitive edge pruning (MMRec's pre_epoch_processing): the epoch's training graph. Host-side."""
    del epoch
    if self.hp.dropout <= 0.0:
      return inputs.replace(train_adj=inputs.adj)
    probs = np.asarray(inputs.edge_probs)
    n_keep = int(len(probs) * (1.0 - self.hp.dropout))
    if n_keep < 1:
      raise ConfigError(f"config.model.freedom.dropout={self.hp.dropout} keeps no edge of {len(probs)}")
    keep = sample_kept_edges(rng, probs, n_keep)
    graph = pruned_user_item_graph(np.asarray(inputs.edge_users), np.asarray(inputs.edge_items), keep,
                                   inputs.n_users, inputs.n_items)
    return inputs.replace(train_adj=graph)

  def net(self, inputs: FreedomInputs) -> FreedomNet:
    return FreedomNet(inputs.n_users, inputs.n_items, self.hp.embedding_size, self.propagation,
                      int(self.hp.n_mm_layers), int(self.hp.n_ui_layers))

  def loss(self, params: dict, inputs: FreedomInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring), on the epoch's pruned graph. batch[*]: [b]."""
    out = self.forward(params, inputs, adj=inputs.train_adj)
    wb = whole_batch(batch, axis_name)
    u, p, n = batch["users"], batch["pos"], batch["neg"]
    h_u = out["user"][u]
    mf = uia.bpr(h_u, out["item"][p], out["item"][n], wb.weight, wb.n_real)
    mm = 0.0
    for slot in sorted(out["feat"]):
      f = out["feat"][slot]
      mm = mm + uia.bpr(h_u, f[p], f[n], wb.weight, wb.n_real)
    total = mf + self.hp.reg_weight * mm
    return total, {"loss": total, "bpr": mf, "mm_bpr": mm}
