"""VBPR: BPR matrix factorisation whose item factor is extended by a linear projection of the item's content.

Paper: R. He, J. McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback", AAAI 2016.
Reference implementation: MMRec, src/models/vbpr.py and src/configs/model/VBPR.yaml (github.com/enoche/MMRec);
the learning-rate grid of the AlignRec authors' VBPR.yaml (github.com/sjtulyf123/AlignRec_CIKM24).

  F = concat(text, image) features (MMRec's order; whichever slots are present), a constant [I, d_f]
  h_u = P_u [U, 2d] (Xavier-uniform),  h_i = concat(Q_i [I, d] (Xavier-uniform), F W + b [I, d])
  W: Xavier-normal, b = 0 (MMRec's xavier_normal_initialization of the Linear)
  L = -(1/B) sum_b log(1e-10 + sigmoid(<h_u, h_p> - <h_u, h_n>)) + reg_weight * (‖h_u‖_F + ‖h_p‖_F + ‖h_n‖_F) / B
As in MMRec, the visual bias terms of the paper are absent and the EmbLoss is on the full (ID + content) vectors.
"""

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline


@struct.dataclass
class VBPRInputs(baseline.Sizes):
  """features: [I, d_f] the raw content (text then image, concatenated), not trained."""
  features: jax.Array


class VBPRNet(baseline.TablesNet):
  """Returns {"user": h_u [U, 2d], "item": h_i [I, 2d]}."""

  @nn.compact
  def __call__(self, inputs: VBPRInputs) -> dict:
    d = self.embedding_size
    user = self.param("u_embedding", baseline.xavier_uniform, (self.n_users, 2 * d))
    item_id = self.param("i_embedding", baseline.xavier_uniform, (self.n_items, d))
    content = baseline.dense(d, inputs.features.shape[1], "item_linear", kernel="xavier_normal", bias="zeros")(
        inputs.features)
    return {"user": user, "item": jnp.concatenate([item_id, content], axis=-1)}


@register("vbpr")
class VBPR(baseline.Baseline):
  """The model contract (alignrec_jax.models) for VBPR: `Baseline.loss` on the full (ID + content) vectors."""
  defaults = {"reg_weight": 1e-3}
  grid = {"optim.lr": [0.005, 0.001, 0.0005, 0.0001], "model.vbpr.reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]}

  def content_slots(self, data) -> tuple[str, ...]:
    return tuple(slot for slot, _, _ in baseline.modalities(data))

  def build_inputs(self, data) -> VBPRInputs:
    found = baseline.require_modalities(data, self.name)
    ordered = sorted(found, key=lambda m: 0 if m[0] == "text" else 1)  # MMRec: torch.cat((t_feat, v_feat))
    feats = np.concatenate([f for _, _, f in ordered], axis=1)
    return VBPRInputs(features=jnp.asarray(feats), n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: VBPRInputs) -> VBPRNet:
    return VBPRNet(inputs.n_users, inputs.n_items, self.hp.embedding_size)
