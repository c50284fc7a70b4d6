"""The MMRec-format loader: good files load as MMRec loads them; every bad input names the file and line/field."""

import os

import numpy as np
import pytest

from alignrec_jax.data import mmrec
from alignrec_jax.data.mmrec import DataError
from configs.base import get_base_config
from tests.conftest import shared_data_dir

GOOD = "userID\titemID\trating\tx_label\n" + "".join(
    f"{u}\t{i}\t1\t{s}\n" for u, i, s in
    [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 0), (1, 3, 0), (1, 0, 1), (1, 2, 2), (2, 2, 1), (2, 3, 2)])


def _config(root, **overrides):
  config = get_base_config().data  # every key the loader reads; the test's own values below
  config.update(dict(
      name="toy", root=str(root), inter_file="", user_field="userID", item_field="itemID", split_field="x_label",
      image_feat="", text_feat="", features_from="", features_variant="full", filter_cold_start=True,
      synthetic=False))
  config.update(overrides)
  return config


def _write(root, inter=GOOD, feats=None):
  (root / "toy.inter").write_text(inter)
  for name, array in (feats or {}).items():
    np.save(root / name, array)
  return root


def test_loads_splits_and_drops_cold_start_users(tmp_path):
  data = mmrec.load_dataset(_config(_write(tmp_path)))
  assert (data.n_users, data.n_items) == (3, 4)
  np.testing.assert_array_equal(data.train, [[0, 0], [0, 1], [1, 1], [1, 3]])
  # user 2 has no train rows: its valid/test rows are dropped, as MMRec does
  np.testing.assert_array_equal(data.valid, [[0, 2], [1, 0]])
  np.testing.assert_array_equal(data.test, [[0, 3], [1, 2]])
  indptr, items = data.train_csr()
  np.testing.assert_array_equal(indptr, [0, 2, 4, 4])
  np.testing.assert_array_equal(items, [0, 1, 1, 3])
  keep = mmrec.load_dataset(_config(tmp_path, filter_cold_start=False))
  assert len(keep.valid) == 3 and len(keep.test) == 3


def test_loads_features_as_float32(tmp_path):
  feats = {"img.npy": np.arange(12, dtype=np.float64).reshape(4, 3), "txt.npy": np.ones((4, 2), np.float32)}
  data = mmrec.load_dataset(_config(_write(tmp_path, feats=feats), image_feat="img.npy", text_feat="txt.npy"))
  assert data.features["image"].dtype == np.float32 and data.features["image"].shape == (4, 3)
  assert data.features["text"].shape == (4, 2)
  assert "image 3-d" in data.summary()


@pytest.mark.parametrize("inter, message", [
    ("userID\titemID\trating\n0\t0\t1\n", r"toy.inter, line 1: missing column\(s\) \['x_label'\]"),
    ("userID\titemID\tx_label\titemID\n0\t0\t0\t0\n", r"line 1: duplicate column 'itemID'"),
    (GOOD + "1\t2\t0\t0\t7\n", r"toy.inter, line 12: expected 4 tab-separated fields .* got 5"),
    (GOOD.replace("1\t3\t1\t0", "1\t3"), r"toy.inter, line 7: expected 4 tab-separated fields"),
    (GOOD.replace("0\t1\t1\t0", "0\tB00X\t1\t0"), r"toy.inter, line 3: field 'itemID' must be an integer, got 'B00X'"),
    (GOOD.replace("0\t1\t1\t0", "0\t1.5\t1\t0"), r"line 3: field 'itemID' must be an integer, got '1.5'"),
    (GOOD.replace("1\t1\t1\t0", "-1\t1\t1\t0"), r"toy.inter, line 6: field 'userID' must be a non-negative id, got -1"),
    (GOOD.replace("0\t3\t1\t2", "0\t3\t1\t7"), r"line 5: field 'x_label' must be 0 \(train\), 1 \(valid\) or 2"),
    (GOOD + "userID\titemID\trating\tx_label\n", r"toy.inter, line 12: the header is repeated"),
    ("", r"toy.inter, line 1: empty file or missing header"),
    ("userID\titemID\tx_label\n", r"toy.inter: no interactions after the header"),
])
def test_malformed_inter_files(tmp_path, inter, message):
  with pytest.raises(DataError, match=message):
    mmrec.load_dataset(_config(_write(tmp_path, inter)))


def test_empty_splits(tmp_path):
  only_train = "userID\titemID\tx_label\n0\t0\t0\n0\t1\t2\n"
  with pytest.raises(DataError, match=r"toy.inter: the valid split \(x_label == 1\) is empty"):
    mmrec.load_dataset(_config(_write(tmp_path, only_train)))
  no_train = "userID\titemID\tx_label\n0\t0\t1\n0\t1\t2\n"
  with pytest.raises(DataError, match=r"the train split \(x_label == 0\) is empty"):
    mmrec.load_dataset(_config(_write(tmp_path, no_train)))
  cold = "userID\titemID\tx_label\n0\t0\t0\n1\t1\t1\n0\t1\t2\n"
  with pytest.raises(DataError, match="valid split .* is empty after dropping users without train"):
    mmrec.load_dataset(_config(_write(tmp_path, cold)))


def test_missing_files_say_where_data_comes_from(tmp_path):
  with pytest.raises(DataError, match=r"interaction file not found: .*toy.inter\. MMRec-format data .*data.root"):
    mmrec.load_dataset(_config(tmp_path))
  with pytest.raises(DataError, match=r"feature file not found: .*nope.npy"):
    mmrec.load_dataset(_config(_write(tmp_path), image_feat="nope.npy"))


