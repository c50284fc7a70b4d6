"""Content-Category Alignment losses (docs/method.md §5.5): InfoNCE and the similarity-preserving loss.

Both compare each of this shard's rows with ALL rows of the whole batch (in-batch negatives / the B x B similarity
matrix), so they take the shard's rows (`*_local`, [b, d]) and the whole batch's rows (`*_all`, [B, d]) with their
weights; without data parallelism both are the same batch.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(‖x‖, eps), row-wise, written as x / sqrt(max(‖x‖², eps²)).

  The same values and the same gradient as torch's, also at a zero row (the content view of an item whose features
  are masked to zeros has no kNN edges): jnp.linalg.norm's gradient there is 0/0 = NaN, and NaN times the zero
  weight of the row's graph edges is still NaN, which poisoned every parameter in the mask-modality probe.
  """
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def info_nce(view1_local: jax.Array, view2_all: jax.Array, positive: jax.Array, weight_local: jax.Array,
             weight_all: jax.Array, n_real, temperature: float = 0.2) -> jax.Array:
  """One-direction in-batch InfoNCE, (1/B) sum_b -log[exp(c_bb/τ) / sum_b' exp(c_bb'/τ)], c = cosine.

  The denominator includes the positive; duplicates in the batch are not removed (as the reference).

  Args:
    view1_local: [b, d] anchors (this shard's rows of view 1).
    view2_all: [B, d] view 2 of the whole batch; row `positive[r]` is anchor r's positive.
    positive: [b] int32 index of each anchor's own row in the whole batch.
    weight_local: [b] 1/0 real-row mask of the anchors; weight_all: [B] the same for the candidates.
    n_real: number of real rows in the whole batch.
  """
  a, b = normalize(view1_local), normalize(view2_all)
  logits = (a @ b.T) / temperature  # [b, B]
  if temperature >= 0.02:
    # Cosines are in [-1, 1], so exp(logits) <= exp(1/τ) cannot overflow: no max-subtraction pass (it doubles the
    # cost of the [b, B] backward on CPU). Padding columns get weight 0 (not candidates).
    log_denominator = jnp.log(jnp.sum(jnp.exp(logits) * weight_all[None, :], axis=1))
  else:
    log_denominator = jax.nn.logsumexp(jnp.where(weight_all[None, :] > 0, logits, -jnp.inf), axis=1)
  pos_logit = jnp.sum(a * b[positive], axis=-1) / temperature  # a row gather, not a [b, B] scatter in the backward
  return jnp.sum(weight_local * (log_denominator - pos_logit)) / n_real


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """[n, d] x [m, d] -> [n, m] cosine similarities (the reference's build_sim, x / ‖x‖).

  A zero row (a feature masked by zeroing, in the mask-modality probe) gets similarity 0 rather than the reference's
  NaN, as torch's F.normalize would give; other rows are unchanged.
  """
  return normalize(a) @ normalize(b).T


