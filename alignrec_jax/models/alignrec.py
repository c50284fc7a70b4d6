"""AlignRec's stage-2 recommender (docs/method.md §5): Aggregator + Fuser, trained with the CCA and UIA losses.

  L = BPR + w_ui (1 - mean cos(h_u, h_p)) + λ ½(‖h_u‖² + ‖h_p‖² + ‖h_n‖²) / batch_size
      + α [NCE(h_mm_i[p], h_id_i[p]) + NCE(h_mm_u[u], h_id_u[u])] + β ‖h_mm_i[p] h_mm_i[p]ᵀ − sg(cos F[p])‖_F / B

with α = loss.cl_weight, β = loss.sim_weight, λ = loss.reg_weight, w_ui = loss.ui_cosine_weight, τ =
loss.temperature. The cosine target uses the current (fine-tuned) feature table (`model.sim_target='current'`, as the
reference, whose v_feat aliases the trainable table) or the initial one ('frozen').
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignrec_jax import graph as graph_lib
from alignrec_jax.data.mmrec import RecData
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import cca
from alignrec_jax.losses import uia
from alignrec_jax.models import Recommender
from alignrec_jax.models import register
from alignrec_jax.models.aggregator import Aggregator
from alignrec_jax.models.batch import whole_batch
from alignrec_jax.models.fuser import Fuser


@struct.dataclass
class AlignRecInputs:
  """Built once from RecData + config. adj: Â [(U+I), (U+I)]; user_item: R̂ [U, I]; item_item: S̃ [I, I];
  features: [I, d_f] the loaded (initial) feature table."""
  adj: graph_lib.Graph
  user_item: graph_lib.Graph
  item_item: graph_lib.Graph
  features: jax.Array


class AlignRecNet(nn.Module):
  """The Aggregator (a field, so its parameters sit under "aggregator") then the Fuser. Returns the Aggregator's
  views plus "user" [U, d] and "item" [I, d] (fused)."""
  aggregator: Aggregator
  side_emb_div: float = 0.0

  @nn.compact
  def __call__(self, inputs: AlignRecInputs) -> dict:
    views = self.aggregator(inputs)
    fuse = Fuser(self.side_emb_div, name="fuser")
    return dict(views, user=fuse(views["id_user"], views["mm_user"]), item=fuse(views["id_item"], views["mm_item"]))


@register("alignrec")
class AlignRec(Recommender):
  """The model contract (alignrec_jax.models) for AlignRec; its hyper-parameters are config.model.* and loss.*."""
  grid = {"optim.lr": [0.005, 0.003, 0.001, 0.0007, 0.0005, 0.0003, 0.0001],  # docs/method.md §7: 175 runs
          "loss.cl_weight": [0.0001, 0.001, 0.005, 0.01, 0.1],
          "loss.sim_weight": [0.1, 0.2, 0.3, 0.4, 0.5]}

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    if m.sim_target not in ("current", "frozen"):
      raise ConfigError(f"config.model.sim_target={m.sim_target!r}: expected 'current' or 'frozen'")
    if m.knn_k < 1:
      raise ConfigError(f"config.model.knn_k={m.knn_k} must be >= 1")
    super().__init__(config)

  def build_inputs(self, data: RecData) -> AlignRecInputs:
    """Graphs and the feature table of `data` (features["image"], AlignRec's single fused feature slot)."""
    if "image" not in data.features:
      raise ConfigError("AlignRec needs an item feature table: set config.data.image_feat (or data.features_from); "
                        f"dataset {data.name!r} has features {sorted(data.features)}")
    features = np.asarray(data.features["image"], np.float32)
    adj, user_item = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    item_item = graph_lib.knn_graph(features, int(self.config.model.knn_k), members=data.graph_members())
    if self.config.model.propagation == "gather":
      adj, user_item, item_item = (graph_lib.with_ell(g) for g in (adj, user_item, item_item))
    return AlignRecInputs(adj, user_item, item_item, jnp.asarray(features))

  def content_slots(self, data: RecData) -> tuple[str, ...]:
    return ("image",)  # the one slot its kNN graph and content view read

  def net(self, inputs: AlignRecInputs) -> AlignRecNet:
    m = self.config.model
    aggregator = Aggregator(inputs.user_item.n_dst, inputs.user_item.n_src, m.embedding_size, m.n_ui_layers,
                            m.n_ii_layers, m.use_ln, m.freeze_features, m.propagation)
    return AlignRecNet(aggregator, float(m.side_emb_div))

  def init(self, rng: jax.Array, inputs: AlignRecInputs) -> dict:
    # Jitted: run eagerly, the init's forward pass leaves hundreds of MB of freed-but-kept host memory behind at
    # paper scale.
    return jax.jit(super().init)(rng, inputs)

  def inputs_after_init(self, inputs: AlignRecInputs) -> AlignRecInputs:
    """The inputs the jitted calls need once the parameters exist: the initial feature table only seeds the
    trainable one, unless the features are frozen or the cosine target is the frozen table (at paper scale it is
    115 MB, kept once per device otherwise)."""
    m = self.config.model
    if m.freeze_features or m.sim_target == "frozen":
      return inputs
    return inputs.replace(features=jnp.zeros((0, inputs.features.shape[1]), inputs.features.dtype))

  def loss(self, params: dict, inputs: AlignRecInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring) and its parts. Shapes: batch[*] [b]."""
    lc = self.config.loss
    out = self.forward(params, inputs)
    wb = whole_batch(batch, axis_name)
    whole, own, w, w_all, n_real = wb.whole, wb.own, wb.weight, wb.weight_all, wb.n_real
    u, p, n = batch["users"], batch["pos"], batch["neg"]

    h_u, h_p, h_n = out["user"][u], out["item"][p], out["item"][n]
    bpr = uia.bpr(h_u, h_p, h_n, w, n_real)
    ui_cos = uia.user_item_cosine(h_u, h_p, w, n_real)
    reg = uia.l2(h_u, h_p, h_n, w, self.batch_size)

    nce_item = cca.info_nce(out["mm_item"][p], out["id_item"][whole["pos"]], own, w, w_all, n_real, lc.temperature)
    nce_user = cca.info_nce(out["mm_user"][u], out["id_user"][whole["users"]], own, w, w_all, n_real,
                            lc.temperature)
    feats = inputs.features if self.config.model.sim_target == "frozen" else out["features"]
    sim = cca.similarity_preserving(out["mm_item"][p], out["mm_item"][whole["pos"]], feats[p], feats[whole["pos"]],
                                    w, w_all, n_real, axis_name)
    cca_loss = nce_item + nce_user
    total = (bpr + lc.ui_cosine_weight * ui_cos + lc.reg_weight * reg + lc.cl_weight * cca_loss
             + lc.sim_weight * sim)
    return total, {"loss": total, "bpr": bpr, "ui_cosine": ui_cos, "reg": reg, "cca": cca_loss, "sim": sim}
