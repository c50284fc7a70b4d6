"""AlignRec's Aggregator (docs/method.md §5.1-5.2): LightGCN on the user-item graph (ID view) and the
behaviour-gated item-item branch (content view).

  X0 = [E_u; E_i];  X(l+1) = Â X(l);  H_id = mean(X0 .. X(L_ui))           -> h_id_u [U, d], h_id_i [I, d]
  M = F W_trsᵀ + b_trs  (LayerNorm(F) first if use_ln)                      [I, d]
  P = E_i ⊙ sigmoid(M W_gᵀ + b_g)                                           [I, d]  (ID embedding gated by content)
  h_mm_i = S̃^{L_ii} P;  h_mm_u = R̂ h_mm_i                                   [I, d], [U, d]

Initialisation as the reference (PyTorch): Xavier-uniform embeddings (bound sqrt(6 / (rows + d))), Linear weight and
bias U(±1/sqrt(fan_in)); the feature table F is a trainable parameter initialised from the loaded features, unless
`freeze_features` (then the input table is used as a constant).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignrec_jax import graph as graph_lib


def xavier_uniform(key, shape, dtype=jnp.float32):
  """torch.nn.init.xavier_uniform_ on a [rows, d] table: U(±sqrt(6 / (rows + d)))."""
  bound = math.sqrt(6.0 / (shape[0] + shape[1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init for the weight and the bias: U(±1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
  init = torch_linear_init(fan_in)
  return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


class Aggregator(nn.Module):
  """Returns {"id_user" [U, d], "id_item" [I, d], "mm_user" [U, d], "mm_item" [I, d], "features" [I, d_f]}.

  `inputs` must have `adj` (Â), `user_item` (R̂), `item_item` (S̃) graphs and `features` [I, d_f] (initial table).
  """
  n_users: int
  n_items: int
  embedding_size: int = 64
  n_ui_layers: int = 2
  n_ii_layers: int = 1
  use_ln: bool = False
  freeze_features: bool = False
  propagation: str = "segment_sum"

  @nn.compact
  def __call__(self, inputs: Any) -> dict:
    d = self.embedding_size
    user_emb = self.param("user_embedding", xavier_uniform, (self.n_users, d))
    item_emb = self.param("item_id_embedding", xavier_uniform, (self.n_items, d))
    if self.freeze_features:
      feats = inputs.features
    else:
      def from_loaded(rng, shape):
        del rng
        if inputs.features.shape[0] == 0:  # a placeholder once params exist (AlignRec.inputs_after_init): flax
          return jnp.zeros(shape, jnp.float32)  # only traces this for the shape check, nothing is allocated
        return jnp.asarray(inputs.features, jnp.float32)
      feats = self.param("features", from_loaded, (self.n_items, inputs.features.shape[1]))
    d_f = feats.shape[1]

    # ID view: LightGCN, layer outputs averaged including layer 0.
    x = jnp.concatenate([user_emb, item_emb], axis=0)
    layers = [x]
    for _ in range(self.n_ui_layers):
      x = graph_lib.propagate(inputs.adj, x, self.propagation)
      layers.append(x)
    h_id = jnp.mean(jnp.stack(layers), axis=0)

    # Content view: the item ID embedding gated by the projected features, propagated over the item-item graph.
    content = nn.LayerNorm(epsilon=1e-5, name="v_ln")(feats) if self.use_ln else feats
    projected = torch_dense(d, d_f, "mm_trs")(content)
    gated = item_emb * nn.sigmoid(torch_dense(d, d, "gate_v")(projected))
    h_mm_i = gated
    for _ in range(self.n_ii_layers):
      h_mm_i = graph_lib.propagate(inputs.item_item, h_mm_i, self.propagation)
    h_mm_u = graph_lib.propagate(inputs.user_item, h_mm_i, self.propagation)
    return {"id_user": h_id[:self.n_users], "id_item": h_id[self.n_users:], "mm_user": h_mm_u, "mm_item": h_mm_i,
            "features": feats}
