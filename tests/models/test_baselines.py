"""Baselines: each model's forward and loss against a float64 numpy re-implementation of its MMRec
reference, the per-device shares of the loss, FREEDOM's graphs, and a one-epoch run of every registered model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignrec_jax import models
from alignrec_jax.data.mmrec import RecData
from alignrec_jax.models import Recommender, get_model, registered
from alignrec_jax.models.baselines import baseline
from alignrec_jax.models.baselines import freedom as freedom_lib
from configs import base
from tests.test_compare import tiny_config

BASELINES = ("bprmf", "lightgcn", "vbpr", "bm3", "freedom", "mgcn", "layergcn", "lgmrec")


def toy_data(n_users=30, n_items=24, seed=0, text=True) -> RecData:
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(n_users):
    items = rng.choice(n_items - 1, size=rng.integers(6, 11), replace=False)  # the last item: never in train
    rows += [(u, i, 0) for i in items[:-2]] + [(u, items[-2], 1), (u, items[-1], 2)]
  rows = np.asarray(rows, np.int32)
  pick = lambda s: rows[rows[:, 2] == s][:, :2]
  feats = {"image": rng.normal(size=(n_items, 10)).astype(np.float32)}
  if text:
    feats["text"] = rng.normal(size=(n_items, 6)).astype(np.float32)
  return RecData("toy", n_users, n_items, pick(0), pick(1), pick(2), feats)


def toy_config(**model_overrides):
  config = base.get_base_config()
  config.model.embedding_size = 8
  config.train.batch_size = 32
  for key, value in model_overrides.items():
    name, field = key.split("__")
    config.model[name][field] = value
  return config


def toy_batch(data, n, seed=1):
  rng = np.random.default_rng(seed)
  rows = data.train[rng.choice(len(data.train), n, replace=False)]
  return {"users": rows[:, 0].astype(np.int32), "pos": rows[:, 1].astype(np.int32),
          "neg": rng.integers(0, data.n_items, n).astype(np.int32), "weight": np.ones(n, np.float32)}


def build(name, data, config, seed=0):
  model = get_model(name)(config)
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(seed), inputs)
  return model, inputs, params


# ------------------------------------------------------------------------------------------ numpy references


def np64(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def norm_adj(data):
  U, I = data.n_users, data.n_items
  R = np.zeros((U, I))
  R[data.train[:, 0], data.train[:, 1]] = 1.0
  A = np.block([[np.zeros((U, U)), R], [R.T, np.zeros((I, I))]])
  d = A.sum(1) + 1e-7  # MMRec's get_norm_adj_mat
  return A * np.outer(d ** -0.5, d ** -0.5)


def lightgcn_np(A, eu, ei, layers):
  x = np.concatenate([eu, ei])
  out = [x]
  for _ in range(layers):
    out.append(A @ out[-1])
  mean = np.mean(out, axis=0)
  return mean[:len(eu)], mean[len(eu):]


def layergcn_np(A, eu, ei, layers):
  ego = np.concatenate([eu, ei])
  x, total = ego, 0.0
  for _ in range(layers):
    x = A @ x
    x = cos_rows(x, ego)[:, None] * x
    total = total + x
  return total[:len(eu)], total[len(eu):]


def linear(p, x):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def cos_rows(a, b):
  return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)


def bpr_mmrec(u, p, n):
  return -np.mean(np.log(1e-10 + sigmoid((u * p).sum(1) - (u * n).sum(1))))


def bpr_plain(u, p, n):
  return -np.mean(np.log(sigmoid((u * p).sum(1) - (u * n).sum(1))))


def emb_loss(*tables):
  return sum(np.linalg.norm(t) for t in tables) / tables[-1].shape[0]


def cosine_topk(F, k):
  Fn = F / np.linalg.norm(F, axis=1, keepdims=True)
  S = Fn @ Fn.T
  return S, np.argsort(-S, axis=1)[:, :k]


def nce(a, b, tau=0.2):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  s = np.exp(a @ b.T / tau)
  return np.mean(-np.log(np.diag(s) / s.sum(1)))


def normalize_rows(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nce_all(a, table, rows, tau=0.2):  # summed over the anchors; every row of `table` is a candidate
  s = np.exp(normalize_rows(a) @ normalize_rows(table).T / tau)
  return np.sum(-np.log(s[np.arange(len(rows)), rows] / s.sum(1)))


def softmax_rows(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def lgmrec_np(data, p, hp, noise):
  """(h_u, h_i, {u_slot, i_slot: GHE}) of MMRec's LGMRec forward without dropout; noise: {slot: (g_i, g_u)} Gumbel
  draws, or None for the noiseless softmax."""
  U = data.n_users
  R = np.zeros((U, data.n_items))
  R[data.train[:, 0], data.train[:, 1]] = 1.0
  A = norm_adj(data)
  c_u, c_i = lightgcn_np(A, p["user_embedding"], p["item_id_embedding"], hp.n_ui_layers)
  h, ghe, hyper = np.concatenate([c_u, c_i]), 0.0, {}
  for slot in ("image", "text"):
    F = data.features[slot].astype(np.float64)
    a = F @ p[f"{slot}_hyper"]
    g_i, g_u = noise[slot] if noise is not None else (0.0, 0.0)
    Hi, Hu = softmax_rows((a + g_i) / 0.2), softmax_rows((R @ a + g_u) / 0.2)
    lat = Hi.T @ c_i
    hyper[f"i_{slot}"], hyper[f"u_{slot}"] = Hi @ lat, Hu @ lat
    ghe = ghe + np.concatenate([Hu @ lat, Hi @ lat])
    f = F @ p[f"{slot}_trs"]
    x = np.concatenate([R @ f / (R.sum(1, keepdims=True) + 1e-7), f])
    h = h + normalize_rows(np.linalg.matrix_power(A, hp.n_mm_layers) @ x)
  h = h + hp.alpha * normalize_rows(ghe)
  return h[:U], h[U:], hyper


def lgmrec_noise(key, data, hyper_num=4):
  """LGMRec's Gumbel draws of one forward call under `key`: {slot: (g_i [I, H], g_u [U, H])}."""
  keys = jax.random.split(key, 8)
  draw = lambda k, n: np.asarray(jax.random.gumbel(k, (n, hyper_num)), np.float64)
  return {slot: (draw(keys[4 * m], data.n_items), draw(keys[4 * m + 1], data.n_users))
          for m, slot in enumerate(("image", "text"))}


