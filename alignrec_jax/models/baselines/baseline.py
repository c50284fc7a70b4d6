"""What every baseline shares: the `Baseline` base class (a `Recommender` with its hyper-parameters), MMRec's losses
(BPRLoss with its 1e-10, EmbLoss = sum of Frobenius norms / rows), the LightGCN propagation, PyTorch's
initialisers, and the table sizes and ID tables most nets start from."""

import math
from typing import Optional

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignrec_jax import graph as graph_lib
from alignrec_jax.errors import ConfigError
from alignrec_jax.models import Recommender
from alignrec_jax.models.aggregator import torch_linear_init
from alignrec_jax.models.aggregator import xavier_uniform
from alignrec_jax.models.batch import whole_batch

# data.features slots in MMRec's order of (v_feat, t_feat) and the short names MMRec gives their layers.
MODALITIES = (("image", "v"), ("text", "t"))


def hparams(config: ml_collections.ConfigDict, name: str, defaults: ml_collections.ConfigDict):
  """The model's hyper-parameters: `defaults` overridden by config.model.<name> (a key it does not know is an error).

  The result also carries the shared config.model.embedding_size as `embedding_size`.
  """
  hp = ml_collections.ConfigDict(defaults.to_dict())
  given = config.model.get(name, None)
  if given is not None:
    for key, value in given.items():
      if key not in hp:
        raise ConfigError(f"config.model.{name}.{key}: unknown hyper-parameter of model {name!r}; known: "
                          f"{sorted(hp.keys())}")
      hp[key] = value
  hp.embedding_size = int(config.model.embedding_size)
  return hp


def modalities(data) -> list:
  """[(slot, short name, features [n_items, d_f] float32)] of the feature slots present in `data`, image first."""
  return [(slot, short, np.asarray(data.features[slot], np.float32)) for slot, short in MODALITIES
          if slot in data.features]


def require_modalities(data, model: str) -> list:
  found = modalities(data)
  if not found:
    raise ConfigError(f"model {model!r} needs item features: set config.data.image_feat and/or config.data.text_feat "
                      f"(dataset {data.name!r} has none)")
  return found


# ------------------------------------------------------------------------------------------------- initialisers


def xavier_normal(key, shape, dtype=jnp.float32):
  """torch.nn.init.xavier_normal_ on a 2-D table or Linear weight: N(0, 2 / (fan_in + fan_out))."""
  std = math.sqrt(2.0 / (shape[0] + shape[1]))
  return std * jax.random.normal(key, shape, dtype)


def dense(features: int, fan_in: int, name: str, kernel: str = "torch", bias: str = "torch",
          use_bias: bool = True) -> nn.Dense:
  """An nn.Linear(fan_in, features) with the initialisers MMRec gives it.

  kernel: "torch" (PyTorch default, U(±1/sqrt(fan_in))) or "xavier_normal"; bias: "torch" or "zeros".
  """
  kinit = xavier_normal if kernel == "xavier_normal" else torch_linear_init(fan_in)
  binit = nn.initializers.zeros if bias == "zeros" else torch_linear_init(fan_in)
  return nn.Dense(features, use_bias=use_bias, kernel_init=kinit, bias_init=binit, name=name)


def feature_param(module: nn.Module, name: str, features: jax.Array) -> jax.Array:
  """A trainable table initialised from the loaded features (MMRec's nn.Embedding.from_pretrained(freeze=False))."""
  return module.param(name, lambda rng: jnp.asarray(features, jnp.float32))


# ------------------------------------------------------------------------------------------------- propagation


def lightgcn_layers(adj: graph_lib.Graph, user_emb: jax.Array, item_emb: jax.Array, n_layers: int,
             method: str = "segment_sum") -> tuple[jax.Array, jax.Array]:
  """LightGCN: X0 = [E_u; E_i], X(l+1) = Â X(l), mean of X0..X(L). Returns ([U, d], [I, d])."""
  x = jnp.concatenate([user_emb, item_emb], axis=0)
  total = x
  for _ in range(n_layers):
    x = graph_lib.propagate(adj, x, method)
    total = total + x
  mean = total / (n_layers + 1)
  return mean[:user_emb.shape[0]], mean[user_emb.shape[0]:]


# ------------------------------------------------------------------------------------------------- losses


def mmrec_bpr(pos_score: jax.Array, neg_score: jax.Array, weight: jax.Array, n_real) -> jax.Array:
  """MMRec's BPRLoss, -(1/B) sum_b log(1e-10 + sigmoid(pos_b - neg_b)); scores [b], weight [b]."""
  return -jnp.sum(weight * jnp.log(1e-10 + jax.nn.sigmoid(pos_score - neg_score))) / n_real


