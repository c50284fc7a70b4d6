"""New items in a trained run (Run.add_items) and the inductive cold-start protocol, end to end on the tiny
synthetic dataset of tests.train.test_stage2.py: a held-out item of an inductive run is scored exactly as the same
item added after training, and the cold split's metric recomputed from `recommend` equals results.json's."""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from alignrec_jax import export
from alignrec_jax import main as cli
from alignrec_jax.models import get_model
from alignrec_jax.train import bridge
from alignrec_jax.train import checks
from alignrec_jax.train import stage2
from alignrec_jax.train import state as state_lib
from tests.conftest import REPO_ROOT
from tests.train.test_stage2 import tiny_config
from tests.train.test_stage2 import write_dataset


def _cold_run(tmp_path, name, cold_start="neighbours", inductive=True, model="alignrec", epochs=3):
  root = tmp_path / "data"
  if not root.exists():
    write_dataset(root)
  config = tiny_config(root, epochs=epochs)
  config.model.name = model
  config.data.cold_items = 0.5  # 20 of the 40 items: 10 per cold split, so that recall@5 can miss
  config.data.cold_inductive = inductive
  config.model.cold_start = cold_start
  workdir = str(tmp_path / name)
  return config, workdir, cli.run(config, workdir)


def _recall(truth_by_user: dict, top: np.ndarray, users: np.ndarray, k: int) -> float:
  return float(np.mean([len(truth_by_user[u] & set(top[r, :k].tolist())) / len(truth_by_user[u])
                        for r, u in enumerate(users)]))


def test_a_held_out_item_of_an_inductive_run_scores_as_the_same_item_added_after_training(tmp_path):
  _, workdir, results = _cold_run(tmp_path, "inductive")
  run = export.load_run(workdir)
  cold = run.cold_items("test")
  assert len(cold) == 10
  n_before = run.n_items
  before = run.item_emb.copy()
  new = run.add_items(features=run.item_features(cold))
  np.testing.assert_array_equal(new, np.arange(n_before, n_before + 10))
  np.testing.assert_array_equal(run.item_emb[:n_before], before)  # existing items do not move
  np.testing.assert_allclose(run.user_emb @ run.item_emb[new].T, run.user_emb @ run.item_emb[cold].T, atol=1e-5)

  # test_cold's recall, recomputed from recommend over the new ids, equals the run's own evaluation
  pairs = run.data.test_cold
  new_id = dict(zip(cold.tolist(), new.tolist()))
  truth = {}
  for u, i in pairs:
    truth.setdefault(int(u), set()).add(new_id[int(i)])
  users = np.array(sorted(truth))
  top, _ = run.recommend(users, k=10, items=new)
  assert set(top.reshape(-1).tolist()) <= set(new.tolist())
  for k in (5, 10):
    assert _recall(truth, top, users, k) == pytest.approx(results["test_cold"][f"recall@{k}"], abs=1e-4)
  assert results["test_cold"]["recall@5"] < 1.0  # the metric can fail


def test_the_inductive_protocol_keeps_held_out_items_out_of_training_and_the_paper_rule_scores_them_untrained(
    tmp_path):
  config, workdir, own = _cold_run(tmp_path, "own", cold_start="own")
  _, _, neighbours = _cold_run(tmp_path, "neighbours")
  # model.cold_start changes what evaluation scores, never the training: the warm metrics are the same
  assert own["best_epoch"] == neighbours["best_epoch"]
  assert own["test"] == neighbours["test"]
  # the held-out items' parameters never moved from their initial values (no graph, loss or sampler saw them)
  data = bridge.load_dataset(config.data)
  model = get_model("alignrec")(config)
  inputs = model.build_inputs(data)
  init = model.init(jax.random.PRNGKey(config.seed), inputs)
  trained, _ = state_lib.restore_best_params(os.path.join(workdir, "checkpoints"), init,
                                             stage2.make_optimizer(config).init(init))
  cold = np.concatenate(list(data.cold_items.values()))
  for name in ("item_id_embedding", "features"):
    np.testing.assert_array_equal(np.asarray(trained["aggregator"][name])[cold],
                                  np.asarray(init["aggregator"][name])[cold])
  assert not np.array_equal(np.asarray(trained["aggregator"]["item_id_embedding"]),
                            np.asarray(init["aggregator"]["item_id_embedding"]))


