"""AlignRec's forward pass and batch loss against a plain-numpy re-implementation (spec alignrec.md §14.1)."""

import math

import jax
import numpy as np
import pytest

from alignrec_jax.data.mmrec import RecData
from alignrec_jax.models import get_model
from configs import base


def toy_data(n_users=40, n_items=30, d_f=16, seed=0) -> RecData:
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(n_users):
    items = rng.choice(n_items - 2, size=rng.integers(5, 12), replace=False)  # the last 2 items: never in train
    for i in items[:-2]:
      rows.append((u, i, 0))
    rows.append((u, items[-2], 1))
    rows.append((u, items[-1], 2))
  rows = np.asarray(rows, np.int32)
  pick = lambda s: rows[rows[:, 2] == s][:, :2]
  feats = rng.normal(size=(n_items, d_f)).astype(np.float32)
  return RecData("toy", n_users, n_items, pick(0), pick(1), pick(2), {"image": feats})


def toy_config(**loss):
  config = base.get_base_config()
  config.loss.cl_weight = loss.get("cl_weight", 1e-4)
  config.loss.sim_weight = 0.1
  config.model.embedding_size = 8
  config.model.knn_k = 5
  return config


def numpy_forward(params, data, k, n_ui_layers=2):
  """The compact numpy reference of spec §14.1 (float64)."""
  U, I = data.n_users, data.n_items
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["aggregator"]
  R = np.zeros((U, I))
  np.add.at(R, (data.train[:, 0], data.train[:, 1]), 1.0)
  A = np.block([[np.zeros((U, U)), R], [R.T, np.zeros((I, I))]])
  deg = A.sum(1)
  dinv = np.zeros_like(deg)
  dinv[deg > 0] = deg[deg > 0] ** -0.5
  Ah = A * np.outer(dinv, dinv)
  F0 = data.features["image"].astype(np.float64)
  Fn = F0 / np.linalg.norm(F0, axis=1, keepdims=True)
  S = Fn @ Fn.T
  Sk = np.zeros_like(S)
  top = np.argsort(-S, axis=1)[:, :k]
  np.put_along_axis(Sk, top, np.take_along_axis(S, top, 1), 1)
  r = Sk.sum(1)
  Sn = Sk * np.outer(r ** -0.5, r ** -0.5)
  F = p["features"]
  M = F @ p["mm_trs"]["kernel"] + p["mm_trs"]["bias"]
  gate = 1 / (1 + np.exp(-(M @ p["gate_v"]["kernel"] + p["gate_v"]["bias"])))
  P = p["item_id_embedding"] * gate
  X = np.concatenate([p["user_embedding"], p["item_id_embedding"]])
  layers = [X]
  for _ in range(n_ui_layers):
    layers.append(Ah @ layers[-1])
  Hid = np.mean(layers, axis=0)
  Hmi = Sn @ P
  Hmu = Ah[:U, U:] @ Hmi
  H = Hid + np.concatenate([Hmu, Hmi])
  return dict(user=H[:U], item=H[U:], id_user=Hid[:U], id_item=Hid[U:], mm_user=Hmu, mm_item=Hmi, F=F, Sn=Sn)


def numpy_loss(v, users, pos, neg, alpha, beta, batch_size=2048, tau=0.2):
  hu, hp, hn = v["user"][users], v["item"][pos], v["item"][neg]
  B = len(users)
  bpr = -np.mean(np.log(1 / (1 + np.exp(-((hu * hp).sum(1) - (hu * hn).sum(1))))))
  cos = (hu * hp).sum(1) / (np.linalg.norm(hu, axis=1) * np.linalg.norm(hp, axis=1))
  ui = 0.1 * (1 - cos.mean())
  reg = 1e-4 * 0.5 * ((hu ** 2).sum() + (hp ** 2).sum() + (hn ** 2).sum()) / batch_size

  def nce(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = np.exp(a @ b.T / tau)
    return np.mean(-np.log(np.diag(s) / s.sum(1)))

  cca = nce(v["mm_item"][pos], v["id_item"][pos]) + nce(v["mm_user"][users], v["id_user"][users])
  Fp = v["F"][pos] / np.linalg.norm(v["F"][pos], axis=1, keepdims=True)
  sim = np.linalg.norm(v["mm_item"][pos] @ v["mm_item"][pos].T - Fp @ Fp.T) / B
  return bpr + ui + reg + alpha * cca + beta * sim, dict(bpr=bpr, ui=ui, cca=cca, sim=sim)


def _batch(data, n, seed=1):
  rng = np.random.default_rng(seed)
  rows = data.train[rng.choice(len(data.train), n, replace=False)]
  return {"users": rows[:, 0].astype(np.int32), "pos": rows[:, 1].astype(np.int32),
          "neg": rng.integers(0, data.n_items, n).astype(np.int32), "weight": np.ones(n, np.float32)}


def test_forward_and_loss_match_numpy_reference():
  data = toy_data()
  config = toy_config()
  model = get_model("alignrec")(config)
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(0), inputs)
  ref = numpy_forward(params, data, k=config.model.knn_k)
  np.testing.assert_allclose(inputs.item_item.to_dense(), ref["Sn"], atol=1e-6)
  out = model.forward(params, inputs)
  for key in ("user", "item", "id_user", "id_item", "mm_user", "mm_item"):
    np.testing.assert_allclose(np.asarray(out[key]), ref[key], atol=1e-5, err_msg=key)
  batch = _batch(data, 24)
  loss, metrics = jax.jit(model.loss)(params, inputs, batch)
  want, parts = numpy_loss(ref, batch["users"], batch["pos"], batch["neg"], config.loss.cl_weight,
                           config.loss.sim_weight)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["bpr"]), parts["bpr"], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cca"]), parts["cca"], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["sim"]), parts["sim"], rtol=1e-5)


