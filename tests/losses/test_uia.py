"""User-Item Alignment losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from alignrec_jax.losses import uia

U = jnp.array([[1.0, 0.0], [0.0, 2.0]])
P = jnp.array([[2.0, 0.0], [1.0, 1.0]])
N = jnp.array([[0.0, 1.0], [0.0, 0.0]])
W = jnp.ones(2)


def test_bpr_hand_computed():
  # margins: <u0,p0> - <u0,n0> = 2 - 0 = 2; <u1,p1> - <u1,n1> = 2 - 0 = 2
  want = -math.log(1 / (1 + math.exp(-2)))
  assert float(uia.bpr(U, P, N, W, 2.0)) == pytest.approx(want, rel=1e-6)


def test_l2_divides_by_the_configured_batch_size():
  # ½ (|u|² = 1 + 4, |p|² = 4 + 2, |n|² = 1 + 0) / 2048 = ½ · 12 / 2048
  assert float(uia.l2(U, P, N, W, 2048)) == pytest.approx(6 / 2048, rel=1e-6)


def test_user_item_cosine_hand_computed():
  # cos(u0, p0) = 1; cos(u1, p1) = 2 / (2 sqrt 2) = 1/sqrt 2 -> 1 - mean = 1 - (1 + 0.70710678) / 2
  want = 1 - (1 + 1 / math.sqrt(2)) / 2
  assert float(uia.user_item_cosine(U, P, W, 2.0)) == pytest.approx(want, rel=1e-6)


def test_padding_rows_are_ignored_and_shards_add_up():
  w = jnp.array([1.0, 0.0])
  assert float(uia.bpr(U, P, N, w, 1.0)) == pytest.approx(-math.log(1 / (1 + math.exp(-2))), rel=1e-6)
  whole = float(uia.user_item_cosine(U, P, W, 2.0))
  halves = sum(float(uia.user_item_cosine(U[i:i + 1], P[i:i + 1], W[:1], 2.0)) for i in range(2))
  assert halves == pytest.approx(whole, rel=1e-6)
  np.testing.assert_allclose(float(uia.l2(U, P, N, w, 2048)), 0.5 * (1 + 4 + 1) / 2048, rtol=1e-6)
