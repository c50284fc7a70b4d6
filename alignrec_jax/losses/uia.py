"""User-Item Alignment losses (docs/method.md §5.5): BPR, L2 on the final batch embeddings, user-item cosine.

Each returns this shard's share of the whole batch's value: sum over the shard's rows, divided by the real row
count `n_real` of the whole batch (or, for L2, by the configured batch size, as the reference does).
"""

import jax
import jax.numpy as jnp


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Row-wise cosine similarity of [b, d] and [b, d] -> [b] (torch.nn.functional.cosine_similarity)."""
  dot = jnp.sum(a * b, axis=-1)
  return dot / jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), eps * eps))


def bpr(user: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array, n_real) -> jax.Array:
  """-(1/B) sum_b log sigmoid(<u_b, p_b> - <u_b, n_b>). user/pos/neg: [b, d]; weight: [b]."""
  margin = jnp.sum(user * pos, -1) - jnp.sum(user * neg, -1)
  return -jnp.sum(weight * jax.nn.log_sigmoid(margin)) / n_real


def l2(user: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array, batch_size: int) -> jax.Array:
  """½ (‖u_B‖² + ‖p_B‖² + ‖n_B‖²) / batch_size: the CONFIGURED batch size, also for the last, smaller batch.

  The caller multiplies by reg_weight. user/pos/neg: [b, d]; weight: [b].
  """
  sq = jnp.sum(user * user, -1) + jnp.sum(pos * pos, -1) + jnp.sum(neg * neg, -1)
  return 0.5 * jnp.sum(weight * sq) / batch_size


def user_item_cosine(user: jax.Array, pos: jax.Array, weight: jax.Array, n_real) -> jax.Array:
  """1 - (1/B) sum_b cos(u_b, p_b), written as (1/B) sum_b (1 - cos) so that shards add up. [b, d] -> scalar."""
  return jnp.sum(weight * (1.0 - cosine(user, pos))) / n_real
