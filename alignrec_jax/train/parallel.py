"""Data parallelism over the local devices with `jax.pmap` (1 CPU, 8 GPUs or a TPU host: the same code).

The per-device train step is a plain function of (params, opt_state, inputs, batch shard) with a named axis, so
`shard_map` could run it unchanged. Every device holds the full parameters and graphs (replicated), computes the
full-graph representations, and the loss of its shard of the global batch. A model's loss returns the shard's
SHARE of the whole batch's loss (see alignrec_jax.models), so the gradients are `psum`med: the sum of the shares'
gradients is exactly the gradient of the whole batch's loss over its real rows, also when the padded last batch
leaves some shards with fewer real rows (a `pmean` of per-shard means would weight those shards wrongly).
"""

from typing import Any, Callable, Sequence

import flax.jax_utils
import jax
import optax

AXIS = "batch"


def local_devices(num_devices: int = 0) -> list:
  """The first `num_devices` local devices (0 = all of them)."""
  devices = jax.local_devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"config.train.num_devices={num_devices}, but this process has {len(devices)} local device(s) "
                     f"(0 = all)")
  return devices[:num_devices or len(devices)]


def replicate(tree: Any, devices: Sequence) -> Any:
  """A copy of `tree` on every device, stacked on a new leading axis [n_devices, ...] (pmap's layout)."""
  return flax.jax_utils.replicate(tree, devices)


def unreplicate(tree: Any) -> Any:
  """Device 0's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def train_step(params, opt_state, inputs, batch, *, loss_fn: Callable, tx: optax.GradientTransformation,
               axis_name: str = AXIS):
  """One optimiser step on one device's shard. loss_fn(params, inputs, batch, axis_name) -> (loss share, metrics).

  Returns (params, opt_state, metrics summed over the devices = the whole batch's values).
  """
  grads, metrics = jax.grad(lambda p: loss_fn(p, inputs, batch, axis_name), has_aux=True)(params)
  grads = jax.lax.psum(grads, axis_name)
  metrics = jax.lax.psum(metrics, axis_name)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics


def pmap_train_step(loss_fn: Callable, tx: optax.GradientTransformation, devices: Sequence) -> Callable:
  """pmapped `train_step` over `devices`: args replicated / sharded on a leading [n_devices] axis.

  params and opt_state are donated (updated in place). Block on each result before the next call: back-to-back
  pmaps with an all-reduce can deadlock the CPU backend.
  """
  def step(params, opt_state, inputs, batch):
    return train_step(params, opt_state, inputs, batch, loss_fn=loss_fn, tx=tx, axis_name=AXIS)
  return jax.pmap(step, axis_name=AXIS, devices=list(devices), donate_argnums=(0, 1))
