"""LGMRec: local (collaborative + modality) graph embeddings and a global hypergraph embedding.

Paper: Z. Guo, J. Li, G. Li, C. Wang, S. Shi, B. Ruan, "LGMRec: Local and Global Graph Learning for Multimodal
Recommendation", AAAI 2024 (arXiv 2312.16400). Reference implementation: MMRec, src/models/lgmrec.py and
src/configs/model/LGMRec.yaml (github.com/enoche/MMRec).

With R the 0/1 user-item matrix [U, I], Â its normalised bipartite adjacency, F_m the FROZEN features of modality m
(image, text), τ = 0.2 and N(x) = x / max(‖x‖, 1e-12) row-wise:
  CGE:  c = mean of LightGCN layers 0..n_ui_layers of [E_u; E_i] on Â (cf_model "mf": c = [E_u; E_i])  [(U+I), d]
  MGE:  f_m = F_m W_m [I, d];  x_m = Â^{n_mm_layers} [D_u^-1 R f_m ; f_m]   (users start at their items' mean)
  hyperedges: a_m = F_m V_m [I, H];  Hi_m = gumbel_softmax(a_m, τ), Hu_m = gumbel_softmax(R a_m, τ)  (soft, no hard)
  GHE:  per hypergraph layer  lat = drop(Hi_m)ᵀ g_i,  g_i = drop(Hi_m) lat,  g_u = drop(Hu_m) lat   (g_i from c_i)
        drop: dropout with rate 1 - keep_rate (training only), an independent mask for each of the four matrices
  h = c + N(x_image) + N(x_text) + alpha N([g_u; g_i]_image + [g_u; g_i]_text);   score = <h_u, h_i>
  L = -(1/B) sum_b log sigmoid(<h_u, h_p> - <h_u, h_n>)
      + cl_weight [sum_b NCE(g_u,image[u_b], g_u,text; u_b) + sum_b NCE(g_i,image[p_b], g_i,text; p_b)]
      + reg_weight (‖h_u[u_B]‖_F + ‖h_i[p_B]‖_F + ‖h_i[n_B]‖_F) / B
  NCE(a, T; j) = -log[exp(cos(a, T_j)/τ) / sum_k exp(cos(a, T_k)/τ)] over ALL users (items) k, summed over the batch.
W_m and V_m are Xavier-uniform [d_f, d] and [d_f, hyper_num]; the feature width of W_m is the embedding size (MMRec's
feat_embed_dim, which must equal it for the sum). With both modalities this is MMRec's LGMRec exactly. With one
(MMRec's forward then drops the hypergraph and its loss fails) ours keeps the same formula over that modality alone,
h = c + N(x_m) + alpha N([g_u; g_i]_m), and the contrast term, which needs two hypergraphs, is 0.

MMRec samples the Gumbel noise in every forward call, evaluation included: by default ours does the same, with the
evaluation's noise drawn once from the run's seed (`eval_noise=True`, the behaviour behind MMRec's numbers);
`eval_noise=False` scores with the noiseless softmax(a / τ) instead, a deterministic ranking. Training noise and
dropout keys: see `epoch_inputs` and `baseline.step_key` (per step, the same on every device).
"""

from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignrec_jax import graph as graph_lib
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import cca
from alignrec_jax.losses import uia
from alignrec_jax.models import register
from alignrec_jax.models.aggregator import xavier_uniform
from alignrec_jax.models.baselines import baseline
from alignrec_jax.models.batch import whole_batch

TAU = 0.2  # MMRec's fixed temperature of the Gumbel softmax and of the hypergraph InfoNCE


@struct.dataclass
class LGMRecInputs(baseline.Sizes):
  """adj: Â [(U+I), (U+I)]; interactions: R [U, I] (0/1); user_inv_degree: [U] 1 / (d_u + 1e-7);
  features: {slot: [I, d_f]} (frozen); rng: [2] uint32 the epoch's key (training noise and dropout);
  eval_rng: [2] uint32 the evaluation's Gumbel key."""
  adj: graph_lib.Graph
  interactions: graph_lib.Graph
  user_inv_degree: jax.Array
  features: dict
  rng: jax.Array
  eval_rng: jax.Array


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
  """torch.nn.functional.gumbel_softmax(hard=False) over the last axis: softmax((logits + Gumbel noise) / tau)."""
  return jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape, logits.dtype)) / tau, axis=-1)


