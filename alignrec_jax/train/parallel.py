"""Data parallelism with `jax.pmap` over every device of every process (1 CPU, 8 GPUs, a TPU host or several
hosts under `jax.distributed`: the same code), for the training loop of both stages (train/loop.py).

The per-device train step is a plain function of (params, opt_state, inputs, batch shard) with a named axis, so
`shard_map` could run it unchanged. Every device holds the full parameters and graphs (replicated), computes the
full-graph representations, and the loss of its shard of the global batch. A model's loss returns the shard's
SHARE of the whole batch's loss (see alignrec_jax.models), so the gradients are `psum`med: the sum of the shares'
gradients is exactly the gradient of the whole batch's loss over its real rows, also when the padded last batch
leaves some shards with fewer real rows (a `pmean` of per-shard means would weight those shards wrongly).

Several processes (multi-controller JAX): the pmap spans the global device list, process-major (process 0's
local devices, then process 1's, ...), which is also the order of the pmap axis index. Every process draws the same
global batch from the same seed and feeds only its own rows `local_rows(devices)` of the [n_devices, ...] shards;
replicated values are placed on its local devices only; the collectives (psum) run over all devices. So N
processes with D devices each compute exactly what one process with N * D devices does.
"""

from typing import Any, Callable, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignrec_jax.errors import ConfigError

AXIS = "batch"


def global_devices() -> list:
  """Every process's local devices, process-major: the pmap axis index of a device is its position here."""
  return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


def local_devices(num_devices: int = 0) -> list:
  """The first `num_devices` local devices (0 = all of them); single-process pmaps (benches)."""
  devices = jax.local_devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError(f"config.train.num_devices={num_devices}, but this process has {len(devices)} local device(s) "
                      f"(0 = all)")
  return devices[:num_devices or len(devices)]


def train_devices(num_devices: int = 0) -> list:
  """The devices a training pmap spans: the first `num_devices` local ones (0 = all) in a single process, every
  device of every process under `jax.distributed` (where num_devices must be 0 or the local count)."""
  local = local_devices(num_devices)
  if jax.process_count() == 1:
    return local
  local = jax.local_devices()
  if num_devices not in (0, len(local)):
    raise ConfigError(f"config.train.num_devices={num_devices}: a multi-process run ({jax.process_count()} processes)"
                      f" uses every local device of every process; set it to 0 (or {len(local)})")
  return global_devices()


def own_devices(devices: Sequence) -> list:
  """This process's devices among `devices`, in their order (where it places replicated values and batch rows)."""
  return [d for d in devices if d.process_index == jax.process_index()]


def local_rows(devices: Sequence) -> slice:
  """Which rows of a global [len(devices), ...] batch this process feeds to its pmap (its devices' positions)."""
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  if not mine or mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError(f"process {jax.process_index()}'s devices are not one contiguous block of {list(devices)}")
  return slice(mine[0], mine[-1] + 1)


def collective_size(devices: Sequence) -> int:
  """How many devices a psum in a pmap over `devices` adds up: all of them, across processes (a measured check for
  the logs and results; every process must call it)."""
  count = jax.pmap(lambda x: jax.lax.psum(x, AXIS), axis_name=AXIS, devices=list(devices))
  return int(unreplicate(count(np.ones(len(own_devices(devices)), np.int32))))


def replicate(tree: Any, devices: Sequence) -> Any:
  """A copy of `tree` on each of this process's `devices`, stacked on a new leading axis [n_local, ...] (pmap's
  layout: each process passes its local part of a pmapped argument)."""
  return flax.jax_utils.replicate(tree, own_devices(devices))


def _first(x):
  if isinstance(x, jax.Array):  # this process's first device's copy; no global indexing (x[0] would compile a
    return x.addressable_data(0)[0]  # gather, and fails on arrays that are not fully addressable)
  return x[0]


def unreplicate(tree: Any) -> Any:
  """The first local device's copy of a replicated tree (every device holds the same values)."""
  return jax.tree.map(_first, tree)