def test_id_only_models_and_bad_feature_rows_are_one_line_errors(tmp_path):
  _, workdir, _ = _cold_run(tmp_path, "ok", inductive=False)
  run = export.load_run(workdir)
  width = run.item_features([0]).shape[1]
  with pytest.raises(export.RunError, match=r"shape \(2, 3\); this run's rows are 8 wide"):
    run.add_items(features=np.zeros((2, 3)))
  bad = np.ones((3, width))
  bad[2, 1] = np.nan
  with pytest.raises(export.RunError, match="row 2 of the image features holds NaN or Inf"):
    run.add_items(features=bad)
  with pytest.raises(export.RunError, match="did not come from stage 1"):
    run.add_items(items="new_items.tsv")
  assert run.n_items == 40  # nothing was added by the failed calls
  with pytest.raises(export.RunError, match="was not trained with cold-start items"):
    export.load_run(_cold_free_run(tmp_path)).cold_items("test")

  config, lightgcn, _ = _cold_run(tmp_path, "lightgcn", cold_start="own", model="lightgcn", epochs=1)
  with pytest.raises(export.RunError, match="'lightgcn' scores items by their ID embedding alone"):
    export.load_run(lightgcn).add_items(features=np.ones((1, width)))
  config.model.cold_start = "neighbours"
  with pytest.raises(checks.ConfigError, match="model.cold_start='neighbours' needs a content model"):
    checks.check_stage2(config)
  config.model.cold_start = "nearest"
  with pytest.raises(checks.ConfigError, match="config.model.cold_start='nearest' must be 'own'"):
    checks.check_stage2(config)
  config.model.cold_start, config.data.cold_items = "own", 0.0
  with pytest.raises(checks.ConfigError, match="data.cold_inductive=True needs cold-start items"):
    checks.check_stage2(config)


def _cold_free_run(tmp_path):
  config = tiny_config(tmp_path / "data", epochs=1)
  workdir = str(tmp_path / "plain")
  cli.run(config, workdir)
  return workdir


def test_every_content_model_scores_added_items_by_the_neighbour_rule(tmp_path):
  for model in ("vbpr", "freedom", "mgcn", "bm3"):
    _, workdir, results = _cold_run(tmp_path, model, model=model, epochs=1)
    run = export.load_run(workdir)
    cold = run.cold_items("valid")
    new = run.add_items(features=run.item_features(cold))
    np.testing.assert_allclose(run.item_emb[new], run.item_emb[cold], atol=1e-6, err_msg=model)
    assert "test_cold" in results


def _recommend_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "alignrec_jax.recommend", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_recommend_cli_adds_items_from_a_feature_file_without_touching_the_workdir(tmp_path):
  _, workdir, _ = _cold_run(tmp_path, "cli")
  run = export.load_run(workdir)
  path = str(tmp_path / "new.npy")
  # the features of the user's favourite cluster: the new items rank among its top items
  np.save(path, run.item_features(run.cold_items("test")))
  before = sorted(os.listdir(workdir))
  ok = _recommend_cli(f"--workdir={workdir}", f"--add_items={path}", "--user=3", "--k=50")
  assert ok.returncode == 0, ok.stderr
  lines = ok.stdout.strip().splitlines()
  assert lines[0] == f"added 10 new items from {path} as item ids 40..49"
  new = run.add_items(features=np.load(path))
  ids, _ = run.recommend(3, k=50)
  listed = [int(line.split()[1]) for line in lines[3:]]
  assert listed == [int(i) for i in ids if i >= 0] and set(new.tolist()) & set(listed)
  assert sorted(os.listdir(workdir)) == before
  saved = _recommend_cli(f"--workdir={workdir}", f"--add_items={path}", "--user=3", "--save")
  assert saved.returncode == 0, saved.stderr
  folder = os.path.join(workdir, "export_added_50")
  assert saved.stdout.splitlines()[1] == f"wrote {folder}"
  assert sorted(os.listdir(workdir)) == sorted(before + ["export_added_50"])  # export/ and the rest untouched
  np.testing.assert_allclose(np.load(os.path.join(folder, "item_emb.npy")), run.item_emb, atol=1e-6)
  np.testing.assert_array_equal(np.load(os.path.join(folder, "new_items_image.npy")), np.load(path))
  rows = np.loadtxt(os.path.join(folder, "topk.tsv"), delimiter="\t", skiprows=1, ndmin=2)
  np.testing.assert_array_equal(rows[rows[:, 0] == 3][:, 2].astype(int)[:len(listed)], listed)
  no_items = _recommend_cli(f"--workdir={workdir}", "--user=3", "--save")
  assert no_items.returncode == 1 and "give --add_items" in no_items.stderr
  np.save(path, np.ones((1, 3)))
  bad = _recommend_cli(f"--workdir={workdir}", f"--add_items={path}", "--user=3")
  assert bad.returncode == 1 and bad.stderr.strip() == ("error: add_items: the image features have shape (1, 3); "
                                                        "this run's rows are 8 wide ([n, 8], n >= 1)")
  with open(path, "w") as f:
    f.write("not numpy")
  bad = _recommend_cli(f"--workdir={workdir}", f"--add_items={path}", "--user=3")
  assert bad.returncode == 1 and bad.stderr.strip().startswith(f"error: --add_items={path}: not a readable .npy")