@pytest.mark.parametrize("array, message", [
    (np.ones((3, 5), np.float32), r"img.npy: has 3 rows but the interactions use itemID up to 3 .*beyond the feature"),
    (np.ones((6, 5), np.float32), r"img.npy: has 6 rows but the dataset has 4 items"),
    (np.ones((4,), np.float32), r"img.npy: expected a 2-D \[n_items, dim\] matrix, got shape \(4,\)"),
    (np.array([["a"] * 2] * 4), r"img.npy: expected a numeric matrix, got dtype <U1"),
])
def test_bad_feature_shapes(tmp_path, array, message):
  with pytest.raises(DataError, match=message):
    mmrec.load_dataset(_config(_write(tmp_path, feats={"img.npy": array}), image_feat="img.npy"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(tmp_path, bad):
  array = np.ones((4, 3), np.float32)
  array[2, 1] = bad
  with pytest.raises(DataError, match=r"img.npy: row 2 \(itemID 2\), column 1 is (nan|inf); 1 row\(s\) hold NaN/Inf"):
    mmrec.load_dataset(_config(_write(tmp_path, feats={"img.npy": array}), image_feat="img.npy"))


def test_corrupt_npy(tmp_path):
  _write(tmp_path)
  (tmp_path / "img.npy").write_bytes(b"not a numpy file")
  with pytest.raises(DataError, match=r"img.npy: not a readable .npy array"):
    mmrec.load_dataset(_config(tmp_path, image_feat="img.npy"))


def test_custom_column_names_and_file(tmp_path):
  (tmp_path / "x.tsv").write_text("u\ti\tsplit\n0\t0\t0\n0\t1\t1\n0\t2\t2\n")
  data = mmrec.load_dataset(_config(tmp_path, inter_file="x.tsv", user_field="u", item_field="i",
                                    split_field="split"))
  assert data.n_items == 3 and len(data.train) == 1


def test_write_inter_round_trip(tmp_path):
  splits = {"train": np.array([[0, 1], [1, 0]]), "valid": np.array([[0, 2]]), "test": np.array([[1, 2]])}
  mmrec.write_inter(str(tmp_path / "toy.inter"), splits)
  data = mmrec.load_dataset(_config(tmp_path))
  np.testing.assert_array_equal(data.train, splits["train"])
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("name, stats", [
    ("lfm2k", (1858, 1425, 44327)),
    ("baby", (19445, 7050, 119674)),
    ("ml100k_posters", (943, 1279, 77395)),
])
def test_real_data_sets_load(name, stats):
  root = shared_data_dir(name)
  data = mmrec.load_dataset(_config(root, name=name))
  assert (data.n_users, data.n_items, len(data.train)) == stats


def _rows(rows):
  return "userID\titemID\trating\tx_label\n" + "".join(f"{u}\t{i}\t1\t{s}\n" for u, i, s in rows)


_BASE_ROWS = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 0), (1, 3, 0), (1, 0, 1), (1, 2, 2)]


def test_repeated_rows_are_an_error_naming_both_lines(tmp_path):
  _write(tmp_path, _rows(_BASE_ROWS + [(1, 3, 0)]))  # line 10 repeats line 7
  with pytest.raises(DataError, match=r"toy.inter, line 10: train row user 1, item 3 repeats line 7 \(1 repeated"):
    mmrec.load_dataset(_config(tmp_path))


def test_a_pair_in_train_and_test_is_an_error(tmp_path):
  _write(tmp_path, _rows(_BASE_ROWS + [(0, 1, 2)]))  # (0, 1) is a train pair on line 3
  with pytest.raises(DataError, match=r"line 10: user 0, item 1 is in test and in train \(line 3\); 1 pairs"):
    mmrec.load_dataset(_config(tmp_path))


def test_drop_duplicates_keeps_the_earliest_split_and_counts(tmp_path, caplog):
  _write(tmp_path, _rows(_BASE_ROWS + [(1, 3, 0), (0, 1, 2), (0, 1, 1), (1, 0, 1)]))
  data = mmrec.load_dataset(_config(tmp_path, drop_duplicates=True))
  (tmp_path / "clean").mkdir()
  clean = mmrec.load_dataset(_config(_write(tmp_path / "clean", _rows(_BASE_ROWS))))
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(data.split(split), clean.split(split))
  assert "dropped 2 repeated rows and 2 pairs already in an earlier split" in caplog.text


def test_a_huge_id_is_refused_before_allocating(tmp_path):
  _write(tmp_path, _rows(_BASE_ROWS + [(2_000_000_000, 0, 0)]))
  with pytest.raises(DataError, match=r"line 10: userID 2000000000 is far beyond the 3 distinct userID values"):
    mmrec.load_dataset(_config(tmp_path))


def test_id_gaps_and_cold_start_drops_are_counted(tmp_path, caplog):
  _write(tmp_path, _rows(_BASE_ROWS + [(5, 2, 1), (5, 3, 2)]))  # user 5: no train rows; users 2-4 never occur
  data = mmrec.load_dataset(_config(tmp_path))
  assert data.n_users == 6
  assert "3 of the userID values 0..5 never occur" in caplog.text
  assert "dropped 1 valid rows of 1 users without train rows" in caplog.text
  assert "dropped 1 test rows of 1 users without train rows" in caplog.text
