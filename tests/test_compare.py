"""compare.py: grid expansion, overrides, the mean ± std table, and a two-model, two-seed run on tiny data."""

import copy
import json
import math
import os

import numpy as np
import pytest

from alignrec_jax import compare
from alignrec_jax.data import mmrec
from configs import base


def write_tiny_mmrec(root, n_users=40, n_items=30, seed=0):
  """A small MMRec dataset: every user 6-10 items (the last two held out), every item with features."""
  rng = np.random.default_rng(seed)
  splits = {"train": [], "valid": [], "test": []}
  for u in range(n_users):
    items = rng.choice(n_items - 1, size=rng.integers(6, 11), replace=False)  # the last item stays cold
    splits["train"] += [(u, i) for i in items[:-2]]
    splits["valid"].append((u, items[-2]))
    splits["test"].append((u, items[-1]))
  splits["test"].append((0, n_items - 1))  # the largest itemID occurs: features have exactly n_items rows
  os.makedirs(root, exist_ok=True)
  mmrec.write_inter(os.path.join(root, "tiny.inter"), {k: np.asarray(v) for k, v in splits.items()})
  np.save(os.path.join(root, "image_feat.npy"), rng.normal(size=(n_items, 10)).astype(np.float32))
  np.save(os.path.join(root, "text_feat.npy"), rng.normal(size=(n_items, 6)).astype(np.float32))


def tiny_config(root: str):
  """The base config on the tiny dataset, written into `root` (write_tiny_mmrec), with 8-wide embeddings."""
  write_tiny_mmrec(root)
  config = base.get_base_config()
  config.data.name = "tiny"
  config.data.root = root
  config.data.image_feat = "image_feat.npy"
  config.data.text_feat = "text_feat.npy"
  config.model.embedding_size = 8
  return config


def test_grid_combinations_and_overrides():
  combos = compare.grid_combinations({"optim.lr": [0.1, 0.2], "model.bm3.dropout": [0.3, 0.5, 0.7]})
  assert len(combos) == 6 and combos[1] == {"optim.lr": 0.1, "model.bm3.dropout": 0.5}
  assert compare.grid_combinations({}) == [{}]
  config = base.get_base_config()
  config.lock()
  run = compare.apply_overrides(config, "bm3", 7, {"model.bm3.dropout": 0.3, "model.bm3.n_layers": 2,
                                                   "optim.lr": 1})
  assert (run.model.name, run.seed, run.model.bm3.dropout, run.model.bm3.n_layers) == ("bm3", 7, 0.3, 2)
  assert run.optim.lr == 1.0 and isinstance(run.optim.lr, float)
  assert config.model.name == "alignrec" and config.model.bm3.n_layers == 1  # the original is untouched
  with pytest.raises(ValueError, match="no key 'nope'"):
    compare.apply_overrides(config, "bm3", 7, {"model.bm3.nope": 1})


def test_every_grid_key_exists_in_the_config():
  config = base.get_base_config()
  for name in ("alignrec", "bprmf", "lightgcn", "vbpr", "bm3", "freedom", "mgcn", "layergcn", "lgmrec"):
    grid = compare.hyper_grid(name)
    assert grid, name
    compare.apply_overrides(config, name, 0, compare.grid_combinations(grid)[-1])


def test_mean_std_is_the_sample_std():
  s = compare.mean_std([0.2, 0.4, 0.6])
  assert math.isclose(s["mean"], 0.4) and math.isclose(s["std"], 0.2)
  assert compare.mean_std([0.3])["std"] == 0.0