def frobenius(x: jax.Array, weight: Optional[jax.Array] = None) -> jax.Array:
  """‖x‖_F over the rows with weight 1 ([n, d] -> scalar), with a gradient that stays finite at 0."""
  sq = jnp.sum(x * x, axis=-1)
  if weight is not None:
    sq = weight * sq
  total = jnp.sum(sq)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sqrt(safe), 0.0)


def emb_loss(tables: list, weight: Optional[jax.Array], n_rows) -> jax.Array:
  """MMRec's EmbLoss: sum_t ‖t‖_F / n_rows (norms NOT squared), over rows with weight 1. tables: [[n, d], ...]."""
  return sum(frobenius(t, weight) for t in tables) / n_rows


def step_key(rng: jax.Array, whole: dict) -> jax.Array:
  """A per-step PRNG key: `rng` (the epoch's key) folded with the first row (user, positive) of the WHOLE batch.

  Each train interaction is the first row of at most one batch per epoch, so steps get distinct keys, and every
  device of a pmap derives the same key (the same dropout mask as one device would draw).
  """
  key = jax.random.fold_in(rng, whole["users"][0].astype(jnp.uint32))
  return jax.random.fold_in(key, whole["pos"][0].astype(jnp.uint32))


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """torch.nn.functional.dropout in training mode: zero with probability `rate`, scale the rest by 1/(1-rate)."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


# ------------------------------------------------------------------------------------------------- bases


@struct.dataclass
class Sizes:
  """The table sizes a baseline's inputs carry (static: they fix the parameter shapes)."""
  n_users: int = struct.field(pytree_node=False)
  n_items: int = struct.field(pytree_node=False)


class TablesNet(nn.Module):
  """A net that starts from a user and an item ID table of `embedding_size` columns (`id_tables`)."""
  n_users: int
  n_items: int
  embedding_size: int

  def id_tables(self, user: str = "user_embedding", item: str = "item_id_embedding", init=xavier_uniform):
    """([U, d], [I, d]) parameters, user table first (the order fixes their init keys)."""
    d = self.embedding_size
    return self.param(user, init, (self.n_users, d)), self.param(item, init, (self.n_items, d))


class GraphNet(TablesNet):
  """A TablesNet over graphs, propagating with one `propagation` method (graph_lib.PROPAGATION_METHODS)."""
  propagation: str

  def propagate(self, graph: graph_lib.Graph, x: jax.Array) -> jax.Array:
    return graph_lib.propagate(graph, x, self.propagation)

  def lightgcn(self, adj: graph_lib.Graph, n_layers: int, user: str = "user_embedding",
               item: str = "item_id_embedding") -> tuple:
    """(E_u, E_i, H_u, H_i): the ID tables (`id_tables`) and their LightGCN layer means over `adj`."""
    user_emb, item_emb = self.id_tables(user, item)
    return (user_emb, item_emb) + lightgcn_layers(adj, user_emb, item_emb, n_layers, self.propagation)


class Baseline(Recommender):
  """A Recommender with its hyper-parameters `self.hp` (its `defaults` overridden by config.model.<name>)."""
  ego_suffix = ""  # `loss`'s EmbLoss tables: forward's "user"/"item" + this

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.hp = hparams(config, self.name, self.default_config())  # embedding_size is checked with the config
    self.seed = int(config.seed)

  def loss(self, params: dict, inputs, batch: dict, axis_name: Optional[str] = None):
    """MMRec's BPR on `forward`'s "user"/"item" + reg_weight * EmbLoss on the batch rows of its "user"/"item"
    tables (with `ego_suffix`, the tables before propagation): this shard's share. The loss of the models that add
    nothing else (BPR-MF, VBPR, LightGCN). batch[*]: [b]."""
    out = self.forward(params, inputs)
    wb = whole_batch(batch, axis_name)
    u, p, n = out["user"][batch["users"]], out["item"][batch["pos"]], out["item"][batch["neg"]]
    mf = mmrec_bpr(jnp.sum(u * p, -1), jnp.sum(u * n, -1), wb.weight, wb.n_real)
    users, items = out["user" + self.ego_suffix], out["item" + self.ego_suffix]
    reg = emb_loss([users[wb.whole["users"]], items[wb.whole["pos"]], items[wb.whole["neg"]]], wb.weight_all,
                   wb.n_real) * wb.share
    total = mf + self.hp.reg_weight * reg
    return total, {"loss": total, "bpr": mf, "reg": reg}


class PrunedGraphBaseline(Baseline):
  """A Baseline whose net takes its user-item graph as an argument: it trains on the epoch's pruned graph
  (`inputs.train_adj`, made by `epoch_inputs`) and is initialised and evaluated on the whole one (`inputs.adj`)."""

  def init(self, rng: jax.Array, inputs) -> dict:
    return self.net(inputs).init(rng, inputs, inputs.adj)["params"]

  def representations(self, params: dict, inputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs, adj=inputs.adj)
    return out["user"], out["item"]