def test_padding_rows_do_not_change_the_loss_or_gradient():
  data = toy_data()
  model = get_model("alignrec")(toy_config(cl_weight=0.1))
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(1), inputs)
  batch = _batch(data, 20)
  padded = {k: np.concatenate([v, v[:12]]) for k, v in batch.items()}
  padded["weight"][20:] = 0.0
  grad = jax.jit(jax.grad(lambda p, b: model.loss(p, inputs, b)[0]))
  np.testing.assert_allclose(float(model.loss(params, inputs, padded)[0]), float(model.loss(params, inputs, batch)[0]),
                             rtol=1e-6)
  g1, g2 = grad(params, batch), grad(params, padded)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-9)


def test_items_with_zeroed_features_give_finite_gradients():
  """The mask-modality probe zeroes half the items' feature rows: their kNN rows have no edges, so their content
  view is a zero vector, which InfoNCE normalises. The loss and every gradient must stay finite (they were NaN)."""
  data = toy_data()
  feats = data.features["image"].copy()
  feats[::2] = 0.0
  data = RecData(data.name, data.n_users, data.n_items, data.train, data.valid, data.test, {"image": feats})
  model = get_model("alignrec")(toy_config(cl_weight=0.1))
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(2), inputs)
  batch = _batch(data, 24)
  assert np.any(np.all(np.asarray(model.forward(params, inputs)["mm_item"])[batch["pos"]] == 0, axis=1))
  loss, grads = jax.jit(jax.value_and_grad(lambda p, b: model.loss(p, inputs, b)[0]))(params, batch)
  assert np.isfinite(float(loss))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)


def test_init_follows_pytorch_defaults():
  data = toy_data(n_users=400, n_items=300, d_f=50)
  model = get_model("alignrec")(toy_config())
  inputs = model.build_inputs(data)
  p = model.init(jax.random.PRNGKey(0), inputs)["aggregator"]
  d = 8
  for name, rows in (("user_embedding", 400), ("item_id_embedding", 300)):
    bound = math.sqrt(6 / (rows + d))
    table = np.asarray(p[name])
    assert table.shape == (rows, d)
    assert np.abs(table).max() <= bound and np.abs(table).max() > 0.9 * bound, name
  for name, fan_in in (("mm_trs", 50), ("gate_v", d)):
    for part in ("kernel", "bias"):
      values = np.asarray(p[name][part])
      assert np.abs(values).max() <= 1 / math.sqrt(fan_in)
      assert np.abs(values).max() > 0.8 / math.sqrt(fan_in), (name, part)
  np.testing.assert_array_equal(np.asarray(p["features"]), data.features["image"])


def test_frozen_features_are_not_parameters_and_ln_adds_one():
  data = toy_data()
  config = toy_config()
  config.model.freeze_features = True
  config.model.use_ln = True
  model = get_model("alignrec")(config)
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(0), inputs)
  assert "features" not in params["aggregator"] and "v_ln" in params["aggregator"]
  loss, _ = model.loss(params, inputs, _batch(data, 16))
  assert np.isfinite(float(loss))


def test_missing_features_is_a_clear_error():
  data = toy_data()
  data = RecData(data.name, data.n_users, data.n_items, data.train, data.valid, data.test, {})
  with pytest.raises(ValueError, match="image_feat"):
    get_model("alignrec")(toy_config()).build_inputs(data)


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model"):
    get_model("no_such_model")
