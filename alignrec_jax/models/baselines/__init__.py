"""Baseline recommenders under AlignRec's protocol (issue 7): one file per model, each registered by name.

Every module here registers one class with `@register(name)` (alignrec_jax.models) implementing the model interface
(build_inputs / init / representations / loss, see alignrec_jax/models/__init__.py). `get_model` imports every
module of this package, so adding a baseline means adding one file: a registered class with

  default_config() -> ConfigDict   # its own hyper-parameters: config.model.<name>.<key>, e.g.
                                   # --config.model.freedom.dropout=0.9 (configs/base.py adds every model's
                                   # defaults under config.model.<name> through `default_configs()`)
  hyper_grid() -> dict             # optional: {"optim.lr": [...], "model.<name>.<key>": [...]} for compare --grid

Optional hook, for models whose TRAINING inputs change every epoch (FREEDOM's pruned user-item graph, the dropout key
of BM3): `epoch_inputs(inputs, rng, epoch) -> inputs`. The trainer calls it before each epoch with
rng = fold_in(PRNGKey(config.seed), epoch) and trains that epoch on the result; representations (evaluation) always
use the inputs of `build_inputs`. Without the hook a model trains on the `build_inputs` result every epoch.

Shared pieces below: MMRec's losses (BPRLoss with its 1e-10, EmbLoss = sum of Frobenius norms / rows), the
LightGCN propagation, PyTorch's initialisers, and the per-shard bookkeeping of the interface (a loss returns this
shard's SHARE of the whole batch's loss; terms that are not sums over rows, like a norm, are computed on the whole
batch and weighted by the shard's share of the real rows, so values and gradients add up across shards).
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignrec_jax import graph as graph_lib
from alignrec_jax.models.aggregator import torch_dense  # noqa: F401  (re-exported for the model files)
from alignrec_jax.models.aggregator import torch_linear_init  # noqa: F401
from alignrec_jax.models.aggregator import xavier_uniform  # noqa: F401

# data.features slots in MMRec's order of (v_feat, t_feat) and the short names MMRec gives their layers.
MODALITIES = (("image", "v"), ("text", "t"))


def default_configs() -> dict:
  """{model name: its default hyper-parameters} for every registered model that has `default_config()`."""
  from alignrec_jax.models import get_model, registered  # the registry imports this package: import lazily
  out = {}
  for name in registered():
    cls = get_model(name)
    if hasattr(cls, "default_config"):
      out[name] = cls.default_config()
  return out


def hparams(config: ml_collections.ConfigDict, name: str, defaults: ml_collections.ConfigDict):
  """The model's hyper-parameters: `defaults` overridden by config.model.<name> (a key it does not know is an error).

  The result also carries the shared config.model.embedding_size as `embedding_size` unless the model sets its own.
  """
  hp = ml_collections.ConfigDict(defaults.to_dict())
  given = config.model.get(name, None)
  if given is not None:
    for key, value in given.items():
      if key not in hp:
        raise ValueError(f"config.model.{name}.{key}: unknown hyper-parameter of model {name!r}; known: "
                         f"{sorted(hp.keys())}")
      hp[key] = value
  if "embedding_size" not in hp:
    hp.embedding_size = int(config.model.embedding_size)
  return hp


def modalities(data) -> list:
  """[(slot, short name, features [n_items, d_f] float32)] of the feature slots present in `data`, image first."""
  return [(slot, short, np.asarray(data.features[slot], np.float32)) for slot, short in MODALITIES
          if slot in data.features]


def require_modalities(data, model: str) -> list:
  found = modalities(data)
  if not found:
    raise ValueError(f"model {model!r} needs item features: set config.data.image_feat and/or config.data.text_feat "
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


# ------------------------------------------------------------------------------------------------- batch shares


def gather_batch(batch: dict, axis_name: Optional[str]) -> tuple[dict, jax.Array]:
  """(the whole batch, the index [b] of this shard's rows in it). Without axis_name the shard is the whole batch."""
  b = batch["users"].shape[0]
  if axis_name is None:
    return batch, jnp.arange(b, dtype=jnp.int32)
  whole = {k: jax.lax.all_gather(v, axis_name, tiled=True) for k, v in batch.items()}
  return whole, jax.lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)


def real_rows(whole: dict) -> jax.Array:
  """Number of real (weight 1) rows in the whole batch, at least 1."""
  return jnp.maximum(jnp.sum(whole["weight"].astype(jnp.float32)), 1.0)


def share(weight: jax.Array, n_real) -> jax.Array:
  """This shard's share of a whole-batch term: its real rows / all real rows (the shares sum to 1)."""
  return jnp.sum(weight) / n_real


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


# ------------------------------------------------------------------------------------------------- base class


class Baseline:
  """Plumbing every baseline shares: its hyper-parameters `self.hp` and a flax net built from the inputs' sizes.

  Subclasses set `name` (the registry name), define `default_config()`, `build_inputs(data)`, `net(inputs)`,
  `representations` and `loss`. `init` / `forward` apply the net; the net is rebuilt from static sizes on every call
  (it is a frozen dataclass, so this costs nothing and the model object stays stateless).
  """
  name = ""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.hp = hparams(config, self.name, self.default_config())
    if self.hp.embedding_size < 1:
      raise ValueError(f"config.model.embedding_size={self.hp.embedding_size} must be >= 1")
    self.batch_size = int(config.train.batch_size)
    self.propagation = config.model.get("propagation", "segment_sum")
    self.seed = int(config.seed)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    raise NotImplementedError

  def net(self, inputs) -> nn.Module:
    raise NotImplementedError

  def init(self, rng: jax.Array, inputs) -> dict:
    return self.net(inputs).init(rng, inputs)["params"]

  def forward(self, params: dict, inputs, **kwargs):
    return self.net(inputs).apply({"params": params}, inputs, **kwargs)

  def bpr_reg_loss(self, params: dict, inputs, batch: dict, axis_name: Optional[str] = None):
    """MMRec's BPR + reg_weight * EmbLoss on the scoring representations: this shard's share (module docstring).

    The loss of the models that score with `forward`'s (users, items) and add nothing else (BPR-MF, VBPR).
    batch[*]: [b].
    """
    users, items = self.forward(params, inputs)
    whole, _ = gather_batch(batch, axis_name)
    w = batch["weight"].astype(jnp.float32)
    n_real = real_rows(whole)
    u, p, n = users[batch["users"]], items[batch["pos"]], items[batch["neg"]]
    mf = mmrec_bpr(jnp.sum(u * p, -1), jnp.sum(u * n, -1), w, n_real)
    w_all = whole["weight"].astype(jnp.float32)
    reg = emb_loss([users[whole["users"]], items[whole["pos"]], items[whole["neg"]]], w_all, n_real)
    reg = reg * share(w, n_real)
    total = mf + self.hp.reg_weight * reg
    return total, {"loss": total, "bpr": mf, "reg": reg}
