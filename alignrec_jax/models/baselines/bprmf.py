"""BPR-MF: matrix factorisation trained with the BPR pairwise loss (ID only).

Paper: S. Rendle, C. Freudenthaler, Z. Gantner, L. Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from
Implicit Feedback", UAI 2009. Reference implementation: MMRec, src/models/bpr.py and src/configs/model/BPR.yaml
(github.com/enoche/MMRec).

  score(u, i) = <E_u[u], E_i[i]>                                   E_u [U, d], E_i [I, d], Xavier-normal init
  L = -(1/B) sum_b log(1e-10 + sigmoid(s(u_b, p_b) - s(u_b, n_b)))  (MMRec's BPRLoss)
      + reg_weight * (‖E_u[u_B]‖_F + ‖E_i[p_B]‖_F + ‖E_i[n_B]‖_F) / B   (MMRec's EmbLoss: norms, NOT squared)
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import ml_collections

from alignrec_jax.models import register
from alignrec_jax.models import baselines as B


@struct.dataclass
class MFInputs:
  """No graph or feature: only the table sizes (static)."""
  n_users: int = struct.field(pytree_node=False)
  n_items: int = struct.field(pytree_node=False)


class MFNet(nn.Module):
  """Returns (E_u [U, d], E_i [I, d])."""
  n_users: int
  n_items: int
  embedding_size: int

  @nn.compact
  def __call__(self, inputs: MFInputs) -> tuple[jax.Array, jax.Array]:
    d = self.embedding_size
    # MMRec: nn.Embedding + self.apply(xavier_normal_initialization).
    return (self.param("user_embedding", B.xavier_normal, (self.n_users, d)),
            self.param("item_embedding", B.xavier_normal, (self.n_items, d)))


@register("bprmf")
class BPRMF(B.Baseline):
  """The model interface (alignrec_jax.models) for BPR-MF."""
  name = "bprmf"

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"reg_weight": 1e-3})

  @staticmethod
  def hyper_grid() -> dict:
    return {"model.bprmf.reg_weight": [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]}  # BPR.yaml

  def build_inputs(self, data) -> MFInputs:
    return MFInputs(n_users=data.n_users, n_items=data.n_items)

  def net(self, inputs: MFInputs) -> MFNet:
    return MFNet(inputs.n_users, inputs.n_items, self.hp.embedding_size)

  def representations(self, params: dict, inputs: MFInputs) -> tuple[jax.Array, jax.Array]:
    return self.forward(params, inputs)

  def loss(self, params: dict, inputs: MFInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring). batch[*]: [b]."""
    return self.bpr_reg_loss(params, inputs, batch, axis_name)