def _after_all(tree):
  """`tree` (the gradients and the metrics) unchanged, but each leaf made to depend on every other leaf (through an
  exact zero).

  A parameter's in-place update must wait for every read of its old value, but nothing orders it after the
  gradients of OTHER parameters that read it (the projection kernel's gradient reads the feature table) or after the
  metrics, so XLA copied each such donated parameter before the step: at paper scale the whole feature table, read
  and written again on every step. A scalar taken from every leaf (made finite, times 0: exactly 0, never NaN) orders
  all updates after all gradients and metrics, and the copies go (tests/train/test_parallel.py checks the compiled
  step). optimization_barrier does not do it: XLA:CPU drops it before copy insertion.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if len(leaves) < 2:
    return tree
  firsts = [leaf.reshape(-1)[:1].astype(jnp.float32) for leaf in leaves if leaf.size]
  first = jnp.concatenate(firsts)
  tie = jnp.sum(jnp.where(jnp.isfinite(first), first, 0.0)) * 0.0
  return jax.tree.unflatten(treedef, [leaf + tie.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating)
                                   else leaf for leaf in leaves])


def train_step(params, opt_state, inputs, batch, *, loss_fn: Callable, tx: optax.GradientTransformation,
               axis_name: str = AXIS):
  """One optimiser step on one device's shard. loss_fn(params, inputs, batch, axis_name) -> (loss share, metrics).

  Returns (params, opt_state, metrics summed over the devices = the whole batch's values).
  """
  grads, metrics = jax.grad(lambda p: loss_fn(p, inputs, batch, axis_name), has_aux=True)(params)
  if axis_name is not None:  # None: the whole batch on one device (see `device_map`)
    grads = jax.lax.psum(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  grads, metrics = _after_all((grads, metrics))
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics


def single_device(devices: Sequence) -> bool:
  """One device in one process: `device_map` runs under jit and replicated values carry no device axis."""
  return len(devices) == 1 and jax.process_count() == 1


def put_replicated(tree: Any, devices: Sequence) -> Any:
  """A replicated argument of a `device_map` function: `replicate` over several devices, the plain tree on one."""
  if single_device(devices):
    # A copy, as `replicate` makes: a donated argument must not share buffers with anything the caller keeps
    # (a model's init may return its inputs' arrays as parameters, as BM3's feature tables do).
    return jax.device_put(tree, devices[0], may_alias=False)
  return replicate(tree, devices)


def get_replicated(tree: Any, devices: Sequence) -> Any:
  """One copy of a replicated `device_map` output (or argument): `unreplicate`, or the tree itself on one device."""
  return tree if single_device(devices) else unreplicate(tree)


def device_map(fn: Callable, devices: Sequence, sharded_argnums: Sequence[int] = (),
               donate_argnums: Sequence[int] = ()) -> Callable:
  """`jax.pmap(fn, axis_name=AXIS)` over `devices`; fn(*args, axis_name) is the per-device function.

  Arguments in `sharded_argnums` carry a leading [n_local_devices] axis (batch shards); the others are replicated
  with `put_replicated`, and outputs are read with `get_replicated`. With a single device (one process) the same
  function runs under `jax.jit` with axis_name=None, the shards' axis squeezed and no device axis on replicated
  values: pmap's per-call overhead and the [1, ...] layout (which stops XLA from updating the donated parameters
  and Adam moments in place, more than doubling an Adam step on the paper-scale table) buy nothing there.
  """
  devices = list(devices)
  if single_device(devices):
    def single(*args):
      args = [jax.tree.map(lambda x: x[0], a) if i in sharded_argnums else a for i, a in enumerate(args)]
      return fn(*args, axis_name=None)
    return jax.jit(single, donate_argnums=tuple(donate_argnums))
  return jax.pmap(lambda *args: fn(*args, axis_name=AXIS), axis_name=AXIS, devices=devices,
                  donate_argnums=tuple(donate_argnums))


def pmap_train_step(loss_fn: Callable, tx: optax.GradientTransformation, devices: Sequence) -> Callable:
  """`train_step` mapped over `devices` (see `train_devices`, `device_map`): params, opt_state and inputs replicated
  with `put_replicated`, the batch sharded on a leading axis of this process's local device count.

  params and opt_state are donated (updated in place). Block on each result before the next call: back-to-back
  pmaps with an all-reduce can deadlock the CPU backend.
  """
  def step(params, opt_state, inputs, batch, axis_name):
    return train_step(params, opt_state, inputs, batch, loss_fn=loss_fn, tx=tx, axis_name=axis_name)
  return device_map(step, devices, sharded_argnums=(3,), donate_argnums=(0, 1))