def reference_loss(name, data, params, batch, hp, batch_size, noise=None):
  """(loss, user scores table, item scores table) of the MMRec model `name`, float64. noise: LGMRec's training
  Gumbel draws (lgmrec_noise); its score tables are the noiseless ones."""
  p = np64(params)
  u, pos, neg = batch["users"], batch["pos"], batch["neg"]
  U = data.n_users
  feats = {k: v.astype(np.float64) for k, v in data.features.items()}
  if name == "bprmf":
    eu, ei = p["user_embedding"], p["item_embedding"]
    loss = bpr_mmrec(eu[u], ei[pos], ei[neg]) + hp.reg_weight * emb_loss(eu[u], ei[pos], ei[neg])
    return loss, eu, ei
  if name == "lightgcn":
    hu, hi = lightgcn_np(norm_adj(data), p["user_emb"], p["item_emb"], hp.n_layers)
    reg = emb_loss(p["user_emb"][u], p["item_emb"][pos], p["item_emb"][neg])
    return bpr_mmrec(hu[u], hi[pos], hi[neg]) + hp.reg_weight * reg, hu, hi
  if name == "vbpr":
    raw = np.concatenate([feats["text"], feats["image"]], 1)
    hu = p["u_embedding"]
    hi = np.concatenate([p["i_embedding"], linear(p["item_linear"], raw)], 1)
    return bpr_mmrec(hu[u], hi[pos], hi[neg]) + hp.reg_weight * emb_loss(hu[u], hi[pos], hi[neg]), hu, hi
  if name == "bm3":  # dropout 0: the targets are the online tensors
    hu, hi = lightgcn_np(norm_adj(data), p["user_embedding"], p["item_id_embedding"], hp.n_layers)
    hi = hi + p["item_id_embedding"]
    g = lambda x: linear(p["predictor"], x)
    loss = (1 - cos_rows(g(hu)[u], hi[pos]).mean()) + (1 - cos_rows(g(hi)[pos], hu[u]).mean())
    loss += hp.reg_weight * emb_loss(hu, hi)
    cl = 0.0
    for slot in ("text", "image"):
      f = linear(p[f"{slot}_trs"], p[f"{slot}_embedding"])
      cl += (1 - cos_rows(g(f)[pos], hi[pos]).mean()) + (1 - cos_rows(g(f)[pos], f[pos]).mean())
    return loss + hp.cl_weight * cl, g(hu), g(hi)
  if name == "freedom":
    I = data.n_items
    mm = np.zeros((I, I))
    for slot, scale in (("image", hp.mm_image_weight), ("text", 1 - hp.mm_image_weight)):
      _, top = cosine_topk(feats[slot], hp.knn_k)
      part = np.zeros((I, I))
      np.put_along_axis(part, top, 1.0, 1)
      r = part.sum(1) + 1e-7
      mm += scale * part * np.outer(r ** -0.5, r ** -0.5)
    h = np.linalg.matrix_power(mm, hp.n_mm_layers) @ p["item_id_embedding"]
    hu, hi = lightgcn_np(norm_adj(data), p["user_embedding"], p["item_id_embedding"], hp.n_ui_layers)
    hi = hi + h
    aux = sum(bpr_plain(hu[u], f[pos], f[neg]) for f in
              (linear(p[f"{s}_trs"], p[f"{s}_embedding"]) for s in ("image", "text")))
    return bpr_plain(hu[u], hi[pos], hi[neg]) + hp.reg_weight * aux, hu, hi
  if name == "mgcn":  # MMRec's two-modality forward, written out
    A = norm_adj(data)
    A[A < 1e-12] = 0.0
    content = np.concatenate(lightgcn_np(A, p["user_embedding"], p["item_id_embedding"], hp.n_ui_layers))
    R = A[:U, U:]
    embeds = {}
    for slot, short in (("image", "v"), ("text", "t")):
      S, top = cosine_topk(feats[slot], hp.knn_k)
      Sk = np.zeros_like(S)
      np.put_along_axis(Sk, top, np.take_along_axis(S, top, 1), 1)
      r = Sk.sum(1)
      Sn = Sk * np.outer(r ** -0.5, r ** -0.5)
      x = p["item_id_embedding"] * sigmoid(linear(p[f"gate_{short}"], linear(p[f"{slot}_trs"],
                                                                              p[f"{slot}_embedding"])))
      for _ in range(hp.n_layers):
        x = Sn @ x
      embeds[slot] = np.concatenate([R @ x, x])
    q = lambda e: linear(p["query_common_2"], np.tanh(linear(p["query_common_0"], e)))
    att = np.concatenate([q(embeds["image"]), q(embeds["text"])], -1)
    att = np.exp(att - att.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    common = att[:, :1] * embeds["image"] + att[:, 1:] * embeds["text"]
    sep_v = sigmoid(linear(p["gate_image_prefer"], content)) * (embeds["image"] - common)
    sep_t = sigmoid(linear(p["gate_text_prefer"], content)) * (embeds["text"] - common)
    side = (sep_v + sep_t + common) / 3
    h = content + side
    hu, hi = h[:U], h[U:]
    reg = 0.5 * ((hu[u] ** 2).sum() + (hi[pos] ** 2).sum() + (hi[neg] ** 2).sum()) / batch_size
    cl = nce(side[U:][pos], content[U:][pos]) + nce(side[:U][u], content[:U][u])
    return bpr_plain(hu[u], hi[pos], hi[neg]) + hp.reg_weight * reg + hp.cl_loss * cl, hu, hi
  if name == "layergcn":  # both terms are sums over the batch
    hu, hi = layergcn_np(norm_adj(data), p["user_embeddings"], p["item_embeddings"], hp.n_layers)
    eu, ei = p["user_embeddings"], p["item_embeddings"]
    mf = -np.sum(np.log(sigmoid((hu[u] * hi[pos]).sum(1) - (hu[u] * hi[neg]).sum(1))))
    reg = 0.5 * ((eu[u] ** 2).sum() + (ei[pos] ** 2).sum() + (ei[neg] ** 2).sum())
    return mf + hp.reg_weight * reg, hu, hi
  if name == "lgmrec":  # keep_rate 1 (no dropout); scores from the noiseless softmax (eval_noise=False)
    hu, hi, g = lgmrec_np(data, p, hp, noise)
    cl = nce_all(g["u_image"][u], g["u_text"], u) + nce_all(g["i_image"][pos], g["i_text"], pos)
    reg = emb_loss(hu[u], hi[pos], hi[neg])
    loss = bpr_plain(hu[u], hi[pos], hi[neg]) + hp.cl_weight * cl + hp.reg_weight * reg
    return (loss,) + lgmrec_np(data, p, hp, None)[:2]
  raise AssertionError(name)


@pytest.mark.parametrize("name", BASELINES)
def test_loss_and_scores_match_numpy_reference(name):
  data = toy_data()
  overrides = {"bm3__dropout": 0.0, "bm3__n_layers": 2} if name == "bm3" else {}
  if name == "freedom":
    overrides = {"freedom__knn_k": 4, "freedom__reg_weight": 0.3}
  if name == "mgcn":
    overrides = {"mgcn__knn_k": 4, "mgcn__cl_loss": 0.5, "mgcn__reg_weight": 0.1}
  if name == "layergcn":
    overrides = {"layergcn__n_layers": 3, "layergcn__reg_weight": 0.3}
  if name == "lgmrec":
    overrides = {"lgmrec__keep_rate": 1.0, "lgmrec__eval_noise": False, "lgmrec__cl_weight": 0.05,
                 "lgmrec__reg_weight": 0.2}
  config = toy_config(**overrides)
  model, inputs, params = build(name, data, config)
  batch = toy_batch(data, 20)
  loss, metrics = jax.jit(model.loss)(params, inputs, batch)
  noise = lgmrec_noise(baseline.step_key(inputs.rng, batch), data) if name == "lgmrec" else None
  want, want_users, want_items = reference_loss(name, data, params, batch, model.hp, config.train.batch_size, noise)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
  users, items = jax.jit(model.representations)(params, inputs)
  np.testing.assert_allclose(np.asarray(users), want_users, atol=2e-5)
  np.testing.assert_allclose(np.asarray(items), want_items, atol=2e-5)


def test_bm3_target_dropout_is_keyed_and_scaled():
  data = toy_data()
  model, inputs, params = build("bm3", data, toy_config(bm3__dropout=0.5))
  batch = toy_batch(data, 20)
  loss = jax.jit(lambda i: model.loss(params, i, batch)[0])
  a = loss(model.epoch_inputs(inputs, jax.random.PRNGKey(3), 0))
  b = loss(model.epoch_inputs(inputs, jax.random.PRNGKey(3), 0))
  c = loss(model.epoch_inputs(inputs, jax.random.PRNGKey(4), 1))
  assert float(a) == float(b) and float(a) != float(c)
  x = jnp.ones((200, 50))
  dropped = np.asarray(baseline.dropout(jax.random.PRNGKey(0), x, 0.3))
  np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.7], rtol=1e-6)
  assert abs((dropped == 0).mean() - 0.3) < 0.02
  # No negatives in BM3's loss: changing them changes nothing.
  other = dict(batch, neg=(batch["neg"] + 1) % data.n_items)
  assert float(loss(inputs)) == float(jax.jit(lambda: model.loss(params, inputs, other)[0])())


