"""BM3: bootstrapped latent representations for multimodal recommendation (no negative sampling).

Paper: X. Zhou, H. Zhou, Y. Liu, Z. Zeng, C. Miao, P. Wang, Y. You, F. Jiang, "Bootstrap Latent Representations
for Multi-modal Recommendation", WWW 2023 (arXiv 2207.05969). Reference implementation: MMRec, src/models/bm3.py
and src/configs/model/BM3.yaml (github.com/enoche/MMRec); the learning-rate grid of the AlignRec authors' BM3.yaml
(github.com/sjtulyf123/AlignRec_CIKM24). By default every present modality is used, as MMRec does. The AlignRec
authors' shipped copy sets its image features to None, so it trains on the text slot alone whatever the image slot
holds; `text_only=True` reproduces that copy (the baseline numbers measured with it, docs/experiments.md).

  online:  (h_u, h_i) = LightGCN(E_u, E_i) over n_layers, then h_i += E_i      [U, d], [I, d]
           f_m = F_m W_m + b_m for each modality m (F_m: the trainable feature table)  [I, d]
  target:  the same tensors, stop-gradient, through dropout(p) (torch training-mode scaling 1/(1-p))
  predictor g: Linear(d, d)
  L = (1 - mean_b cos(g(h_u)[u_b], t_i[i_b])) + (1 - mean_b cos(g(h_i)[i_b], t_u[u_b]))
      + reg_weight * (‖h_u‖_F + ‖h_i‖_F) / n_items                          (EmbLoss on the whole online tables)
      + cl_weight * sum_m [(1 - mean_b cos(g(f_m)[i_b], t_i[i_b])) + (1 - mean_b cos(g(f_m)[i_b], t_m[i_b]))]
  scores: g(h_u) · g(h_i).
The batch's negatives are ignored (MMRec's use_neg_sampling: False). Dropout keys: see `epoch_inputs` and
`baseline.step_key` (per step, the same on every device).
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from alignrec_jax import graph as graph_lib
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import uia
from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline
from alignrec_jax.models.batch import whole_batch


@struct.dataclass
class BM3Inputs(baseline.Sizes):
  """adj: Â [(U+I), (U+I)]; features: {slot: [I, d_f]} initial feature tables; rng: [2] uint32 dropout key."""
  adj: graph_lib.Graph
  features: dict
  rng: jax.Array


class BM3Net(baseline.GraphNet):
  """Returns {"user", "item": online [U|I, d]; "user_pred", "item_pred": g(online); "feat": {slot: f_m [I, d]};
  "feat_pred": {slot: g(f_m) [I, d]}}."""
  n_layers: int

  @nn.compact
  def __call__(self, inputs: BM3Inputs) -> dict:
    d = self.embedding_size
    _, item_emb, user, item = self.lightgcn(inputs.adj, self.n_layers)
    item = item + item_emb
    predictor = baseline.dense(d, d, "predictor", kernel="xavier_normal")  # bias: PyTorch default
    feat, feat_pred = {}, {}
    for slot, short in baseline.MODALITIES:
      if slot not in inputs.features:
        continue
      table = baseline.feature_param(self, f"{slot}_embedding", inputs.features[slot])
      f = baseline.dense(d, table.shape[1], f"{slot}_trs", kernel="xavier_normal")(table)
      feat[slot], feat_pred[slot] = f, predictor(f)
    return {"user": user, "item": item, "user_pred": predictor(user), "item_pred": predictor(item), "feat": feat,
            "feat_pred": feat_pred}


@register("bm3")
class BM3(baseline.Baseline):
  """The model contract (alignrec_jax.models) for BM3."""
  # text_only: ignore the image slot, as the AlignRec authors' copy does (module docstring).
  inputs_change_per_epoch = True  # a fresh dropout key every epoch
  defaults = {"n_layers": 1, "dropout": 0.5, "reg_weight": 0.1, "cl_weight": 2.0, "text_only": False}
  grid = {"optim.lr": [0.005, 0.001, 0.0005, 0.0001], "model.bm3.reg_weight": [0.1, 0.01],
          "model.bm3.n_layers": [1, 2], "model.bm3.dropout": [0.3, 0.5]}

  def __init__(self, config):
    super().__init__(config)
    if not 0.0 <= self.hp.dropout < 1.0:
      raise ConfigError(f"config.model.bm3.dropout={self.hp.dropout} must lie in [0, 1)")

  def content_slots(self, data) -> tuple[str, ...]:
    return ("text",) if self.hp.text_only else tuple(slot for slot, _, _ in baseline.modalities(data))

  def build_inputs(self, data) -> BM3Inputs:
    found = baseline.require_modalities(data, self.name)
    if self.hp.text_only:
      found = [m for m in found if m[0] == "text"]
      if not found:
        raise ConfigError(f"config.model.bm3.text_only=True needs text features: set config.data.text_feat "
                          f"(dataset {data.name!r} has only {sorted(data.features)})")
    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    return BM3Inputs(adj=adj, features={slot: jnp.asarray(f) for slot, _, f in found},
                     rng=jax.random.PRNGKey(self.seed), n_users=data.n_users, n_items=data.n_items)

  def epoch_inputs(self, inputs: BM3Inputs, rng: jax.Array, epoch: int) -> BM3Inputs:
    """The epoch's dropout key (the trainer's per-epoch hook)."""
    del epoch
    return inputs.replace(rng=jnp.asarray(rng, jnp.uint32).reshape(2))

  def net(self, inputs: BM3Inputs) -> BM3Net:
    return BM3Net(inputs.n_users, inputs.n_items, self.hp.embedding_size, self.propagation, int(self.hp.n_layers))

  def representations(self, params: dict, inputs: BM3Inputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs)
    return out["user_pred"], out["item_pred"]

  def loss(self, params: dict, inputs: BM3Inputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring). Uses batch users, pos, weight ([b]); not neg."""
    hp = self.hp
    out = self.forward(params, inputs)
    wb = whole_batch(batch, axis_name)
    users, items = batch["users"], batch["pos"]

    keys = jax.random.split(baseline.step_key(inputs.rng, wb.whole), 2 + len(out["feat"]))
    u_target = baseline.dropout(keys[0], jax.lax.stop_gradient(out["user"]), hp.dropout)
    i_target = baseline.dropout(keys[1], jax.lax.stop_gradient(out["item"]), hp.dropout)

    def one_minus_cos(a, b):  # (1/B) sum_b (1 - cos(a_b, b_b)), this shard's rows
      return uia.user_item_cosine(a, b, wb.weight, wb.n_real)

    loss_ui = one_minus_cos(out["user_pred"][users], i_target[items])
    loss_iu = one_minus_cos(out["item_pred"][items], u_target[users])
    cl = 0.0
    for key, slot in zip(keys[2:], sorted(out["feat"])):
      f_target = baseline.dropout(key, jax.lax.stop_gradient(out["feat"][slot]), hp.dropout)
      f_online = out["feat_pred"][slot][items]
      cl = cl + one_minus_cos(f_online, i_target[items]) + one_minus_cos(f_online, f_target[items])
    reg = baseline.emb_loss([out["user"], out["item"]], None, inputs.n_items) * wb.share
    total = loss_ui + loss_iu + hp.reg_weight * reg + hp.cl_weight * cl
    return total, {"loss": total, "align": loss_ui + loss_iu, "cl": cl, "reg": reg}