def _sum_sq_gram_symmetric(n: jax.Array, block_rows: int = 512) -> jax.Array:
  """‖N Nᵀ‖²_F from the blocks on and above the diagonal of N Nᵀ (each off-diagonal block counted twice).

  For wide features (the paper's 4,096) this [B, B] target is the costliest part of a stage-2 step; blocks of 512
  rows do about (nb + 1) / (2 nb) of the full product's work (10/16 at B = 2,048) and stay in cache.
  """
  rows = n.shape[0]
  nb = max(1, -(-rows // block_rows))
  size = -(-rows // nb)
  blocks = jnp.pad(n, ((0, size * nb - rows), (0, 0))).reshape(nb, size, n.shape[1])  # zero rows add nothing
  total = jnp.zeros((), n.dtype)
  for i in range(nb):
    for j in range(i, nb):
      part = jnp.sum(jnp.square(blocks[i] @ blocks[j].T))
      total = total + (part if i == j else 2.0 * part)
  return total


def cosine_target_sum_sq(n_local: jax.Array, n_all: jax.Array) -> jax.Array:
  """Σ_pq (n_local[p] · n_all[q])², the target term of `similarity_preserving`, by the cheapest exact route:
  d_f x d_f products when the rows outnumber the width, else the b x B products (on one shard, where n_local holds
  the same rows as n_all, only the upper blocks of the symmetric N Nᵀ)."""
  b, big_b, d_f = n_local.shape[0], n_all.shape[0], n_all.shape[1]
  if (b + big_b) * d_f <= b * big_b:
    return jnp.sum((n_local.T @ n_local) * (n_all.T @ n_all))
  if b == big_b:
    return _sum_sq_gram_symmetric(n_all)
  return jnp.sum(jnp.square(n_local @ n_all.T))


def similarity_preserving(emb_local: jax.Array, emb_all: jax.Array, feat_local: jax.Array, feat_all: jax.Array,
                          weight_local: jax.Array, weight_all: jax.Array, n_real,
                          axis_name: Optional[str] = None) -> jax.Array:
  """‖ E Eᵀ − sg(cos(F, F)) ‖_F / B over the whole batch's real rows: a raw dot product on the left, cosine of
  the feature rows on the right (stop-gradient), the norm NOT squared (the reference's EmbLoss).

  emb_*: [b|B, d] content-view item embeddings of the batch's positive items; feat_*: [b|B, d_f] their feature rows.

  The squared norm is expanded so that no [b, B] matrix is formed when the feature width d_f is below the batch:
    S = Σ_pq (e_p·e_q − c_pq)² = <E_lᵀE_l, E_gᵀE_g> − 2 <E_lᵀN_l, E_gᵀN_g> + <N_lᵀN_l, N_gᵀN_g>
  (N = row-normalised features, l = this shard's rows, g = all rows), d x d, d x d_f and d_f x d_f products instead
  of b x B ones; for wide features the last term is computed as ‖N_l N_gᵀ‖² (whichever is cheaper; on one shard
  from the upper blocks of the symmetric N Nᵀ only).
  The norm needs S over ALL rows, so with `axis_name` the shards' sums are `psum`med; each shard returns
  sqrt(S)/(B · n_shards) plus a zero-valued term whose gradient is its exact share dS_shard / (2 sqrt(S) B), so
  both the values and the gradients add up across shards.
  """
  def rows_normalised(f, w):
    return jax.lax.stop_gradient(normalize(f) * w[:, None])

  b, big_b = emb_local.shape[0], emb_all.shape[0]
  e_g, n_g = emb_all * weight_all[:, None], rows_normalised(feat_all, weight_all)
  if b == big_b:  # this shard is the whole batch: one copy of the [B, d_f] rows (they are 4,096 wide at paper scale)
    e_l, n_l = e_g, n_g
  else:
    e_l, n_l = emb_local * weight_local[:, None], rows_normalised(feat_local, weight_local)
  dots = jnp.sum((e_l.T @ e_l) * (e_g.T @ e_g))
  cross = jnp.sum((e_l.T @ n_l) * (e_g.T @ n_g))
  sq_local = dots - 2.0 * cross + cosine_target_sum_sq(n_l, n_g)
  sq_total = jax.lax.stop_gradient(sq_local)
  n_shards = 1
  if axis_name is not None:
    sq_total = jax.lax.psum(sq_total, axis_name)
    n_shards = jax.lax.psum(1, axis_name)
  norm = jnp.sqrt(jnp.maximum(sq_total, 0.0))  # the expansion can round a true 0 to a tiny negative
  safe = jnp.where(norm > 0, norm, 1.0)
  grad_share = jnp.where(norm > 0, (sq_local - jax.lax.stop_gradient(sq_local)) / (2.0 * safe), 0.0)
  return (norm / n_shards + grad_share) / n_real
