"""The embedded default dataset: deterministic, idempotent, MMRec-loadable, split 80/10/10, and with a signal that
separates random < popularity < the latent truth (so a trained model has room to beat popularity)."""

import hashlib
import os

import ml_collections
import numpy as np
import pytest

from alignrec_jax.data import content, mmrec, synthetic
from alignrec_jax.eval import ranking
from configs.base import get_base_config

SMALL = dict(n_users=60, n_items=48, n_topics=4, mean_interactions=8, image_size=16)


def _digest(root: str) -> dict:
  """{relative path: sha256} of every file under root."""
  out = {}
  for base, _, files in os.walk(root):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _config(root: str) -> ml_collections.ConfigDict:
  config = get_base_config().data  # every key the loader reads; the test's own values below
  config.update(dict(
      name="default", root=root, inter_file="", user_field="userID", item_field="itemID", split_field="x_label",
      image_feat="image_feat.npy", text_feat="", features_from="", features_variant="full", filter_cold_start=True,
      synthetic=True))
  return config


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
  return synthetic.ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "default"))


@pytest.fixture(scope="module")
def default_data(default_root):
  return mmrec.load_dataset(_config(default_root))


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(tmp_path):
  a = synthetic.ensure_synthetic_dataset(str(tmp_path / "a"), seed=3, **SMALL)
  b = synthetic.ensure_synthetic_dataset(str(tmp_path / "b"), seed=3, **SMALL)
  c = synthetic.ensure_synthetic_dataset(str(tmp_path / "c"), seed=4, **SMALL)
  digest_a = _digest(a)
  assert digest_a == _digest(b)
  assert {"default.inter", "items.tsv", "image_feat.npy", synthetic.MARKER, "images/00000.png",
          "latent/user_theta.npy"} <= set(digest_a)
  digest_c = _digest(c)
  for name in ("default.inter", "items.tsv", "image_feat.npy", "images/00000.png"):
    assert digest_a[name] != digest_c[name], name


def test_second_call_reuses_the_folder_and_changed_params_rebuild_it(tmp_path):
  root = str(tmp_path / "data")
  assert synthetic.ensure_synthetic_dataset(root, **SMALL) == root
  sentinel = os.path.join(root, "sentinel")
  open(sentinel, "w").close()
  assert synthetic.ensure_synthetic_dataset(root, **SMALL) == root
  assert os.path.exists(sentinel)  # not rebuilt: the marker matched
  synthetic.ensure_synthetic_dataset(root, **{**SMALL, "n_users": 70})
  assert not os.path.exists(sentinel)  # rebuilt for the new parameters
  users, _, _ = mmrec.read_inter(os.path.join(root, "default.inter"))
  assert users.max() + 1 == 70
  assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary build folders left behind


def test_refuses_to_replace_a_foreign_folder_and_rejects_unknown_sizes(tmp_path):
  (tmp_path / "mine.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not empty"):
    synthetic.ensure_synthetic_dataset(str(tmp_path), **SMALL)
  assert (tmp_path / "mine.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match="n_userz"):
    synthetic.ensure_synthetic_dataset(str(tmp_path / "x"), n_userz=5)


def test_default_sizes_and_the_80_10_10_split(default_data):
  data = default_data
  n_rows = len(data.train) + len(data.valid) + len(data.test)
  assert 600 <= data.n_users <= 1000 and 300 <= data.n_items <= 500
  assert 15_000 <= n_rows <= 25_000
  assert 0.77 <= len(data.train) / n_rows <= 0.83
  for held_out in (data.valid, data.test):
    assert 0.08 <= len(held_out) / n_rows <= 0.12
  for split in (data.train, data.valid, data.test):  # every user has rows in every split
    np.testing.assert_array_equal(np.unique(split[:, 0]), np.arange(data.n_users))
  assert data.item_popularity().min() >= 1  # no item is cold
  per_user = np.bincount(np.concatenate([data.train, data.valid, data.test])[:, 0])
  assert per_user.min() >= 5
  all_pairs = np.concatenate([data.train, data.valid, data.test])
  assert len(np.unique(all_pairs, axis=0)) == len(all_pairs)  # no repeated (user, item)
  assert data.features["image"].shape[0] == data.n_items and data.features["image"].dtype == np.float32


def test_item_table_and_images_load_with_the_content_reader(default_root, default_data):
  table = content.read_items(os.path.join(default_root, "items.tsv"))
  assert table.n_items == default_data.n_items
  image = content.load_image(table.image_paths[0], 32)
  assert image.shape == (32, 32, 3) and image.std() > 10
  assert all(5 <= len(t.split()) <= 14 for t in table.texts)


def test_random_is_beaten_by_popularity_which_is_beaten_by_the_latent_truth(default_root, default_data):
  data = default_data
  split = ranking.make_eval_split(data, "test")
  popularity = data.item_popularity().astype(np.float32)
  pop = ranking.evaluate(np.ones((data.n_users, 1), np.float32), popularity[:, None], split)["recall@20"]
  rng = np.random.default_rng(0)
  rand = ranking.evaluate(rng.standard_normal((data.n_users, 16)).astype(np.float32),
                          rng.standard_normal((data.n_items, 16)).astype(np.float32), split)["recall@20"]
  # Zero-shot on the cheap content feature: a user is the mean of their train items' features.
  feat = data.features["image"] / np.linalg.norm(data.features["image"], axis=1, keepdims=True)
  indptr, items = data.train_csr()
  users = np.add.reduceat(feat[items], indptr[:-1], axis=0) / np.diff(indptr)[:, None]
  content_zs = ranking.evaluate(users.astype(np.float32), feat, split)["recall@20"]
  # The generating model's own scores, the best any recommender can do on average.
  latent = {name: np.load(os.path.join(default_root, "latent", f"{name}.npy"))
            for name in ("popularity", "user_theta", "item_weights")}
  scores = (np.log(latent["popularity"])[None, :]
            + np.log(latent["user_theta"][split.users] @ latent["item_weights"].T + synthetic.AFFINITY_FLOOR))
  for row in range(len(split.users)):
    scores[row, split.mask_items[split.mask_indptr[row]:split.mask_indptr[row + 1]]] = -np.inf
  oracle = ranking.metrics_from_topk(np.argsort(-scores, axis=1, kind="stable")[:, :50], split)["recall@20"]
  print(f"test recall@20: random {rand}, popularity {pop}, content zero-shot {content_zs}, latent truth {oracle}")
  assert rand < 0.08
  assert pop > 2.5 * rand  # popularity is a real signal
  assert content_zs > 1.8 * rand  # the content features carry the topics
  assert oracle > pop + 0.08  # a model that learns the user-topic affinity can clearly beat popularity
