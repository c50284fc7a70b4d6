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
from alignrec_jax.losses import cca
from alignrec_jax.losses import uia
from alignrec_jax.models import register
from alignrec_jax.models.aggregator import Aggregator
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
  """Aggregator then Fuser. Returns the Aggregator's views plus "user" [U, d] and "item" [I, d] (fused)."""
  n_users: int
  n_items: int
  embedding_size: int = 64
  n_ui_layers: int = 2
  n_ii_layers: int = 1
  use_ln: bool = False
  freeze_features: bool = False
  side_emb_div: float = 0.0
  propagation: str = "segment_sum"

  @nn.compact
  def __call__(self, inputs: AlignRecInputs) -> dict:
    views = Aggregator(self.n_users, self.n_items, self.embedding_size, self.n_ui_layers, self.n_ii_layers,
                       self.use_ln, self.freeze_features, self.propagation, name="aggregator")(inputs)
    fuse = Fuser(self.side_emb_div, name="fuser")
    return dict(views, user=fuse(views["id_user"], views["mm_user"]), item=fuse(views["id_item"], views["mm_item"]))


def _gather_batch(batch: dict, axis_name: Optional[str]):
  """(whole batch dict, index of this shard's rows in it [b]). Without axis_name the shard is the whole batch."""
  b = batch["users"].shape[0]
  if axis_name is None:
    return batch, jnp.arange(b, dtype=jnp.int32)
  whole = {k: jax.lax.all_gather(v, axis_name, tiled=True) for k, v in batch.items()}
  return whole, jax.lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)


@register("alignrec")
class AlignRec:
  """The model interface of alignrec_jax.models for AlignRec."""

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    if m.sim_target not in ("current", "frozen"):
      raise ValueError(f"config.model.sim_target={m.sim_target!r}: expected 'current' or 'frozen'")
    if m.propagation not in graph_lib.PROPAGATION_METHODS:
      raise ValueError(f"config.model.propagation={m.propagation!r}: expected one of "
                       f"{graph_lib.PROPAGATION_METHODS}")
    for key in ("embedding_size", "knn_k"):
      if m[key] < 1:
        raise ValueError(f"config.model.{key}={m[key]} must be >= 1")
    self.config = config
    self.batch_size = int(config.train.batch_size)
    self.net = None  # built by build_inputs, which knows the dataset's sizes

  def _make_net(self, n_users: int, n_items: int) -> AlignRecNet:
    m = self.config.model
    return AlignRecNet(n_users, n_items, m.embedding_size, m.n_ui_layers, m.n_ii_layers, m.use_ln,
                       m.freeze_features, float(m.side_emb_div), m.propagation)

  def build_inputs(self, data: RecData) -> AlignRecInputs:
    """Graphs and the feature table of `data` (features["image"], AlignRec's single fused feature slot)."""
    if "image" not in data.features:
      raise ValueError("AlignRec needs an item feature table: set config.data.image_feat (or data.features_from); "
                       f"dataset {data.name!r} has features {sorted(data.features)}")
    features = np.asarray(data.features["image"], np.float32)
    adj, user_item = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    item_item = graph_lib.knn_graph(features, int(self.config.model.knn_k))
    if self.config.model.propagation == "gather":
      adj, user_item, item_item = (graph_lib.with_ell(g) for g in (adj, user_item, item_item))
    self.net = self._make_net(data.n_users, data.n_items)
    return AlignRecInputs(adj, user_item, item_item, jnp.asarray(features))

  def _net(self, inputs: AlignRecInputs) -> AlignRecNet:
    if self.net is None:
      self.net = self._make_net(inputs.user_item.n_dst, inputs.user_item.n_src)
    return self.net

  def init(self, rng: jax.Array, inputs: AlignRecInputs) -> dict:
    # Jitted: run eagerly, the init's forward pass leaves hundreds of MB of freed-but-kept host memory behind at
    # paper scale (measured: +465 MB RSS vs +231 MB for the parameters themselves).
    return jax.jit(lambda r, i: self._net(i).init(r, i)["params"])(rng, inputs)

  def inputs_after_init(self, inputs: AlignRecInputs) -> AlignRecInputs:
    """The inputs the jitted calls need once the parameters exist: the initial feature table only seeds the
    trainable one, unless the features are frozen or the cosine target is the frozen table (at paper scale it is
    115 MB, kept once per device otherwise)."""
    m = self.config.model
    if m.freeze_features or m.sim_target == "frozen":
      return inputs
    return inputs.replace(features=jnp.zeros((0, inputs.features.shape[1]), inputs.features.dtype))

  def forward(self, params: dict, inputs: AlignRecInputs) -> dict:
    return self._net(inputs).apply({"params": params}, inputs)

  def representations(self, params: dict, inputs: AlignRecInputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs)
    return out["user"], out["item"]

  def loss(self, params: dict, inputs: AlignRecInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring) and its parts. Shapes: batch[*] [b]."""
    lc = self.config.loss
    out = self.forward(params, inputs)
    whole, own = _gather_batch(batch, axis_name)
    u, p, n, w = batch["users"], batch["pos"], batch["neg"], batch["weight"].astype(jnp.float32)
    w_all = whole["weight"].astype(jnp.float32)
    n_real = jnp.maximum(jnp.sum(w_all), 1.0)

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
    metrics = {"loss": total, "bpr": bpr, "ui_cosine": ui_cos, "reg": reg, "cca": cca_loss, "sim": sim}
    return total, metrics
