"""LayerGCN: layer-refined graph convolution of ID embeddings with degree-sensitive edge dropout (ID only).

Paper: X. Zhou, D. Lin, Y. Liu, C. Miao, "Layer-refined Graph Convolutional Networks for Recommendation", ICDE 2023
(arXiv 2207.11088). Reference implementation: MMRec, src/models/layergcn.py and src/configs/model/LayerGCN.yaml
(github.com/enoche/MMRec).

  X0 = [E_u; E_i] (Xavier-uniform);  X(l+1) = c(l+1) ⊙ (Â X(l)),  c(l+1)_n = cos((Â X(l))_n, X0_n)   (per node)
  H = X(1) + ... + X(L)     (the sum of the refined layers, without X0);  score = <H_u, H_i> on the full Â
  L = sum_b -log sigmoid(<H_u, H_p> - <H_u, H_n>) + reg_weight ½ (‖E_u[u_B]‖² + ‖E_i[p_B]‖² + ‖E_i[n_B]‖²)
Both terms are SUMS over the batch rows (MMRec's bpr_loss and L2Loss), not means.
Training graph, per epoch (`epoch_inputs`), for dropout > 0: keep int(|E| (1 - dropout)) train edges drawn without
replacement, on even epochs with probability ∝ 1/sqrt(d_u d_i) (degree-sensitive), on odd epochs uniformly (MMRec
flips its `pruning_random` flag after every epoch, starting with the degree-sensitive draw), renormalised by the kept
graph's own degrees; dropout 0 trains on the full Â.
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
from alignrec_jax.models.baselines import freedom
from alignrec_jax.models.batch import whole_batch


@struct.dataclass
class LayerGCNInputs(baseline.Sizes):
  """adj: full Â [(U+I), (U+I)] (evaluation); train_adj: the epoch's pruned graph (the full one until the hook
  runs); edge_users/edge_items [E] int32 and edge_probs [E] float32 (∝ 1/sqrt(d_u d_i)): the train edges."""
  adj: graph_lib.Graph
  train_adj: graph_lib.Graph
  edge_users: jax.Array
  edge_items: jax.Array
  edge_probs: jax.Array


class LayerGCNNet(baseline.GraphNet):
  """Returns {"user" [U, d], "item" [I, d] (sums of the refined layers), "user_ego" [U, d], "item_ego" [I, d]}."""
  n_layers: int

  @nn.compact
  def __call__(self, inputs: LayerGCNInputs, adj: graph_lib.Graph) -> dict:
    user_ego, item_ego = self.id_tables("user_embeddings", "item_embeddings")
    ego = jnp.concatenate([user_ego, item_ego], 0)
    x, total = ego, 0.0
    for _ in range(self.n_layers):
      x = self.propagate(adj, x)
      x = uia.cosine(x, ego)[:, None] * x  # each node's layer weighted by its similarity to its own ego embedding
      total = total + x
    return {"user": total[:self.n_users], "item": total[self.n_users:], "user_ego": user_ego, "item_ego": item_ego}


@register("layergcn")
class LayerGCN(baseline.PrunedGraphBaseline):
  """The model contract (alignrec_jax.models) for LayerGCN, with the per-epoch edge dropout hook `epoch_inputs`."""
  defaults = {"n_layers": 4, "dropout": 0.0, "reg_weight": 1e-2}
  # LayerGCN.yaml's grid in its hyper_parameters order; its lr is overall.yaml's 0.001
  grid = {"model.layergcn.n_layers": [4], "model.layergcn.dropout": [0.0, 0.1, 0.2],
          "model.layergcn.reg_weight": [1e-2, 1e-3, 1e-4, 1e-5]}

  def __init__(self, config):
    super().__init__(config)
    if not 0.0 <= self.hp.dropout < 1.0:
      raise ConfigError(f"config.model.layergcn.dropout={self.hp.dropout} must lie in [0, 1)")
    if self.hp.n_layers < 1:
      raise ConfigError(f"config.model.layergcn.n_layers={self.hp.n_layers} must be >= 1")
    self.inputs_change_per_epoch = self.hp.dropout > 0.0  # the graph is pruned anew every epoch

  def build_inputs(self, data) -> LayerGCNInputs:
    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    users, items = data.train[:, 0].astype(np.int64), data.train[:, 1].astype(np.int64)
    deg_u = 1e-7 + np.bincount(users, minlength=data.n_users).astype(np.float64)
    deg_i = 1e-7 + np.bincount(items, minlength=data.n_items).astype(np.float64)
    probs = (deg_u[users] ** -0.5 * deg_i[items] ** -0.5).astype(np.float32)
    return LayerGCNInputs(adj=adj, train_adj=adj, edge_users=jnp.asarray(users, jnp.int32),
                          edge_items=jnp.asarray(items, jnp.int32), edge_probs=jnp.asarray(probs),
                          n_users=data.n_users, n_items=data.n_items)

  def epoch_inputs(self, inputs: LayerGCNInputs, rng: jax.Array, epoch: int) -> LayerGCNInputs:
    """The epoch's training graph (MMRec's pre_epoch_processing): degree-sensitive draws on even epochs, uniform
    ones on odd epochs. Host-side; a pure function of (rng, epoch), so a resumed run draws the same graphs."""
    if self.hp.dropout <= 0.0:
      return inputs
    probs = np.asarray(inputs.edge_probs)
    n_keep = int(len(probs) * (1.0 - self.hp.dropout))
    if n_keep < 1:
      raise ConfigError(f"config.model.layergcn.dropout={self.hp.dropout} keeps no edge of {len(probs)}")
    weights = probs if epoch % 2 == 0 else np.ones_like(probs)
    keep = freedom.sample_kept_edges(rng, weights, n_keep)
    graph = freedom.pruned_user_item_graph(np.asarray(inputs.edge_users), np.asarray(inputs.edge_items), keep,
                                           inputs.n_users, inputs.n_items)
    return inputs.replace(train_adj=graph)

  def net(self, inputs: LayerGCNInputs) -> LayerGCNNet:
    return LayerGCNNet(inputs.n_users, inputs.n_items, self.hp.embedding_size, self.propagation,
                       int(self.hp.n_layers))

  def loss(self, params: dict, inputs: LayerGCNInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring): both terms are sums over this shard's rows."""
    out = self.forward(params, inputs, adj=inputs.train_adj)
    w = whole_batch(batch, axis_name).weight
    u, p, n = batch["users"], batch["pos"], batch["neg"]
    h_u = out["user"][u]
    mf = uia.bpr(h_u, out["item"][p], out["item"][n], w, 1.0)  # n_real 1: a sum, not a mean
    e_u, e_p, e_n = out["user_ego"][u], out["item_ego"][p], out["item_ego"][n]
    reg = 0.5 * jnp.sum(w * (jnp.sum(e_u * e_u, -1) + jnp.sum(e_p * e_p, -1) + jnp.sum(e_n * e_n, -1)))
    total = mf + self.hp.reg_weight * reg
    return total, {"loss": total, "bpr": mf, "reg": reg}
