"""The export stage and `load_run`: files consistent with results.json, train items never exported, a resumed run
exports what an uninterrupted one does, the Python API and the recommend CLI (one-line errors).

Runs train on the tiny synthetic dataset of tests.train.test_stage2.py in tmp_path.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alignrec_jax import export
from alignrec_jax import main as cli
from alignrec_jax.data import mmrec
from alignrec_jax.eval import ranking
from alignrec_jax.models import registered
from tests.conftest import REPO_ROOT
from tests.conftest import shared_data_dir
from tests.train.test_stage2 import tiny_config
from tests.train.test_stage2 import write_dataset


def _train(tmp_path, name="run", epochs=3, model="alignrec", keep_checkpoints=1, **export_keys):
  root = tmp_path / "data"
  if not root.exists():
    write_dataset(root)
  config = tiny_config(root, epochs=epochs)
  config.model.name = model
  config.train.keep_checkpoints = keep_checkpoints
  workdir = str(tmp_path / name)
  results = cli.run(config, workdir)
  config.stage = "export"
  for key, value in export_keys.items():
    config.export[key] = value
  return config, workdir, results


def _read_topk(path):
  rows = np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)
  return rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2].astype(int), rows[:, 3]


def _train_sets(config):
  data = mmrec.load_dataset(config.data)
  return data, {(int(u), int(i)) for u, i in data.train}


def _train_past_the_best_epoch(tmp_path, **export_keys):
  """A run that early-stops: its latest checkpoint is 3 epochs after the best one."""
  write_dataset(tmp_path / "data")
  config = tiny_config(tmp_path / "data", epochs=40, stopping_step=2)
  config.optim.lr = 0.05
  workdir = str(tmp_path / "run")
  results = cli.run(config, workdir)
  assert results["stopped_early"] and results["epochs_run"] == results["best_epoch"] + 4
  config.stage = "export"
  for key, value in export_keys.items():
    config.export[key] = value
  return config, workdir, results


def test_export_writes_the_best_epochs_vectors_and_top_k_that_reproduce_the_test_metrics(tmp_path):
  config, workdir, results = _train_past_the_best_epoch(tmp_path, k=20, users="all")
  cli.run(config, workdir)
  out = os.path.join(workdir, "export")
  assert sorted(os.listdir(out)) == ["item_emb.npy", "manifest.json", "topk.tsv", "user_emb.npy"]
  manifest = json.loads(open(os.path.join(out, "manifest.json"), encoding="utf-8").read())
  user_emb, item_emb = np.load(os.path.join(out, "user_emb.npy")), np.load(os.path.join(out, "item_emb.npy"))
  assert user_emb.dtype == item_emb.dtype == np.float32
  assert user_emb.shape == (60, 8) and item_emb.shape == (40, 8)
  assert manifest["best_epoch"] == results["best_epoch"] and manifest["checkpoint_step"] == results["best_epoch"] + 1
  assert manifest["selected_on"] == {"split": "valid", "metric": "recall@20", "value": results["valid"]["recall@20"]}
  assert manifest["shapes"]["user_emb"] == [60, 8] and manifest["config"]["model"]["name"] == "alignrec"
  for name in export.FILES:
    assert manifest["sha256"][name] == hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
  data, train = _train_sets(config)
  # The exported vectors are those evaluation scored: every metric of results.json comes back from them.
  for split in ("valid", "test"):
    again = ranking.evaluate(user_emb, item_emb, ranking.make_eval_split(data, split), topk=(5, 10, 20))
    assert again == results[split]
  # recall@20 from the file alone equals results.json's, and no user is recommended a train item.
  test_split = ranking.make_eval_split(data, "test")
  assert round(export.recall_from_topk(os.path.join(out, "topk.tsv"), test_split, 20), 4) == \
      results["test"]["recall@20"]
  users, ranks, items, scores = _read_topk(os.path.join(out, "topk.tsv"))
  assert not {(u, i) for u, i in zip(users, items)} & train
  assert sorted(set(users)) == list(range(60)) and np.all(np.bincount(users) == 20)
  np.testing.assert_allclose(scores, np.sum(user_emb[users] * item_emb[items], 1), rtol=1e-5, atol=1e-6)
  for u in (0, 17):  # ranks 1..20, scores descending
    assert list(ranks[users == u]) == list(range(1, 21)) and np.all(np.diff(scores[users == u]) <= 0)


def test_a_user_with_fewer_unseen_items_than_k_gets_only_unseen_items(tmp_path):
  config, workdir, _ = _train(tmp_path, epochs=1, k=40, users="test")
  cli.run(config, workdir)
  data, train = _train_sets(config)
  users, _, items, _ = _read_topk(os.path.join(workdir, "export", "topk.tsv"))
  assert not {(u, i) for u, i in zip(users, items)} & train
  # 40 items, 7 train items per user: exactly the 33 others, each once
  for u in np.unique(users):
    assert sorted(items[users == u]) == sorted(set(range(40)) - {i for v, i in train if v == u})
  config.model.embedding_size = 16  # not the trained model: a clear error, the export in place untouched
  before = open(os.path.join(workdir, "export", "manifest.json"), encoding="utf-8").read()
  with pytest.raises(export.RunError, match=r"config.model.embedding_size=16: the run in .* was trained with 8"):
    cli.run(config, workdir)
  assert open(os.path.join(workdir, "export", "manifest.json"), encoding="utf-8").read() == before
  with pytest.raises(export.RunError,  # a config given to load_run is taken as it is: the checkpoint refuses it
                     match="another model or feature width.*export with the config the run was trained with"):
    export.best_vectors(config, workdir)


def test_export_of_a_resumed_run_equals_export_of_an_uninterrupted_one(tmp_path):
  # The default keep_checkpoints=1: the best step must survive the resume beside the latest one.
  config, resumed, _ = _train(tmp_path, "resumed", epochs=2)
  config, resumed, _ = _train(tmp_path, "resumed", epochs=4)
  cli.run(config, resumed)
  config, whole, _ = _train(tmp_path, "whole", epochs=4)
  cli.run(config, whole)
  a, b = (json.loads(open(os.path.join(w, "export", "manifest.json"), encoding="utf-8").read())
          for w in (resumed, whole))
  assert a["sha256"] == b["sha256"] and a["best_epoch"] == b["best_epoch"]


@pytest.mark.parametrize("model", [m for m in registered() if m != "alignrec"])
def test_every_baseline_exports_the_vectors_its_evaluation_scored(tmp_path, model):
  config, workdir, results = _train(tmp_path, epochs=2, model=model, k=20, users="test")
  cli.run(config, workdir)
  data, _ = _train_sets(config)
  test_split = ranking.make_eval_split(data, "test")
  out = os.path.join(workdir, "export")
  user_emb, item_emb = np.load(os.path.join(out, "user_emb.npy")), np.load(os.path.join(out, "item_emb.npy"))
  assert ranking.evaluate(user_emb, item_emb, test_split, topk=(5, 10, 20)) == results["test"]
  assert round(export.recall_from_topk(os.path.join(out, "topk.tsv"), test_split, 20), 4) == \
      results["test"]["recall@20"]


def test_load_run_recommends_as_the_export_ranks_and_finds_similar_items(tmp_path):
  config, workdir, _ = _train(tmp_path, epochs=2, k=10, users="all")
  with open(tmp_path / "data" / "items.tsv", "w", encoding="utf-8") as f:  # the default item table
    f.write("itemID\ttext\timage\n" + "".join(f"{i}\titem number {i}\tnone.png\n" for i in range(40)))
  from_checkpoint = export.load_run(workdir)  # no export/ yet: restored from the best checkpoint
  cli.run(config, workdir)
  run = export.load_run(workdir)
  np.testing.assert_array_equal(run.item_emb, from_checkpoint.item_emb)
  np.testing.assert_array_equal(run.user_emb, from_checkpoint.user_emb)

  users, _, items, scores = _read_topk(os.path.join(workdir, "export", "topk.tsv"))
  ids, got = run.recommend([3, 11], k=10)
  assert ids.shape == (2, 10)
  np.testing.assert_array_equal(ids[1], items[users == 11])
  np.testing.assert_allclose(got[0], scores[users == 3], rtol=1e-6)
  one, _ = run.recommend(3, k=4)
  np.testing.assert_array_equal(one, ids[0, :4])
  seen = set(run.train_items(3).tolist())
  assert len(seen) == 7 and not seen & set(ids[0].tolist())
  # exclude_seen=False ranks every item, train items included, by the plain dot product (float64 reference)
  everything, _ = run.recommend(3, k=40, exclude_seen=False)
  reference = np.argsort(-(run.user_emb[3].astype(np.float64) @ run.item_emb.T.astype(np.float64)), kind="stable")
  assert sorted(everything.tolist()) == list(range(40)) and everything[0] == reference[0]
  # fewer unseen items than k: the tail is -1 / -inf
  short, short_scores = run.recommend(3, k=40)
  assert np.all(short[33:] == -1) and np.all(np.isinf(short_scores[33:])) and not seen & set(short[:33].tolist())

  similar, cos = run.similar_items(5, k=5)
  unit = run.item_emb.astype(np.float64) / np.linalg.norm(run.item_emb.astype(np.float64), axis=1, keepdims=True)
  expected = unit @ unit[5]
  expected[5] = -np.inf
  assert 5 not in similar.tolist()
  np.testing.assert_array_equal(similar, np.argsort(-expected, kind="stable")[:5])
  np.testing.assert_allclose(cos, expected[similar], rtol=1e-5)
  assert run.item_text(7) == "item number 7"

  with pytest.raises(export.RunError, match=r"unknown user id 60: this run's user ids are 0\.\.59"):
    run.recommend([1, 60])
  with pytest.raises(export.RunError, match=r"unknown item id -1"):
    run.similar_items(-1)
  with pytest.raises(export.RunError, match="k=0 must be a positive integer"):
    run.recommend(1, k=0)


def test_a_workdir_without_a_finished_run_is_a_one_line_error(tmp_path):
  with pytest.raises(export.RunError, match="workdir not found"):
    export.load_run(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(export.RunError, match="holds no finished stage-2 run .*results.json is missing"):
    export.load_run(str(tmp_path / "empty"))
  config = tiny_config(write_dataset(tmp_path / "data"))
  config.stage = "export"
  with pytest.raises(export.RunError, match="holds no finished stage-2 run"):
    cli.run(config, str(tmp_path / "empty"))
  with pytest.raises(export.RunError, match="workdir not found"):
    cli.run(config, str(tmp_path / "nowhere"))
  assert os.listdir(tmp_path / "empty") == [] and not os.path.exists(tmp_path / "nowhere")  # nothing written


def _recommend_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "alignrec_jax.recommend", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_recommend_cli_prints_a_ranked_list_with_item_text_and_fails_in_one_line(tmp_path):
  config, workdir, _ = _train(tmp_path, epochs=1, k=10)
  with open(tmp_path / "data" / "names.tsv", "w", encoding="utf-8") as f:
    f.write("itemID\tname\n" + "".join(f"{i}\tartist {i}\n" for i in range(40)))
  config.export.item_table, config.export.item_text = "names.tsv", "name"
  cli.run(config, workdir)  # the export's config (in its manifest) names the item table
  ok = _recommend_cli(f"--workdir={workdir}", "--user=3", "--k=5")
  assert ok.returncode == 0, ok.stderr
  lines = ok.stdout.strip().splitlines()
  assert lines[0].startswith("Top 5 for user 3 (its 7 train items left out)") and len(lines) == 2 + 5
  ids, _ = export.load_run(workdir).recommend(3, k=5)
  for line, item in zip(lines[2:], ids):
    assert line.split()[1] == str(item) and line.endswith(f"artist {item}")
  bad = _recommend_cli(f"--workdir={workdir}", "--user=999")
  assert bad.returncode == 1 and bad.stderr.strip() == "error: unknown user id 999: this run's user ids are 0..59"
  missing = _recommend_cli(f"--workdir={tmp_path / 'nowhere'}", "--user=1")
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().startswith("error: workdir not found")
  stage = subprocess.run([sys.executable, "-m", "alignrec_jax.main", "--config=tests/train/tiny_config.py",
                          f"--workdir={tmp_path / 'nowhere'}", "--config.stage=export"], cwd=REPO_ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert stage.returncode == 1 and "Traceback" not in stage.stderr
  assert stage.stderr.strip().splitlines()[-1] == f"error: workdir not found: {tmp_path / 'nowhere'}"


def test_lfm2k_export_reproduces_test_recall_and_names_ten_artists(tmp_path):
  """The real data: one epoch of configs/lfm2k.py, exported; the CLI's list is ten artist names of item_map.tsv."""
  root = shared_data_dir("lfm2k")
  from configs import lfm2k
  config = lfm2k.get_config()
  config.data.root = root
  config.train.epochs = 1
  config.train.num_devices = 1
  workdir = str(tmp_path / "lfm2k")
  results = cli.run(config, workdir)
  config.stage = "export"
  cli.run(config, workdir)
  data = mmrec.load_dataset(config.data)
  topk = os.path.join(workdir, "export", "topk.tsv")
  assert round(export.recall_from_topk(topk, ranking.make_eval_split(data, "test"), 20), 4) == \
      results["test"]["recall@20"]
  shown = _recommend_cli(f"--workdir={workdir}", "--user=0", "--k=10")
  assert shown.returncode == 0, shown.stderr
  lines = shown.stdout.strip().splitlines()[2:]
  names = {}
  with open(os.path.join(root, "item_map.tsv"), encoding="utf-8") as f:
    next(f)
    for line in f:
      fields = line.rstrip("\n").split("\t")
      names[int(fields[0])] = fields[2]
  assert len(lines) == 10
  for line in lines:
    item = int(line.split()[1])
    assert names[item] and line.endswith(" ".join(names[item].split()))


def test_load_run_refuses_checkpoint_vectors_of_another_epoch_than_results_json_names(tmp_path):
  _, workdir, results = _train(tmp_path, epochs=2)
  path = os.path.join(workdir, "results.json")
  edited = dict(results, best_epoch=results["best_epoch"] + 5)  # results.json no longer names the best checkpoint
  with open(path, "w", encoding="utf-8") as f:
    json.dump(edited, f)
  with pytest.raises(export.RunError, match=rf"best epoch \({results['best_epoch']}\) is not results.json's "
                                            rf"\({results['best_epoch'] + 5}\)"):
    export.load_run(workdir)
