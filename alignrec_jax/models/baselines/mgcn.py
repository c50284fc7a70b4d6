"""MGCN: multi-view graph convolution with a behaviour-guided purifier and a behaviour-aware fuser.

Paper: P. Yu, Z. Tan, G. Lu, baseline.-K. Bao, "Multi-View Graph Convolutional Network for Multimedia Recommendation",
ACM MM 2023 (arXiv 2308.03588). Reference implementation: MMRec, src/models/mgcn.py and src/configs/model/MGCN.yaml
(github.com/enoche/MMRec); the grids of the AlignRec authors' MGCN.yaml (github.com/sjtulyf123/AlignRec_CIKM24).

  content = LightGCN(E_u, E_i) over n_ui_layers (layer mean)                               [(U+I), d]
  per modality m (F_m: trainable feature table; S_m: frozen top-k cosine kNN graph, "sym" normalised by row sums):
    P_m = E_i ⊙ sigmoid(gate_m(F_m W_m + b_m))          (behaviour-guided purifier)          [I, d]
    e_m = [R̂ S_m^{n_layers} P_m ; S_m^{n_layers} P_m]   (users aggregate over R̂ = Â[:U, U:]) [(U+I), d]
  fuser: a_m = softmax_m(query_common(e_m)); common = sum_m a_m e_m;
         side = (sum_m sigmoid(prefer_m(content)) ⊙ (e_m - common) + common) / (M + 1)
  h = content + side;  score = <h_u, h_i>
  L = BPR(h_u, h_p, h_n) + reg_weight ½(‖h_u‖² + ‖h_p‖² + ‖h_n‖²)/batch_size
      + cl_loss [NCE(side_i[p], content_i[p]) + NCE(side_u[u], content_u[u])]   (InfoNCE, τ = 0.2, in-batch)
With M = 2 (image and text) this is MMRec's MGCN exactly (÷3); with one modality the fuser is the same formula with
M = 1, where the separate part vanishes and side = e_m / 2. Linear layers keep PyTorch's default init.
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from alignrec_jax import graph as graph_lib
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import cca
from alignrec_jax.losses import uia
from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline
from alignrec_jax.models.batch import whole_batch


@struct.dataclass
class MGCNInputs(baseline.Sizes):
  """adj: Â [(U+I), (U+I)]; user_item: R̂ [U, I]; knn: {slot: S_m [I, I]}; features: {slot: [I, d_f]}."""
  adj: graph_lib.Graph
  user_item: graph_lib.Graph
  knn: dict
  features: dict


class MGCNNet(baseline.GraphNet):
  """Returns {"user" [U, d], "item" [I, d] (fused), "side" and "content" [(U+I), d]}."""
  n_ui_layers: int
  n_layers: int

  @nn.compact
  def __call__(self, inputs: MGCNInputs) -> dict:
    d = self.embedding_size
    _, item_emb, *ui = self.lightgcn(inputs.adj, self.n_ui_layers)
    content = jnp.concatenate(ui, 0)

    views = []
    for slot, short in baseline.MODALITIES:
      if slot not in inputs.features:
        continue
      table = baseline.feature_param(self, f"{slot}_embedding", inputs.features[slot])
      projected = baseline.dense(d, table.shape[1], f"{slot}_trs")(table)
      x = item_emb * nn.sigmoid(baseline.dense(d, d, f"gate_{short}")(projected))  # behaviour-guided purifier
      for _ in range(self.n_layers):
        x = self.propagate(inputs.knn[slot], x)
      views.append((slot, jnp.concatenate([self.propagate(inputs.user_item, x), x], 0)))

    # Behaviour-aware fuser; query_common is shared by the modalities.
    query_hidden = baseline.dense(d, d, "query_common_0")
    query_out = baseline.dense(1, d, "query_common_2", use_bias=False)
    logits = jnp.concatenate([query_out(jnp.tanh(query_hidden(e))) for _, e in views], axis=-1)  # [(U+I), M]
    att = jax.nn.softmax(logits, axis=-1)
    common = sum(att[:, m:m + 1] * e for m, (_, e) in enumerate(views))
    side = common
    for slot, e in views:
      prefer = nn.sigmoid(baseline.dense(d, d, f"gate_{slot}_prefer")(content))
      side = side + prefer * (e - common)
    side = side / (len(views) + 1)
    fused = content + side
    return {"user": fused[:self.n_users], "item": fused[self.n_users:], "side": side, "content": content}


@register("mgcn")
class MGCN(baseline.Baseline):
  """The model contract (alignrec_jax.models) for MGCN."""
  defaults = {"n_ui_layers": 2, "n_layers": 1, "knn_k": 10, "reg_weight": 1e-4, "cl_loss": 0.01, "temperature": 0.2}
  grid = {"optim.lr": [0.005, 0.001, 0.0005, 0.0001], "model.mgcn.cl_loss": [1e-4, 1e-3, 1e-2, 0.1, 1.0]}

  def __init__(self, config):
    super().__init__(config)
    if self.hp.knn_k < 1:
      raise ConfigError(f"config.model.mgcn.knn_k={self.hp.knn_k} must be >= 1")

  def content_slots(self, data) -> tuple[str, ...]:
    return tuple(slot for slot, _, _ in baseline.modalities(data))

  def build_inputs(self, data) -> MGCNInputs:
    found = baseline.require_modalities(data, self.name)
    adj, user_item = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    knn = {slot: graph_lib.knn_graph(f, int(self.hp.knn_k), members=data.graph_members()) for slot, _, f in found}
    return MGCNInputs(adj=adj, user_item=user_item, knn=knn, features={s: jnp.asarray(f) for s, _, f in found},
                      n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: MGCNInputs) -> MGCNNet:
    return MGCNNet(inputs.n_users, inputs.n_items, self.hp.embedding_size, self.propagation, int(self.hp.n_ui_layers),
                   int(self.hp.n_layers))

  def loss(self, params: dict, inputs: MGCNInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring). batch[*]: [b]."""
    hp = self.hp
    out = self.forward(params, inputs)
    wb = whole_batch(batch, axis_name)
    whole, w = wb.whole, wb.weight
    u, p, n = batch["users"], batch["pos"], batch["neg"]
    h_u, h_p, h_n = out["user"][u], out["item"][p], out["item"][n]
    mf = uia.bpr(h_u, h_p, h_n, w, wb.n_real)
    reg = uia.l2(h_u, h_p, h_n, w, self.batch_size)
    U = inputs.n_users
    side_u, side_i = out["side"][:U], out["side"][U:]
    content_u, content_i = out["content"][:U], out["content"][U:]
    cl = (cca.info_nce(side_i[p], content_i[whole["pos"]], wb.own, w, wb.weight_all, wb.n_real, hp.temperature)
          + cca.info_nce(side_u[u], content_u[whole["users"]], wb.own, w, wb.weight_all, wb.n_real, hp.temperature))
    total = mf + hp.reg_weight * reg + hp.cl_loss * cl
    return total, {"loss": total, "bpr": mf, "reg": reg, "cca": cl}