class LGMRecNet(baseline.GraphNet):
  """Returns {"user" [U, d], "item" [I, d], "hyper": {"u_image", "i_image", "u_text", "i_text"}: GHE [U|I, d]}.

  key: None (noiseless softmax, no dropout) or a PRNG key for the Gumbel noise (and for dropout when `train`)."""
  n_ui_layers: int
  n_mm_layers: int
  n_hyper_layers: int
  hyper_num: int
  keep_rate: float
  alpha: float
  cf_model: str

  @nn.compact
  def __call__(self, inputs: LGMRecInputs, key: Optional[jax.Array] = None, train: bool = False) -> dict:
    d, U = self.embedding_size, self.n_users
    if self.cf_model == "lightgcn":
      _, _, c_u, c_i = self.lightgcn(inputs.adj, self.n_ui_layers)
    else:
      c_u, c_i = self.id_tables()
    cge = jnp.concatenate([c_u, c_i], 0)
    keys = jax.random.split(key, 8) if key is not None else [None] * 8

    def soft_assign(k, logits):
      return jax.nn.softmax(logits / TAU, -1) if k is None else gumbel_softmax(k, logits, TAU)

    def drop(k, x):
      return baseline.dropout(k, x, 1.0 - self.keep_rate) if train else x

    local, hyper, ghe = cge, {}, 0.0
    for m, slot in enumerate(sorted(inputs.features)):  # image before text
      feats = inputs.features[slot]
      trs = self.param(f"{slot}_trs", xavier_uniform, (feats.shape[1], d))
      v = self.param(f"{slot}_hyper", xavier_uniform, (feats.shape[1], self.hyper_num))
      i_logits = feats @ v
      u_logits = self.propagate(inputs.interactions, i_logits)  # from the raw logits, before the softmax
      k_i, k_u, d_i, d_u = keys[4 * m:4 * m + 4]
      i_hyper, u_hyper = drop(d_i, soft_assign(k_i, i_logits)), drop(d_u, soft_assign(k_u, u_logits))
      g_i = c_i
      for _ in range(self.n_hyper_layers):
        lat = i_hyper.T @ g_i  # [H, d]
        g_i, g_u = i_hyper @ lat, u_hyper @ lat
      hyper[f"u_{slot}"], hyper[f"i_{slot}"] = g_u, g_i
      ghe = ghe + jnp.concatenate([g_u, g_i], 0)

      f = feats @ trs
      x = jnp.concatenate([self.propagate(inputs.interactions, f) * inputs.user_inv_degree[:, None], f], 0)
      for _ in range(self.n_mm_layers):
        x = self.propagate(inputs.adj, x)
      local = local + cca.normalize(x)
    h = local + self.alpha * cca.normalize(ghe)
    return {"user": h[:U], "item": h[U:], "hyper": hyper}


