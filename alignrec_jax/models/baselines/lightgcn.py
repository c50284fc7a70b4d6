"""LightGCN: linear propagation of ID embeddings on the normalised user-item graph (ID only).

Paper: X. He, K. Deng, X. Wang, Y. Li, Y. Zhang, M. Wang, "LightGCN: Simplifying and Powering Graph Convolution
Network for Recommendation", SIGIR 2020. Reference implementation: MMRec, src/models/lightgcn.py and
src/configs/model/LightGCN.yaml (github.com/enoche/MMRec).

  X0 = [E_u; E_i] (Xavier-uniform),  X(l+1) = Â X(l),  H = mean(X0 .. X(L))      Â = D^-1/2 A D^-1/2, no self-loops
  L = -(1/B) sum_b log(1e-10 + sigmoid(<H_u, H_p> - <H_u, H_n>))                  (MMRec's BPRLoss)
      + reg_weight * (‖E_u[u_B]‖_F + ‖E_i[p_B]‖_F + ‖E_i[n_B]‖_F) / B           (EmbLoss on the EGO embeddings)
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from alignrec_jax import graph as graph_lib
from alignrec_jax.models import register
from alignrec_jax.models import baselines as B


@struct.dataclass
class GraphInputs:
  """adj: Â [(U+I), (U+I)], users first."""
  adj: graph_lib.Graph
  n_users: int = struct.field(pytree_node=False)
  n_items: int = struct.field(pytree_node=False)


class LightGCNNet(nn.Module):
  """Returns {"user" [U, d], "item" [I, d] (layer means), "user_ego" [U, d], "item_ego" [I, d] (the tables)}."""
  n_users: int
  n_items: int
  embedding_size: int
  n_layers: int
  propagation: str = "segment_sum"

  @nn.compact
  def __call__(self, inputs: GraphInputs) -> dict:
    d = self.embedding_size
    user_ego = self.param("user_emb", B.xavier_uniform, (self.n_users, d))
    item_ego = self.param("item_emb", B.xavier_uniform, (self.n_items, d))
    user, item = B.lightgcn_layers(inputs.adj, user_ego, item_ego, self.n_layers, self.propagation)
    return {"user": user, "item": item, "user_ego": user_ego, "item_ego": item_ego}


@register("lightgcn")
class LightGCN(B.Baseline):
  """The model interface (alignrec_jax.models) for LightGCN."""
  name = "lightgcn"

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"n_layers": 2, "reg_weight": 1e-4})

  @staticmethod
  def hyper_grid() -> dict:
    return {"model.lightgcn.n_layers": [1, 2, 3, 4],
            # LightGCN.yaml's 1e-2..1e-6, plus the strong EmbLoss points that BPR-MF's and VBPR's grids carry
            # (lfm2k selects reg_weight 1.0 for both): the ID-only baselines get the same search.
            "model.lightgcn.reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]}

  def build_inputs(self, data) -> GraphInputs:
    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    return GraphInputs(adj=adj, n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: GraphInputs) -> LightGCNNet:
    return LightGCNNet(inputs.n_users, inputs.n_items, self.hp.embedding_size, int(self.hp.n_layers),
                       self.propagation)

  def representations(self, params: dict, inputs: GraphInputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs)
    return out["user"], out["item"]

  def loss(self, params: dict, inputs: GraphInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring). batch[*]: [b]."""
    out = self.forward(params, inputs)
    whole, _ = B.gather_batch(batch, axis_name)
    w = batch["weight"].astype(jnp.float32)
    n_real = B.real_rows(whole)
    u, p, n = out["user"][batch["users"]], out["item"][batch["pos"]], out["item"][batch["neg"]]
    mf = B.mmrec_bpr(jnp.sum(u * p, -1), jnp.sum(u * n, -1), w, n_real)
    w_all = whole["weight"].astype(jnp.float32)
    ego = [out["user_ego"][whole["users"]], out["item_ego"][whole["pos"]], out["item_ego"][whole["neg"]]]
    reg = B.emb_loss(ego, w_all, n_real) * B.share(w, n_real)
    total = mf + self.hp.reg_weight * reg
    return total, {"loss": total, "bpr": mf, "reg": reg}
