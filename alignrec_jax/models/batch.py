"""The whole batch as seen from one shard, so that a model writes its loss as if the batch were on one device.

Inside `jax.pmap` each device holds a shard [b] of the global batch [B] and must return its SHARE of the whole
batch's loss (alignrec_jax/models/__init__.py). Terms that compare rows across the batch (in-batch negatives, the
B x B similarity target) need every row, and a term that is not a sum over rows (a norm of the batch's embeddings)
is computed once on the whole batch and weighted by `share`; sums over rows use the shard's rows divided by `n_real`.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class WholeBatch(NamedTuple):
  whole: dict            # the whole batch's [B] arrays (the shard's own dict without an axis name)
  own: jax.Array         # [b] int32: index of this shard's rows in `whole`
  weight: jax.Array      # [b] float32: 1 for this shard's real rows, 0 for padding
  weight_all: jax.Array  # [B] float32: the same for the whole batch
  n_real: jax.Array      # the number of real rows in the whole batch, at least 1
  share: jax.Array       # this shard's real rows / n_real (the shares sum to 1)


def whole_batch(batch: dict, axis_name: Optional[str] = None) -> WholeBatch:
  """`batch` ({"users", "pos", "neg", "weight"} [b]) and, under pmap's `axis_name`, the rest of the batch."""
  b = batch["users"].shape[0]
  if axis_name is None:
    whole, own = batch, jnp.arange(b, dtype=jnp.int32)
  else:
    whole = {k: jax.lax.all_gather(v, axis_name, tiled=True) for k, v in batch.items()}
    own = jax.lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
  weight, weight_all = batch["weight"].astype(jnp.float32), whole["weight"].astype(jnp.float32)
  n_real = jnp.maximum(jnp.sum(weight_all), 1.0)
  return WholeBatch(whole, own, weight, weight_all, n_real, jnp.sum(weight) / n_real)