def test_bm3_text_only_ignores_the_image_slot_like_the_authors_copy():
  """text_only=True on image + text data is the model built on the text slot alone (the AlignRec authors' copy sets
  its image features to None): same parameters, same loss and scores; with both slots the loss differs."""
  both, text = toy_data(), toy_data()
  text = RecData(text.name, text.n_users, text.n_items, text.train, text.valid, text.test,
                 {"text": text.features["text"]})
  batch = toy_batch(both, 20)
  key = jax.random.PRNGKey(5)
  got_model, got_inputs, got_params = build("bm3", both, toy_config(bm3__text_only=True))
  want_model, want_inputs, want_params = build("bm3", text, toy_config())
  assert sorted(got_params) == sorted(want_params) and "image_embedding" not in got_params
  got = float(got_model.loss(got_params, got_model.epoch_inputs(got_inputs, key, 0), batch)[0])
  want = float(want_model.loss(want_params, want_model.epoch_inputs(want_inputs, key, 0), batch)[0])
  assert got == want
  for a, b in zip(got_model.representations(got_params, got_inputs),
                  want_model.representations(want_params, want_inputs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  all_model, all_inputs, all_params = build("bm3", both, toy_config())
  assert "image_embedding" in all_params
  assert float(all_model.loss(all_params, all_model.epoch_inputs(all_inputs, key, 0), batch)[0]) != want
  with pytest.raises(ValueError, match="text_only=True needs text features"):
    get_model("bm3")(toy_config(bm3__text_only=True)).build_inputs(toy_data(text=False))


@pytest.mark.parametrize("name", BASELINES)
def test_shards_add_up_to_the_whole_batch(name):
  """pmap over 4 devices with a padded batch: the shares' losses and gradients sum to the whole batch's."""
  n_dev = 4
  if jax.local_device_count() < n_dev:
    pytest.skip("needs 4 (forced) CPU devices, see tests/conftest.py")
  data = toy_data()
  model, inputs, params = build(name, data, toy_config(**({"bm3__dropout": 0.3} if name == "bm3" else {})))
  batch = toy_batch(data, 30)
  padded = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
  padded["weight"][30:] = 0.0
  value_and_grad = jax.value_and_grad(lambda p, b, axis: model.loss(p, inputs, b, axis)[0])
  whole_loss, whole_grad = jax.jit(lambda p, b: value_and_grad(p, b, None))(params, batch)
  shards = {k: v.reshape(n_dev, -1) for k, v in padded.items()}
  shard_loss, shard_grad = jax.pmap(lambda p, b: value_and_grad(p, b, "batch"), axis_name="batch",
                                    in_axes=(None, 0))(params, shards)
  np.testing.assert_allclose(float(np.sum(shard_loss)), float(whole_loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(shard_grad), jax.tree.leaves(whole_grad)):
    np.testing.assert_allclose(np.asarray(got).sum(0), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_one_modality_is_enough_and_none_is_an_error():
  data = toy_data(text=False)
  for name in ("vbpr", "bm3", "freedom", "mgcn", "lgmrec"):
    model, inputs, params = build(name, data, toy_config())
    loss, metrics = model.loss(params, inputs, toy_batch(data, 16))
    assert np.isfinite(float(loss)), name
  assert float(metrics["hcl"]) == 0.0  # LGMRec: no second hypergraph to contrast with
  empty = RecData(data.name, data.n_users, data.n_items, data.train, data.valid, data.test, {})
  with pytest.raises(ValueError, match="needs item features"):
    get_model("mgcn")(toy_config()).build_inputs(empty)


def test_mgcn_with_one_modality_halves_the_view():
  """M = 1: the attention weight is 1, the separate part vanishes and side = e / 2."""
  data = toy_data(text=False)
  model, inputs, params = build("mgcn", data, toy_config())
  out = model.forward(params, inputs)
  p = np64(params)
  x = p["item_id_embedding"] * sigmoid(linear(p["gate_v"], linear(p["image_trs"], p["image_embedding"])))
  x = inputs.knn["image"].to_dense() @ x
  e = np.concatenate([inputs.user_item.to_dense() @ x, x])
  np.testing.assert_allclose(np.asarray(out["side"]), e / 2, atol=1e-5)


# ------------------------------------------------------------------------------------------ FREEDOM's graphs


def test_freedom_knn_graph_weights_and_mixing():
  data = toy_data()
  model, inputs, _ = build("freedom", data, toy_config(freedom__knn_k=3, freedom__mm_image_weight=0.25))
  dense = inputs.mm_adj.to_dense()
  np.testing.assert_allclose(dense.sum(1), np.ones(data.n_items), rtol=1e-6)  # 0.25 + 0.75, each row k x 1/k
  _, top = cosine_topk(data.features["image"].astype(np.float64), 3)
  assert np.all(np.diag(dense) > 0)  # each item is its own nearest neighbour
  for i in range(data.n_items):
    assert np.all(dense[i, top[i]] >= 0.25 / 3 - 1e-6)


def test_freedom_pruning_keeps_the_degree_sensitive_share_and_renormalises():
  data = toy_data(n_users=60, n_items=40)
  model, inputs, _ = build("freedom", data, toy_config(freedom__dropout=0.6))
  n_edges = len(data.train)
  kept_counts = np.zeros(n_edges)
  for epoch in range(200):
    pruned = model.epoch_inputs(inputs, jax.random.fold_in(jax.random.PRNGKey(0), epoch), epoch).train_adj
    assert pruned.n_edges == 2 * int(n_edges * 0.4)
    A = pruned.to_dense()
    np.testing.assert_allclose(A, A.T)
    kept = A[:data.n_users, data.n_users:] > 0
    kept_counts += kept[data.train[:, 0], data.train[:, 1]]
    if epoch == 0:  # weights are 1/sqrt(d_u d_i) of the KEPT graph
      du, di = kept.sum(1), kept.sum(0)
      uu, ii = np.nonzero(kept)
      np.testing.assert_allclose(A[uu, ii + data.n_users], 1 / np.sqrt(du[uu] * di[ii]), rtol=1e-5)
  # Edges between low-degree nodes (large 1/sqrt(d_u d_i)) are kept more often.
  probs = np.asarray(inputs.edge_probs)
  low, high = probs <= np.quantile(probs, 0.25), probs >= np.quantile(probs, 0.75)
  assert kept_counts[high].mean() > kept_counts[low].mean()
  # Evaluation uses the full graph, whatever the epoch's pruning.
  np.testing.assert_allclose(inputs.adj.to_dense(), norm_adj(data), rtol=1e-5, atol=1e-7)


def test_gumbel_top_k_samples_without_replacement_in_proportion():
  probs = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
  firsts = np.zeros(5)
  for s in range(4000):
    keep = freedom_lib.sample_kept_edges(jax.random.PRNGKey(s), probs, 2)
    assert len(set(keep.tolist())) == 2
    firsts[keep] += 1
  # P(edge 0 in a 2-sample) = p0 + sum_j pj p0 / (1 - pj), with p = probs / 16.
  p = probs / probs.sum()
  want0 = p[0] + sum(p[j] * p[0] / (1 - p[j]) for j in range(1, 5))
  assert abs(firsts[0] / 4000 - want0) < 0.03


# ------------------------------------------------------------------------------------------ LayerGCN, LGMRec


def test_layergcn_prunes_degree_sensitively_on_even_epochs_and_uniformly_on_odd_ones():
  """MMRec flips between torch.multinomial on 1/sqrt(d_u d_i) and random.sample after every epoch, starting with
  the degree-sensitive draw; the loss trains on the epoch's graph, evaluation on the full one."""
  data = toy_data()
  model, inputs, params = build("layergcn", data, toy_config(layergcn__dropout=0.3, layergcn__reg_weight=0.3))
  assert model.inputs_change_per_epoch
  n_keep, key = int(len(data.train) * 0.7), jax.random.PRNGKey(7)
  for epoch, weights in ((0, np.asarray(inputs.edge_probs)), (1, np.ones(len(data.train))), (2, None)):
    pruned = model.epoch_inputs(inputs, key, epoch)
    A = pruned.train_adj.to_dense()
    kept = A[:data.n_users, data.n_users:][data.train[:, 0], data.train[:, 1]] > 0
    if weights is not None:
      want = np.zeros(len(data.train), bool)
      want[freedom_lib.sample_kept_edges(key, weights, n_keep)] = True
      np.testing.assert_array_equal(kept, want)
    batch = toy_batch(data, 20)
    p = np64(params)
    hu, hi = layergcn_np(A, p["user_embeddings"], p["item_embeddings"], model.hp.n_layers)
    eu, ei = p["user_embeddings"], p["item_embeddings"]
    u, pos, neg = batch["users"], batch["pos"], batch["neg"]
    want_loss = (-np.sum(np.log(sigmoid((hu[u] * hi[pos]).sum(1) - (hu[u] * hi[neg]).sum(1))))
                 + 0.3 * 0.5 * ((eu[u] ** 2).sum() + (ei[pos] ** 2).sum() + (ei[neg] ** 2).sum()))
    np.testing.assert_allclose(float(model.loss(params, pruned, batch)[0]), want_loss, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(model.representations(params, pruned)[0]),
                             layergcn_np(norm_adj(data), p["user_embeddings"], p["item_embeddings"], 4)[0], atol=2e-5)
  plain, plain_inputs, _ = build("layergcn", data, toy_config())  # dropout 0: the full graph, the same inputs
  assert not plain.inputs_change_per_epoch and plain.epoch_inputs(plain_inputs, key, 1) is plain_inputs


def test_lgmrec_noise_and_dropout_are_keyed_and_evaluation_draws_once():
  """Training: fresh Gumbel noise and hyperedge dropout per key; evaluation: MMRec's noisy forward with one draw
  from the run's seed (eval_noise=True), or the noiseless softmax."""
  data = toy_data()
  model, inputs, params = build("lgmrec", data, toy_config())
  batch = toy_batch(data, 20)
  loss = jax.jit(lambda i: model.loss(params, i, batch)[0])
  a, b = (float(loss(model.epoch_inputs(inputs, jax.random.PRNGKey(3), 0))) for _ in range(2))
  assert a == b != float(loss(model.epoch_inputs(inputs, jax.random.PRNGKey(4), 1)))
  keep_all = get_model("lgmrec")(toy_config(lgmrec__keep_rate=1.0))
  assert float(keep_all.loss(params, inputs, batch)[0]) != float(model.loss(params, inputs, batch)[0])
  p = np64(params)
  noisy = model.representations(params, inputs)
  np.testing.assert_allclose(np.asarray(noisy[1]), lgmrec_np(data, p, model.hp, lgmrec_noise(inputs.eval_rng, data))[1],
                             atol=2e-5)
  np.testing.assert_array_equal(np.asarray(noisy[1]), np.asarray(model.representations(params, inputs)[1]))
  quiet = get_model("lgmrec")(toy_config(lgmrec__eval_noise=False)).representations(params, inputs)
  np.testing.assert_allclose(np.asarray(quiet[1]), lgmrec_np(data, p, model.hp, None)[1], atol=2e-5)


# ------------------------------------------------------------------------------------------ configs


def test_hyper_parameters_come_from_config_model_name():
  config = toy_config(freedom__dropout=0.9)
  assert get_model("freedom")(config).hp.dropout == 0.9
  assert set(BASELINES) <= set(models.default_configs())
  config.model.lightgcn["bogus"] = 1
  with pytest.raises(ValueError, match="config.model.lightgcn.bogus"):
    get_model("lightgcn")(config)


def test_every_model_follows_one_stateless_contract():
  """Every registered model is a Recommender named by its registry name; building the inputs leaves the model
  object as it was (the net comes from the inputs' sizes), and a model without per-epoch inputs hands back the same
  object, which the trainer then does not place on the devices again."""
  data = toy_data()
  for name in registered():
    cls = get_model(name)
    assert issubclass(cls, Recommender) and cls.name == name
    model = cls(toy_config())
    before = dict(vars(model))
    inputs = model.build_inputs(data)
    assert vars(model) == before, name
    assert (model.epoch_inputs(inputs, jax.random.PRNGKey(0), 0) is inputs) == (name not in ("bm3", "freedom",
                                                                                              "lgmrec"))
    assert model.inputs_after_init(inputs) is inputs or name == "alignrec"


def test_lfm2k_baseline_settings_are_points_of_their_grids():
  """configs/lfm2k.py sets grid-selected baseline hyper-parameters: each is a value of the model's
  hyper_grid() (MMRec's / the AlignRec authors' yaml), reaches the model, and the lr stays a grid value."""
  from configs import lfm2k
  config = lfm2k.get_config()
  defaults = models.default_configs()
  changed = 0
  for name in BASELINES:
    cls = get_model(name)
    grid = cls.hyper_grid()
    hp = cls(config).hp
    for key, value in config.model[name].items():
      if value != defaults[name][key]:
        changed += 1
        assert value in grid[f"model.{name}.{key}"], (name, key, value)
        assert hp[key] == value
  assert changed >= 2  # BPR-MF's and VBPR's reg_weight
  for name in ("vbpr", "bm3"):
    assert config.optim.lr in get_model(name).hyper_grid()["optim.lr"]


# ------------------------------------------------------------------------------------------ smoke run


@pytest.mark.parametrize("num_devices", [1, 0])  # 1: the single-device jit path; 0: a pmap over all 4 test devices
@pytest.mark.parametrize("name", registered())
def test_every_registered_model_trains_two_epochs(name, num_devices, tmp_path):
  """Two epochs, so that donated state, per-epoch inputs (FREEDOM, BM3) and buffers shared between the inputs and
  the parameters are exercised past the first step of the second epoch."""
  from alignrec_jax.train import stage2  # the trainer (stage 2)
  config = tiny_config(str(tmp_path / "data"))
  config.model.name = name
  config.model.knn_k = 5
  config.train.batch_size = 64
  config.train.epochs = 2
  config.train.num_devices = num_devices
  config.eval.topk = (5, 10)
  config.eval.valid_metric = "recall@10"
  if name == "alignrec":
    config.model.sim_target = "frozen"  # keeps the initial table in the inputs beside the trainable copy
  results = stage2.run(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "results.json") as f:
    written = json.load(f)
  assert written["epochs_run"] == 2 and written["best_epoch"] == results["best_epoch"] in (0, 1)
  for split in ("valid", "test"):
    assert 0.0 <= written[split]["recall@10"] <= 1.0 and np.isfinite(written[split]["ndcg@10"])
