"""LightGCN: linear propagation of ID embeddings on the normalised user-item graph (ID only).

Paper: X. He, K. Deng, X. Wang, Y. Li, Y. Zhang, M. Wang, "LightGCN: Simplifying and Powering Graph Convolution
Network for Recommendation", SIGIR 2020. Reference implementation: MMRec, src/models/lightgcn.py and
src/configs/model/LightGCN.yaml (github.com/enoche/MMRec).

  X0 = [E_u; E_i] (Xavier-uniform),  X(l+1) = Â X(l),  H = mean(X0 .. X(L))      Â = D^-1/2 A D^-1/2, no self-loops
  L = -(1/B) sum_b log(1e-10 + sigmoid(<H_u, H_p> - <H_u, H_n>))                  (MMRec's BPRLoss)
      + reg_weight * (‖E_u[u_B]‖_F + ‖E_i[p_B]‖_F + ‖E_i[n_B]‖_F) / B           (EmbLoss on the EGO embeddings)
"""

from flax import struct
import flax.linen as nn

from alignrec_jax import graph as graph_lib
from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline


@struct.dataclass
class GraphInputs(baseline.Sizes):
  """adj: Â [(U+I), (U+I)], users first."""
  adj: graph_lib.Graph


class LightGCNNet(baseline.GraphNet):
  """Returns {"user" [U, d], "item" [I, d] (layer means), "user_ego" [U, d], "item_ego" [I, d] (the tables)}."""
  n_layers: int

  @nn.compact
  def __call__(self, inputs: GraphInputs) -> dict:
    user_ego, item_ego, user, item = self.lightgcn(inputs.adj, self.n_layers, "user_emb", "item_emb")
    return {"user": user, "item": item, "user_ego": user_ego, "item_ego": item_ego}


@register("lightgcn")
class LightGCN(baseline.Baseline):
  """The model contract (alignrec_jax.models) for LightGCN: `Baseline.loss`, its EmbLoss on the ego tables."""
  ego_suffix = "_ego"
  defaults = {"n_layers": 2, "reg_weight": 1e-4}
  grid = {"model.lightgcn.n_layers": [1, 2, 3, 4],
          # LightGCN.yaml's 1e-2..1e-6, plus the strong EmbLoss points that BPR-MF's and VBPR's grids carry:
          # the ID-only baselines get the same search.
          "model.lightgcn.reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]}

  def build_inputs(self, data) -> GraphInputs:
    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    return GraphInputs(adj=adj, n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: GraphInputs) -> LightGCNNet:
    return LightGCNNet(inputs.n_users, inputs.n_items, self.hp.embedding_size, self.propagation, int(self.hp.n_layers))
