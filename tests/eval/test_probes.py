"""Intermediate evaluations: zero-shot and item-CF against brute-force numpy, long-tail groups that add up,
the saved masked-item set, and probe runs end to end (including mask-modality through the stage-2 trainer)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from alignrec_jax.data import mmrec
from alignrec_jax.eval import probes, ranking
from alignrec_jax.train import bridge
from alignrec_jax.train import probe as probe_stage
from tests.train import tiny_config

EV = ml_collections.ConfigDict(dict(topk=(5, 10, 20), metrics=("recall", "ndcg", "precision", "map"),
                                    batch_users=7, valid_metric="recall@20", popularity_groups=()))


def _random_data(seed=0, n_users=30, n_items=50, per_user=8, d=6):
  rng = np.random.default_rng(seed)
  pairs = {"train": [], "valid": [], "test": []}
  for u in range(n_users):
    items = rng.choice(n_items, per_user, replace=False)
    pairs["train"] += [(u, i) for i in items[:-3]]
    pairs["valid"].append((u, items[-3]))
    pairs["test"] += [(u, items[-2]), (u, items[-1])]
  arrays = {k: np.asarray(v, np.int32) for k, v in pairs.items()}
  data = mmrec.RecData("toy", n_users, n_items, arrays["train"], arrays["valid"], arrays["test"])
  return data, rng.standard_normal((n_items, d)).astype(np.float32)


def _brute_metrics(scores: np.ndarray, data: mmrec.RecData, split_name: str, ks) -> dict:
  """MMRec metrics from a dense [n_users, n_items] score matrix, one user at a time (ties: lower item id first)."""
  train = {}
  for u, i in data.train:
    train.setdefault(u, set()).add(i)
  truth = {}
  for u, i in data.split(split_name):
    truth.setdefault(u, set()).add(i)
  sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "precision", "map") for k in ks}
  for u, held in truth.items():
    s = scores[u].astype(np.float64).copy()
    s[list(train.get(u, ()))] = -np.inf
    ranked = np.argsort(-s, kind="stable")
    hits = np.array([i in held for i in ranked[:max(ks)]], float)
    for k in ks:
      h = hits[:k]
      sums[f"recall@{k}"] += h.sum() / len(held)
      sums[f"precision@{k}"] += h.sum() / k
      dcg = sum(h[r] / np.log2(r + 2) for r in range(k))
      idcg = sum(1 / np.log2(r + 2) for r in range(min(len(held), k)))
      sums[f"ndcg@{k}"] += dcg / idcg
      ap = sum(h[:r + 1].sum() / (r + 1) * h[r] for r in range(k))
      sums[f"map@{k}"] += ap / min(len(held), k)
  return {key: value / len(truth) for key, value in sums.items()}


def _assert_metrics_close(got: dict, want: dict):
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=6e-5), key  # probes round to 4 digits, as MMRec prints


def test_zero_shot_matches_brute_force_cosine_to_the_mean_train_feature():
  data, feats = _random_data()
  splits = {s: ranking.make_eval_split(data, s) for s in ("valid", "test")}
  got = probes.probe_features(feats, data, splits, ("zero_shot",), EV)["zero_shot"]
  scores = np.zeros((data.n_users, data.n_items))
  for u in range(data.n_users):
    mean = feats[data.train[data.train[:, 0] == u, 1]].astype(np.float64).mean(axis=0)
    scores[u] = feats @ mean / (np.linalg.norm(feats, axis=1) * np.linalg.norm(mean))
  for split in ("valid", "test"):
    _assert_metrics_close(got[split], _brute_metrics(scores, data, split, EV.topk))


@pytest.mark.parametrize("block_rows", [None, 7])
def test_item_cf_matches_brute_force_itemknncbf(block_rows):
  data, feats = _random_data(seed=1)
  f = feats.astype(np.float64)
  norms = np.linalg.norm(f, axis=1)
  sim = (f @ f.T) / (norms[:, None] * norms[None, :] + 10.0)
  s_k = np.zeros_like(sim)
  for i in range(len(sim)):
    top = np.argsort(-sim[i], kind="stable")[:10]
    s_k[i, top] = sim[i, top]
  r = np.zeros((data.n_users, data.n_items))
  r[data.train[:, 0], data.train[:, 1]] = 1.0
  scores = r @ s_k
  knn_val, knn_idx = probes.item_knn(feats, k=10, shrink=10.0, block_rows=block_rows)
  np.testing.assert_allclose(knn_val, np.take_along_axis(s_k, knn_idx, axis=1), atol=1e-6)
  np.testing.assert_array_equal(np.sort(knn_idx, axis=1), np.sort(np.argsort(-sim, axis=1)[:, :10], axis=1))
  splits = {s: ranking.make_eval_split(data, s) for s in ("valid", "test")}
  got = probes.probe_features(feats, data, splits, ("item_cf",), EV, 10, 10.0)["item_cf"]
  for split in ("valid", "test"):
    _assert_metrics_close(got[split], _brute_metrics(scores, data, split, EV.topk))
  # The ranked ids themselves, including the exact zero-score ties (broken by item id).
  ids = probes.item_cf_topk((knn_val, knn_idx), splits["test"], k=20, batch_users=7)
  for row, u in enumerate(splits["test"].users):
    s = scores[u].copy()
    s[data.train[data.train[:, 0] == u, 1]] = -np.inf
    want = np.argsort(-s, kind="stable")[:20]
    close = np.isclose(s[ids[row]], s[want], atol=1e-6)  # float32 vs float64 sums may swap near-equal scores
    assert close.all(), (u, ids[row], want)


def test_popularity_groups_add_up_to_the_overall_metrics():
  data, feats = _random_data(seed=2)
  splits = {"test": ranking.make_eval_split(data, "test")}
  groups = ranking.popularity_groups(data, (0.2, 0.6))
  got = probes.probe_features(feats, data, splits, ("zero_shot", "item_cf"), EV, item_groups=groups)
  for cls in ("zero_shot", "item_cf"):
    test = got[cls]["test"]
    assert set(test["groups"]) == {"q1", "q2", "q3"}
    for key in ("recall@20", "ndcg@10", "precision@5", "map@20"):
      total = sum(g[key] for g in test["groups"].values())
      assert total == pytest.approx(test[key], abs=2e-4), (cls, key)  # each value rounded to 4 digits
    assert test["groups"]["q3"]["recall@20"] < test["recall@20"]


def test_masked_item_set_is_seeded_saved_and_reused(tmp_path):
  path = str(tmp_path / "mask_items.npy")
  first = probes.masked_item_set(40, 0.5, seed=3, path=path)
  assert len(first) == 20 and os.path.isfile(path)
  np.testing.assert_array_equal(probes.masked_item_set(40, 0.5, seed=99, path=path), first)  # the saved set wins
  other = str(tmp_path / "other.npy")
  np.testing.assert_array_equal(probes.masked_item_set(40, 0.5, seed=7, path=other, reuse=path), first)
  np.testing.assert_array_equal(np.load(other), np.load(path))
  with pytest.raises(mmrec.DataError, match="permutation of the 30 item ids"):
    probes.masked_item_set(30, 0.5, seed=0, path=str(tmp_path / "x.npy"), reuse=path)
  with pytest.raises(ValueError, match="mask_ratio"):
    probes.masked_item_set(40, 1.0, seed=0, path=str(tmp_path / "y.npy"))


def test_masked_tables_zero_npy_rows_and_take_stage1_variant_rows(tmp_path):
  rng = np.random.default_rng(0)
  full, img, txt = (rng.standard_normal((10, 4)).astype(np.float32) for _ in range(3))
  masked = np.array([1, 4, 7])
  zeroed = probes.masked_tables({"full": full}, masked)
  assert list(zeroed) == ["zeroed"]
  np.testing.assert_array_equal(zeroed["zeroed"][masked], 0.0)
  keep = np.setdiff1d(np.arange(10), masked)
  np.testing.assert_array_equal(zeroed["zeroed"][keep], full[keep])
  # A stage-1 workdir brings its mask_image/mask_text extractions.
  bridge.save_feature_table(str(tmp_path), {"full": full, "mask_image": img, "mask_text": txt})
  tables = probe_stage.load_feature_spec(str(tmp_path), 10, "", seed=0)
  variants = probes.masked_tables(tables, masked)
  assert sorted(variants) == ["mask_image", "mask_text"]
  np.testing.assert_array_equal(variants["mask_image"][masked], img[masked])
  np.testing.assert_array_equal(variants["mask_text"][masked], txt[masked])
  np.testing.assert_array_equal(variants["mask_text"][keep], full[keep])


def test_feature_specs_names_and_errors(tmp_path):
  assert probe_stage.parse_feature_spec("a/b/whisper.npy") == ("whisper", "a/b/whisper.npy")
  assert probe_stage.parse_feature_spec("random:64") == ("random64", "random:64")
  assert probe_stage.parse_feature_spec("mmenc=/tmp/run1/") == ("mmenc", "/tmp/run1/")
  random = probe_stage.load_feature_spec("random:5", 12, "", seed=1)["full"]
  assert random.shape == (12, 5) and random.dtype == np.float32
  np.testing.assert_array_equal(random, probe_stage.load_feature_spec("random:5", 12, "", seed=1)["full"])
  np.save(tmp_path / "f64.npy", np.ones((12, 3)))  # float64 is accepted and cast
  assert probe_stage.load_feature_spec("f64.npy", 12, str(tmp_path), seed=0)["full"].dtype == np.float32
  with pytest.raises(ValueError, match="random:<width>"):
    probe_stage.load_feature_spec("random:x", 12, "", seed=0)
  with pytest.raises(mmrec.DataError, match="feature file not found"):
    probe_stage.load_feature_spec("missing.npy", 12, str(tmp_path), seed=0)


def _tiny_probe_config(root, **probe):
  """tests/train/tiny_config.py probing the toy data under `root` (one epoch where stage 2 trains)."""
  config = tiny_config.get_config()
  config.stage, config.data.name, config.data.root, config.data.image_feat = "probe", "toy", str(root), ""
  config.train.epochs, config.train.num_devices, config.train.stopping_step = 1, 1, 30
  config.optim.lr, config.eval.batch_users = 1e-3, 16
  config.probe.update(probe)
  return config


def _write_toy(tmp_path, seed=3):
  data, feats = _random_data(seed=seed)
  root = tmp_path / "data"
  root.mkdir()
  mmrec.write_inter(str(root / "toy.inter"), {"train": data.train, "valid": data.valid, "test": data.test})
  np.save(root / "feat.npy", feats)
  return root, feats


def test_run_writes_results_for_every_feature_and_class(tmp_path):
  root, feats = _write_toy(tmp_path)
  stage1 = str(tmp_path / "stage1")
  bridge.save_feature_table(stage1, {"full": feats[:, ::-1].copy()})
  config = _tiny_probe_config(root, features=("feat.npy", "rnd=random:6", f"s1={stage1}"))
  config.eval.popularity_groups = (0.2,)
  results = probe_stage.run(config, str(tmp_path / "probe"))
  on_disk = json.loads((tmp_path / "probe" / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert set(results["probe"]) == {"feat", "rnd", "s1"}
  assert results["features"]["rnd"] == {"source": "random:6", "dim": 6}
  for name in ("feat", "rnd", "s1"):
    classes = results["probe"][name]
    assert set(classes) == {"zero_shot", "item_cf"}
    for cls in classes.values():
      assert set(cls["test"]["groups"]) == {"head", "tail"} and "recall@20" in cls["valid"]
  # The stage-1 table is the .npy's columns reversed: cosine and the shrunk cosine do not see the order.
  assert results["probe"]["s1"] == results["probe"]["feat"]
  assert results["probe_reference"]["popularity"]["test"]["recall@20"] >= 0
  with pytest.raises(ValueError, match="duplicate feature names"):
    probe_stage.run(_tiny_probe_config(root, features=("feat.npy", "feat.npy")), str(tmp_path / "dup"))
  with pytest.raises(ValueError, match="probe.classes"):
    probe_stage.run(_tiny_probe_config(root, features=("feat.npy",), classes=("zero_shot", "bogus")),
               str(tmp_path / "bad"))


def test_mask_modality_trains_stage2_on_the_unmasked_and_each_masked_table(tmp_path):
  root, feats = _write_toy(tmp_path)
  rng = np.random.default_rng(5)
  image_masked, text_masked = (rng.standard_normal(feats.shape).astype(np.float32) for _ in range(2))
  stage1 = str(tmp_path / "stage1")
  bridge.save_feature_table(stage1, {"full": feats, "mask_image": image_masked, "mask_text": text_masked})
  config = _tiny_probe_config(root, features=(f"s1={stage1}",), classes=("mask_modality",))
  results = probe_stage.run(config, str(tmp_path / "probe"))
  runs = results["probe"]["s1"]["mask_modality"]
  assert set(runs) == {"unmasked", "mask_image", "mask_text"}
  for run in runs.values():
    assert run["best_epoch"] == 0 and "recall@20" in run["test"]
    assert os.path.isfile(os.path.join(run["workdir"], "results.json"))
  masked = np.sort(np.load(tmp_path / "probe" / "mask_items.npy")[:25])  # 50% of 50 items
  keep = np.setdiff1d(np.arange(50), masked)
  table = np.load(tmp_path / "probe" / "features" / "s1.mask_image.npy")
  np.testing.assert_array_equal(table[masked], image_masked[masked])
  np.testing.assert_array_equal(table[keep], feats[keep])
  np.testing.assert_array_equal(np.load(tmp_path / "probe" / "features" / "s1.unmasked.npy"), feats)
