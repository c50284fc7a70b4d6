"""BPR-MF: matrix factorisation trained with the BPR pairwise loss (ID only).

Paper: S. Rendle, C. Freudenthaler, Z. Gantner, L. Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from
Implicit Feedback", UAI 2009. Reference implementation: MMRec, src/models/bpr.py and src/configs/model/BPR.yaml
(github.com/enoche/MMRec).

  score(u, i) = <E_u[u], E_i[i]>                                   E_u [U, d], E_i [I, d], Xavier-normal init
  L = -(1/B) sum_b log(1e-10 + sigmoid(s(u_b, p_b) - s(u_b, n_b)))  (MMRec's BPRLoss)
      + reg_weight * (‖E_u[u_B]‖_F + ‖E_i[p_B]‖_F + ‖E_i[n_B]‖_F) / B   (MMRec's EmbLoss: norms, NOT squared)
"""

import flax.linen as nn

from alignrec_jax.models import register
from alignrec_jax.models.baselines import baseline


class MFNet(baseline.TablesNet):
  """Returns {"user": E_u [U, d], "item": E_i [I, d]}."""

  @nn.compact
  def __call__(self, inputs: baseline.Sizes) -> dict:
    del inputs
    # MMRec: xavier_normal_initialization
    user, item = self.id_tables(item="item_embedding", init=baseline.xavier_normal)
    return {"user": user, "item": item}


@register("bprmf")
class BPRMF(baseline.Baseline):
  """The model contract (alignrec_jax.models) for BPR-MF: `Baseline.loss` on the tables."""
  defaults = {"reg_weight": 1e-3}
  grid = {"model.bprmf.reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]}  # BPR.yaml

  def build_inputs(self, data) -> baseline.Sizes:
    return baseline.Sizes(n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: baseline.Sizes) -> MFNet:
    return MFNet(inputs.n_users, inputs.n_items, self.hp.embedding_size)
