"""Model registry and the contract every stage-2 recommender implements (AlignRec here; baselines in baselines/).

A model is a `Recommender` subclass registered by name and built from the whole config:
`model = get_model(name)(config)`. Its methods are pure functions of explicit arguments (jit-able except
`build_inputs` and `epoch_inputs`):

  inputs = model.build_inputs(data)       # once, on the host: a pytree of graphs (alignrec_jax.graph.Graph) and
                                          # feature tables built from `RecData` + config; passed to every jitted
                                          # call as an argument (never closed over)
  params = model.init(rng, inputs)        # the parameter pytree
  user_emb, item_emb = model.representations(params, inputs)   # [n_users, d], [n_items, d]; score = dot product
  loss, metrics = model.loss(params, inputs, batch, axis_name=None)

Hooks with defaults: `inputs_after_init(inputs)` drops what only seeded the parameters (called once after `init`;
default: `inputs`); `epoch_inputs(inputs, rng, epoch)` gives the epoch's training inputs (FREEDOM's pruned graph,
BM3's dropout key; rng = fold_in(PRNGKey(config.seed), epoch); default: the same object `inputs`, which the trainer
then does not place on the devices again); representations (evaluation) always use the `build_inputs` result.
`default_config()` holds the model's own hyper-parameters (config.model.<name>.<key>, added by configs/base.py
through `default_configs()`) and `hyper_grid()` the grid `compare --grid` searches ({"optim.lr": [...], ...}).

`batch` is a dict of [b] arrays: `users`, `pos`, `neg` (int32) and `weight` (float32, 1 for a real row, 0 for
padding). Inside `jax.pmap` each device gets its shard of the global batch and `axis_name`; the loss then returns
this shard's share of the global loss, so that the shares (and their gradients) SUM to the loss of the whole batch
over its real rows (the trainer `psum`s the gradients). With `axis_name=None` the batch is the whole batch.
`metrics` is a dict of scalars that add up across shards the same way. models/batch.py gives a loss the whole batch.
"""

import importlib
import pkgutil
from typing import Callable, Optional

import flax.linen as nn
import jax
import ml_collections

from alignrec_jax.errors import ConfigError

_REGISTRY: dict[str, type] = {}


class Recommender:
  """The contract (module docstring). Subclasses define `build_inputs`, `net` (the flax net, rebuilt from the inputs'
  static sizes on every call: it is a frozen dataclass, so the model object stays stateless) and `loss`; `name` is
  set by `register`."""
  name = ""
  defaults: dict = {}  # what default_config() returns
  grid: dict = {}      # what hyper_grid() returns
  inputs_change_per_epoch = False  # True where epoch_inputs returns new inputs (the trainer then keeps a host copy)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.batch_size = int(config.train.batch_size)
    self.propagation = config.model.propagation

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cls.defaults)

  @classmethod
  def hyper_grid(cls) -> dict:
    return dict(cls.grid)

  def build_inputs(self, data):
    raise NotImplementedError

  def content_slots(self, data) -> tuple[str, ...]:
    """The data.features slots whose rows the model scores an item from ((): an ID-only model, which cannot score
    an item without interactions). models/new_items.py attaches cold and new items by these slots' similarity."""
    del data
    return ()

  def net(self, inputs) -> nn.Module:
    raise NotImplementedError

  def init(self, rng: jax.Array, inputs) -> dict:
    return self.net(inputs).init(rng, inputs)["params"]

  def forward(self, params: dict, inputs, **kwargs):
    return self.net(inputs).apply({"params": params}, inputs, **kwargs)

  def representations(self, params: dict, inputs) -> tuple[jax.Array, jax.Array]:
    out = self.forward(params, inputs)
    return out["user"], out["item"]

  def loss(self, params: dict, inputs, batch: dict, axis_name: Optional[str] = None) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def inputs_after_init(self, inputs):
    return inputs

  def epoch_inputs(self, inputs, rng: jax.Array, epoch: int):
    del rng, epoch
    return inputs


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the model available as `get_model(name)` and sets its `name`."""
  def decorator(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return decorator


def get_model(name: str) -> type:
  """The model class registered as `name` (config.model.name)."""
  _import_builtin_models()
  if name not in _REGISTRY:
    raise ConfigError(f"unknown model {name!r} (config.model.name); registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered() -> list[str]:
  _import_builtin_models()
  return sorted(_REGISTRY)


def default_configs() -> dict:
  """{model name: its default hyper-parameters} for every registered model that has any."""
  return {name: get_model(name).default_config() for name in registered() if get_model(name).defaults}


def _import_builtin_models() -> None:
  """Imports the modules that register the package's models; on first use, as those modules import this one."""
  importlib.import_module("alignrec_jax.models.alignrec")
  baselines = importlib.import_module("alignrec_jax.models.baselines")
  for info in pkgutil.iter_modules(baselines.__path__):
    importlib.import_module(f"alignrec_jax.models.baselines.{info.name}")
