"""Model registry and the interface every stage-2 recommender implements (AlignRec here; baselines in baselines/).

A model is a class registered by name and built from the whole config: `model = get_model(name)(config)`. It has
four methods, all pure functions of explicit arguments (jit-able except `build_inputs`):

  inputs = model.build_inputs(data)       # once, on the host: a pytree of graphs (alignrec_jax.graph.Graph) and
                                          # feature tables built from `RecData` + config; passed to every jitted
                                          # call as an argument (never closed over)
  params = model.init(rng, inputs)        # the parameter pytree
  user_emb, item_emb = model.representations(params, inputs)   # [n_users, d], [n_items, d]; score = dot product
  loss, metrics = model.loss(params, inputs, batch, axis_name=None)

Optional hooks: `inputs = model.inputs_after_init(inputs)` drops what only seeded the parameters (called once after
`init`); `epoch_inputs(inputs, rng, epoch)` gives per-epoch training inputs (see baselines/__init__.py).

`batch` is a dict of [b] arrays: `users`, `pos`, `neg` (int32) and `weight` (float32, 1 for a real row, 0 for
padding). Inside `jax.pmap` each device gets its shard of the global batch and `axis_name`; the loss then returns
this shard's share of the global loss, so that the shares (and their gradients) SUM to the loss of the whole batch
over its real rows (the trainer `psum`s the gradients). With `axis_name=None` the batch is the whole batch.
`metrics` is a dict of scalars that add up across shards the same way.
"""

from typing import Callable

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the model available as `get_model(name)`."""
  def decorator(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls
  return decorator


def get_model(name: str) -> type:
  """The model class registered as `name` (config.model.name)."""
  _import_builtin_models()
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r} (config.model.name); registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered() -> list[str]:
  _import_builtin_models()
  return sorted(_REGISTRY)


def _import_builtin_models() -> None:
  """Imports the modules that register the package's models (registration happens at import)."""
  import importlib
  import pkgutil
  from alignrec_jax.models import alignrec  # noqa: F401
  try:
    from alignrec_jax.models import baselines
  except ImportError:
    return
  for info in pkgutil.iter_modules(baselines.__path__):
    importlib.import_module(f"alignrec_jax.models.baselines.{info.name}")