def test_compare_two_models_two_seeds(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  config.train.batch_size = 64
  config.train.epochs = 2
  config.eval.topk = (10, 20)
  config.seed = 5
  out = str(tmp_path / "cmp")
  result = compare.compare(config, ["bprmf", "lightgcn"], 2, out)
  for name in ("bprmf", "lightgcn"):
    for seed in (5, 6):
      assert os.path.exists(os.path.join(out, name, f"seed{seed}", "results.json"))
    entry = result["models"][name]
    values = [entry["runs"][s]["test"]["recall@20"] for s in ("5", "6")]
    assert math.isclose(entry["test"]["recall@20"]["mean"], np.mean(values))
  with open(os.path.join(out, "comparison.json")) as f:
    assert json.load(f)["models"].keys() == {"bprmf", "lightgcn"}
  with open(os.path.join(out, "comparison.md")) as f:
    table = f.read()
  assert "| lightgcn | 2 |" in table and "±" in table
  # The report renders the compare workdir's table (mean ± std over the seeds).
  from alignrec_jax import report  # pylint: disable=g-import-not-at-top
  text = open(report.build_report([out], str(tmp_path / "report")), encoding="utf-8").read()
  assert "## Model comparison: `cmp` (tiny)" in text and "| lightgcn | 2 |" in text and " ± " in text
  # A second call reuses the runs; the same directory with other settings is refused.
  again = compare.compare(config, ["bprmf"], 1, out)
  assert again["models"]["bprmf"]["runs"]["5"] == result["models"]["bprmf"]["runs"]["5"]
  with pytest.raises(ValueError, match="different run"):
    compare.train_once(config, "bprmf", 5, {"model.bprmf.reg_weight": 1.0}, os.path.join(out, "bprmf", "seed5"))
  # Another model's own settings do not touch this model's runs.
  other = copy.deepcopy(config)
  other.model.lightgcn.reg_weight = 0.5
  reused = compare.compare(other, ["bprmf"], 1, out)["models"]["bprmf"]["runs"]["5"]
  assert reused == result["models"]["bprmf"]["runs"]["5"]
  other.export.k = 7  # nor do the export stage's settings
  assert compare.compare(other, ["bprmf"], 1, out)["models"]["bprmf"]["runs"]["5"] == reused
  # An identity recorded with the whole nested config (as older versions wrote it) is read the same way.
  id_path = os.path.join(out, "bprmf", "seed5", "compare_run.json")
  with open(id_path) as f:
    nested = json.load(f)
  nested["config"] = json.loads(compare.apply_overrides(config, "bprmf", 5, nested["overrides"]).to_json())
  with open(id_path, "w") as f:
    json.dump(nested, f)
  assert compare.compare(config, ["bprmf"], 1, out)["models"]["bprmf"]["runs"]["5"] == reused
  # A config changed since (same model, seed and overrides) is a different run too, and the error names the key.
  changed = copy.deepcopy(config)
  changed.model.bprmf.reg_weight = 0.5
  with pytest.raises(ValueError, match=r"different run \(1 settings differ: config\.model\.bprmf\.reg_weight"):
    compare.compare(changed, ["bprmf"], 1, out)
  # A directory recorded by an older version (no config in its identity) is still matched on the rest.
  with open(id_path) as f:
    legacy = {k: v for k, v in json.load(f).items() if k != "config"}
  with open(id_path, "w") as f:
    json.dump(legacy, f)
  legacy_run = compare.compare(changed, ["bprmf"], 1, out)["models"]["bprmf"]["runs"]["5"]
  assert legacy_run == result["models"]["bprmf"]["runs"]["5"]
  with pytest.raises(ValueError, match="different run"):
    compare.train_once(config, "bprmf", 5, {"model.bprmf.reg_weight": 1.0}, os.path.join(out, "bprmf", "seed5"))


def test_grid_keys_restrict_the_grid_and_unknown_keys_fail(tmp_path):
  config = base.get_base_config()
  with pytest.raises(ValueError, match="not in the grid of 'vbpr'"):
    compare.select_on_grid(config, "vbpr", 0, str(tmp_path), "recall@20", ("model.vbpr.nope",))


def _split(r20, ndcg20):
  return {"recall@10": r20 / 2, "recall@20": r20, "ndcg@10": ndcg20 / 2, "ndcg@20": ndcg20}


def _cold_runs():
  """Two seeds' results.json with cold-start splits: cold test recall@20 0.10 / 0.14, ndcg@20 0.04 / 0.06."""
  return {5: {"best_epoch": 3, "valid": _split(0.30, 0.20), "test": _split(0.28, 0.18),
              "valid_cold": _split(0.11, 0.05), "test_cold": _split(0.10, 0.04)},
          6: {"best_epoch": 4, "valid": _split(0.32, 0.22), "test": _split(0.30, 0.20),
              "valid_cold": _split(0.13, 0.07), "test_cold": _split(0.14, 0.06)}}


def test_summarise_covers_the_cold_splits_every_seed_has():
  stats = compare.summarise(_cold_runs())
  assert set(stats) == {"valid", "test", "valid_cold", "test_cold"}
  # mean 0.12, sample std sqrt((0.02² + 0.02²) / 1) = 0.02·√2
  assert math.isclose(stats["test_cold"]["recall@20"]["mean"], 0.12)
  assert math.isclose(stats["test_cold"]["recall@20"]["std"], 0.02 * math.sqrt(2))
  assert math.isclose(stats["test_cold"]["ndcg@20"]["mean"], 0.05)
  assert math.isclose(stats["valid_cold"]["ndcg@20"]["std"], 0.01 * math.sqrt(2))  # 0.05 / 0.07
  # A seed without the cold splits: only the warm ones are summarised.
  mixed = _cold_runs()
  del mixed[6]["test_cold"], mixed[6]["valid_cold"]
  assert set(compare.summarise(mixed)) == {"valid", "test"}


def test_markdown_table_gains_cold_columns_only_when_a_model_has_them():
  cold = compare.summarise(_cold_runs())
  warm = {k: cold[k] for k in ("valid", "test")}
  models = {"alignrec": {"seeds": [5, 6], **cold}, "lightgcn": {"seeds": [5, 6], **warm}}
  table = compare.markdown_table({"models": models})
  lines = table.splitlines()
  assert lines[0] == ("| model | seeds | test recall@10 | test recall@20 | test ndcg@10 | test ndcg@20 "
                      "| valid recall@20 | cold test recall@20 | cold test ndcg@20 |")
  assert lines[1] == "|" + "---|" * 9
  assert lines[2] == ("| alignrec | 2 | 0.1450 ± 0.0071 | 0.2900 ± 0.0141 | 0.0950 ± 0.0071 | 0.1900 ± 0.0141 "
                      "| 0.3100 | 0.1200 ± 0.0283 | 0.0500 ± 0.0141 |")
  assert lines[3].endswith("| 0.3100 | n/a | n/a |")
  # Without cold metrics anywhere: today's table, byte for byte.
  assert compare.markdown_table({"models": {"lightgcn": {"seeds": [5, 6], **warm}}}) == (
      "| model | seeds | test recall@10 | test recall@20 | test ndcg@10 | test ndcg@20 | valid recall@20 |\n"
      "|---|---|---|---|---|---|---|\n"
      "| lightgcn | 2 | 0.1450 ± 0.0071 | 0.2900 ± 0.0141 | 0.0950 ± 0.0071 | 0.1900 ± 0.0141 | 0.3100 |\n")


def test_compare_keeps_cold_metrics_in_the_json_and_the_markdown(tmp_path, monkeypatch):
  runs = _cold_runs()
  monkeypatch.setattr(compare, "train_once", lambda config, name, seed, overrides, workdir: copy.deepcopy(runs[seed]))
  config = base.get_base_config()
  config.seed = 5
  out = str(tmp_path / "cmp")
  result = compare.compare(config, ["alignrec"], 2, out)
  entry = result["models"]["alignrec"]
  assert entry["runs"]["6"]["test_cold"] == runs[6]["test_cold"]
  assert entry["runs"]["5"]["valid_cold"]["recall@20"] == 0.11
  assert math.isclose(entry["test_cold"]["recall@20"]["mean"], 0.12)
  with open(os.path.join(out, "comparison.json")) as f:
    assert json.load(f)["models"]["alignrec"]["test_cold"]["ndcg@20"]["values"] == [0.04, 0.06]
  with open(os.path.join(out, "comparison.md")) as f:
    text = f.read()
  assert "cold test recall@20 | cold test ndcg@20 |" in text and "| 0.1200 ± 0.0283 | 0.0500 ± 0.0141 |" in text
  # The same runs without cold splits: no cold key, no cold column, no cold note.
  for r in runs.values():
    del r["valid_cold"], r["test_cold"]
  warm = compare.compare(config, ["alignrec"], 2, str(tmp_path / "warm"))["models"]["alignrec"]
  assert not [k for k in warm if "cold" in k] and not [k for r in warm["runs"].values() for k in r if "cold" in k]
  assert "cold" not in (tmp_path / "warm" / "comparison.md").read_text()