@register("lgmrec")
class LGMRec(baseline.Baseline):
  """The model contract (alignrec_jax.models) for LGMRec."""
  inputs_change_per_epoch = True  # a fresh noise / dropout key every epoch
  defaults = {"cf_model": "lightgcn", "n_ui_layers": 2, "n_mm_layers": 2, "n_hyper_layer": 1, "hyper_num": 4,
              "keep_rate": 0.5, "alpha": 0.3, "cl_weight": 1e-4, "reg_weight": 1e-6, "eval_noise": True}
  # LGMRec.yaml's grid (its baby setting; one point) in its hyper_parameters order; its lr is overall.yaml's 0.001
  grid = {"model.lgmrec.n_ui_layers": [2], "model.lgmrec.n_mm_layers": [2], "model.lgmrec.n_hyper_layer": [1],
          "model.lgmrec.hyper_num": [4], "model.lgmrec.keep_rate": [0.5], "model.lgmrec.alpha": [0.3],
          "model.lgmrec.cl_weight": [1e-4], "model.lgmrec.reg_weight": [1e-6]}

  def __init__(self, config):
    super().__init__(config)
    hp = self.hp
    if hp.cf_model not in ("lightgcn", "mf"):
      raise ConfigError(f"config.model.lgmrec.cf_model={hp.cf_model!r} must be 'lightgcn' or 'mf'")
    if not 0.0 < hp.keep_rate <= 1.0:
      raise ConfigError(f"config.model.lgmrec.keep_rate={hp.keep_rate} must lie in (0, 1]")
    if hp.n_hyper_layer < 1 or hp.hyper_num < 1:
      raise ConfigError(f"config.model.lgmrec: n_hyper_layer={hp.n_hyper_layer} and hyper_num={hp.hyper_num} "
                        f"must be >= 1")

  def content_slots(self, data) -> tuple[str, ...]:
    return tuple(slot for slot, _, _ in baseline.modalities(data))

  def build_inputs(self, data) -> LGMRecInputs:
    found = {slot: f for slot, _, f in baseline.require_modalities(data, self.name)}
    adj, _ = graph_lib.user_item_graph(data.train, data.n_users, data.n_items)
    users, items = data.train[:, 0].astype(np.int64), data.train[:, 1].astype(np.int64)
    interactions = graph_lib.from_coo(users, items, np.ones(len(users), np.float32), data.n_users, data.n_items)
    inv_degree = 1.0 / (np.bincount(users, minlength=data.n_users).astype(np.float64) + 1e-7)
    return LGMRecInputs(adj=adj, interactions=interactions, user_inv_degree=jnp.asarray(inv_degree, jnp.float32),
                        features={s: jnp.asarray(f) for s, f in found.items()},
                        rng=jax.random.PRNGKey(self.seed), eval_rng=jax.random.split(jax.random.PRNGKey(self.seed))[1],
                        n_users=data.n_users, n_items=data.n_items)

  def epoch_inputs(self, inputs: LGMRecInputs, rng: jax.Array, epoch: int) -> LGMRecInputs:
    """The epoch's noise and dropout key (the trainer's per-epoch hook)."""
    del epoch
    return inputs.replace(rng=jnp.asarray(rng, jnp.uint32).reshape(2))

  def net(self, inputs: LGMRecInputs) -> LGMRecNet:
    hp = self.hp
    return LGMRecNet(inputs.n_users, inputs.n_items, hp.embedding_size, self.propagation, int(hp.n_ui_layers),
                     int(hp.n_mm_layers), int(hp.n_hyper_layer), int(hp.hyper_num), float(hp.keep_rate),
                     float(hp.alpha), str(hp.cf_model))

  def init(self, rng: jax.Array, inputs: LGMRecInputs) -> dict:
    return self.net(inputs).init(rng, inputs)["params"]

  def representations(self, params: dict, inputs: LGMRecInputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs, key=inputs.eval_rng if self.hp.eval_noise else None)
    return out["user"], out["item"]

  def loss(self, params: dict, inputs: LGMRecInputs, batch: dict,
           axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    """This shard's share of the batch loss (module docstring). batch[*]: [b]."""
    hp = self.hp
    wb = whole_batch(batch, axis_name)
    out = self.forward(params, inputs, key=baseline.step_key(inputs.rng, wb.whole), train=True)
    w = wb.weight
    u, p, n = batch["users"], batch["pos"], batch["neg"]
    mf = uia.bpr(out["user"][u], out["item"][p], out["item"][n], w, wb.n_real)
    g = out["hyper"]

    def nce_sum(anchor, table, rows):  # sum over this shard's rows, all rows of `table` as candidates
      return cca.info_nce(anchor[rows], table, rows, w, jnp.ones(table.shape[0]), 1.0, TAU)

    cl = jnp.zeros((), jnp.float32)
    if "u_image" in g and "u_text" in g:  # the contrast of the two modalities' hypergraph embeddings
      cl = nce_sum(g["u_image"], g["u_text"], u) + nce_sum(g["i_image"], g["i_text"], p)
    whole = wb.whole
    reg = baseline.emb_loss([out["user"][whole["users"]], out["item"][whole["pos"]], out["item"][whole["neg"]]],
                            wb.weight_all, wb.n_real) * wb.share
    total = mf + hp.cl_weight * cl + hp.reg_weight * reg
    return total, {"loss": total, "bpr": mf, "hcl": cl, "reg": reg}