WORDS = ("red", "blue", "green", "round", "square", "small", "large", "bright")


def _write_items(root, n_items=40):
  """items.tsv for the tiny dataset: item i's colour and words follow its cluster (i % 4), as its interactions do."""
  os.makedirs(root / "images", exist_ok=True)
  rng = np.random.default_rng(1)
  rows = ["itemID\ttext\timage"]
  for i in range(n_items):
    c = i % 4
    colour = np.array([255 * (c % 2), 255 * (c // 2), 128], np.uint8)
    Image.fromarray(np.clip(colour + rng.integers(0, 40, (12, 12, 3)), 0, 255).astype(np.uint8)).save(
        root / "images" / f"{i}.png")
    rows.append(f"{i}\t{WORDS[c]} {WORDS[c + 4]} item {i}\timages/{i}.png")
  (root / "items.tsv").write_text("\n".join(rows) + "\n")
  return rows[1:]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
  """A --config.stage=all run on the tiny dataset: stage 1 on items.tsv, stage 2 on its table (not on feat.npy)."""
  tmp_path = tmp_path_factory.mktemp("two_stage")
  root = tmp_path / "data"
  write_dataset(root)
  rows = _write_items(root)
  config = tiny_config(root, epochs=2)
  config.stage = "all"
  pre = config.pretrain
  pre.size, pre.image_size, pre.patch_size, pre.max_text_len = "tiny", 8, 4, 8
  pre.batch_size, pre.steps, pre.warmup_steps, pre.vocab_size = 8, 4, 2, 40
  pre.extract_batch_size = 16  # 40 items: the last batch is padded, as a few new items are
  workdir = str(tmp_path / "run")
  cli.run(config, workdir)
  return config, workdir, rows


def test_a_stage1_run_scores_new_items_from_their_text_and_image_as_its_extraction_did(two_stage_run, tmp_path):
  config, workdir, rows = two_stage_run
  table = bridge.load_feature_table(workdir, 40)
  run = export.load_run(workdir)  # config.json says stage=all: stage 2 read the workdir's own table
  np.testing.assert_array_equal(run.item_features(np.arange(40)), table)
  picked = [5, 17, 38]
  path = tmp_path / "new_items.tsv"
  path.write_text("itemID\ttext\timage\n" + "".join(
      f"{n}\t{rows[i].split(chr(9))[1]}\t{config.data.root}/images/{i}.png\n" for n, i in enumerate(picked)))
  new = run.add_items(items=str(path))
  np.testing.assert_array_equal(new, [40, 41, 42])
  np.testing.assert_allclose(run.item_features(new), table[picked], atol=1e-5)  # = the extraction's rows
  reference = export.load_run(workdir)
  expected = reference.add_items(features=table[picked])
  np.testing.assert_allclose(run.item_emb[new], reference.item_emb[expected], atol=1e-5)
  assert run.item_text(41) == rows[17].split("\t")[1] and run.item_text(3) == rows[3].split("\t")[1]
  ids, _ = run.recommend(1, k=43, exclude_seen=False)
  assert set(new.tolist()) <= set(ids.tolist())
  cli_run = _recommend_cli(f"--workdir={workdir}", f"--add_items={path}", "--user=1", "--k=43", "--show_seen")
  assert cli_run.returncode == 0, cli_run.stderr
  assert cli_run.stdout.splitlines()[0] == f"added 3 new items from {path} as item ids 40..42"
  assert [int(line.split()[1]) for line in cli_run.stdout.splitlines()[3:]] == ids.tolist()

  # a row whose image does not decode, and a run whose features were not stage 1's, are one-line errors
  (tmp_path / "broken.png").write_bytes(b"not a png")
  path.write_text(f"itemID\ttext\timage\n0\tred item\t{config.data.root}/images/0.png\n1\tblue\tbroken.png\n")
  with pytest.raises(export.RunError, match=r"new_items.tsv, line 3: cannot decode image .*broken.png"):
    run.add_items(items=str(path))
  assert run.n_items == 43
  with pytest.raises(export.RunError, match="needs one of features"):
    run.add_items()


def test_the_export_stage_takes_only_export_settings_from_its_command(two_stage_run):
  config, workdir, _ = two_stage_run
  command = config.copy_and_resolve_references()
  command.stage, command.export.k = "export", 7  # the config file's data.features_from is '' for stage=all
  cli.run(command, workdir)
  manifest = export.load_run(workdir).config
  assert manifest.data.features_from == workdir and manifest.export.k == 7
  for key, value in (("model.knn_k", 2), ("data.root", "/elsewhere")):
    changed = command.copy_and_resolve_references()
    section, name = key.split(".")
    changed[section][name] = value
    with pytest.raises(export.RunError, match=rf"config.{key}={value!r}: the run in .* was trained with"):
      cli.run(changed, workdir)
