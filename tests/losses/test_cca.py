"""Content-Category Alignment losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignrec_jax.losses import cca


def test_info_nce_hand_computed():
  # view1 rows are unit vectors e0, e1; view2 rows e0 and (e0 + e1)/sqrt 2 (scaled copies: normalised inside).
  v1 = jnp.array([[3.0, 0.0], [0.0, 1.0]])
  v2 = jnp.array([[1.0, 0.0], [2.0, 2.0]])
  t, c = 0.2, 1 / math.sqrt(2)
  # row 0: cos to (v2_0, v2_1) = (1, c), positive v2_0; row 1: cos = (0, c), positive v2_1
  row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(c / t)))
  row1 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(c / t)))
  w = jnp.ones(2)
  got = cca.info_nce(v1, v2, jnp.arange(2), w, w, 2.0, t)
  assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_info_nce_padding_is_neither_anchor_nor_candidate():
  v1 = jnp.array([[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
  v2 = jnp.array([[1.0, 0.0], [2.0, 2.0], [-1.0, 0.3]])
  w = jnp.array([1.0, 1.0, 0.0])
  got = cca.info_nce(v1, v2, jnp.arange(3), w, w, 2.0, 0.2)
  want = cca.info_nce(v1[:2], v2[:2], jnp.arange(2), w[:2], w[:2], 2.0, 0.2)
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_similarity_preserving_hand_computed():
  # emb rows e0, 2e1 -> E Eᵀ = [[1, 0], [0, 4]]; features at 60 degrees -> cos = [[1, .5], [.5, 1]]
  emb = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  feat = jnp.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
  w = jnp.ones(2)
  want = math.sqrt(0 + 0.25 + 0.25 + 9) / 2  # non-squared Frobenius norm / B
  got = cca.similarity_preserving(emb, emb, feat, feat, w, w, 2.0)
  assert float(got) == pytest.approx(want, rel=1e-6)


def test_similarity_preserving_zero_feature_row_has_similarity_zero():
  # A zeroed feature row (mask-modality probe) has cosine 0 to every row, itself included, instead of NaN.
  emb = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  feat = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  w = jnp.ones(2)
  want = math.sqrt((1 - 1) ** 2 + 0 + 0 + (4 - 0) ** 2) / 2
  got = cca.similarity_preserving(emb, emb, feat, feat, w, w, 2.0)
  assert float(got) == pytest.approx(want, rel=1e-6)


def test_similarity_preserving_gradient_is_that_of_the_norm_and_stops_at_the_features():
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  feat = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  w = jnp.ones(5)

  def direct(e, f):
    c = cca.cosine_matrix(jax.lax.stop_gradient(f), jax.lax.stop_gradient(f))
    return jnp.linalg.norm(e @ e.T - c) / 5

  def ours(e, f):
    return cca.similarity_preserving(e, e, f, f, w, w, 5.0)

  g_e, g_f = jax.grad(ours, argnums=(0, 1))(emb, feat)
  np.testing.assert_allclose(np.asarray(g_e), np.asarray(jax.grad(direct)(emb, feat)), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(g_f) == 0)


@pytest.mark.parametrize("rows", [7, 1100])  # one block; several blocks with a ragged, zero-padded last one
def test_similarity_preserving_wide_features_match_the_dense_norm(rows):
  """Features wider than half the batch take the symmetric blocked path for the cosine target."""
  rng = np.random.default_rng(1)
  emb = jnp.asarray(rng.normal(size=(rows, 4)) * 0.3, jnp.float32)
  feat = jnp.asarray(rng.normal(size=(rows, 2 * rows)), jnp.float32)
  w = jnp.ones(rows)
  dense = np.asarray(emb, np.float64) @ np.asarray(emb, np.float64).T
  f64 = np.asarray(feat, np.float64)
  f64 /= np.linalg.norm(f64, axis=1, keepdims=True)
  want = np.linalg.norm(dense - f64 @ f64.T) / rows
  got = cca.similarity_preserving(emb, emb, feat, feat, w, w, float(rows))
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
