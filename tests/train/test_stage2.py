"""Stage-2 trainer: results, the lr schedule, 1 vs 4 devices, SIGKILL-and-resume, NaN and bad-input errors.

Every run uses a tiny synthetic dataset written as MMRec files into tmp_path, so the file is fast and needs no data.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alignrec_jax.data import mmrec
from alignrec_jax.train import loop
from alignrec_jax.train import stage2
from alignrec_jax.train import state as state_lib
from configs import base
from tests.train import tiny_config as tiny_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_dataset(root, n_users=60, n_items=40, d_f=8, seed=0):
  """Users prefer one of 4 item clusters; features carry the cluster. MMRec layout: tiny.inter + feat.npy."""
  rng = np.random.default_rng(seed)
  cluster = np.arange(n_items) % 4
  splits = {"train": [], "valid": [], "test": []}
  for u in range(n_users):
    liked = np.flatnonzero(cluster == u % 4)
    other = np.flatnonzero(cluster != u % 4)
    items = np.concatenate([rng.choice(liked, 7, replace=False), rng.choice(other, 2, replace=False)])
    rng.shuffle(items)
    splits["train"] += [(u, i) for i in items[:7]]
    splits["valid"].append((u, items[7]))
    splits["test"].append((u, items[8]))
  os.makedirs(root, exist_ok=True)
  mmrec.write_inter(os.path.join(root, "tiny.inter"), {k: np.asarray(v) for k, v in splits.items()})
  feats = np.eye(4)[cluster] * 2 + rng.normal(scale=0.5, size=(n_items, 4))
  np.save(os.path.join(root, "feat.npy"), np.concatenate([feats, rng.normal(size=(n_items, d_f - 4))], 1))
  return root


def tiny_config(root, **train):
  """tests/train/tiny_config.py on the data under `root`, one device unless `num_devices` says otherwise."""
  config = tiny_config_file.get_config()
  config.data.root = str(root)
  config.train.epochs = train.get("epochs", 4)
  config.train.stopping_step = train.get("stopping_step", 100)
  config.train.num_devices = train.get("num_devices", 1)
  return config


def test_lr_schedule_is_the_references_step_decay():
  optim = base.get_base_config().optim
  assert stage2.learning_rate(optim, 0) == pytest.approx(1e-3)
  assert stage2.learning_rate(optim, 50) == pytest.approx(1e-3 * 0.96)
  assert stage2.learning_rate(optim, 25) == pytest.approx(1e-3 * 0.96 ** 0.5)


def test_run_writes_results_and_resumes_to_the_same_end(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=3)
  results = stage2.run(config, str(tmp_path / "run"))
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert set(results) >= {"best_epoch", "valid", "test", "history"}
  assert len(results["history"]) == 3 and results["test"]["recall@20"] > 0
  best = max(h["valid_recall@20"] for h in results["history"])
  assert results["valid"]["recall@20"] == best
  assert results["history"][results["best_epoch"]]["valid_recall@20"] == best
  # Rerunning a finished run trains nothing and returns the same results.
  assert stage2.run(config, str(tmp_path / "run")) == results
  # Continuing the 3-epoch run to 5 epochs equals a 5-epoch run from scratch.
  more = stage2.run(tiny_config(root, epochs=5), str(tmp_path / "run"))
  fresh = stage2.run(tiny_config(root, epochs=5), str(tmp_path / "fresh"))
  assert [h["loss"] for h in more["history"]] == [h["loss"] for h in fresh["history"]]
  assert more["test"] == fresh["test"]


def test_early_stopping_counts_epochs_without_strict_improvement(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=40, stopping_step=2)
  config.optim.lr = 0.05
  results = stage2.run(config, str(tmp_path / "run"))
  values = [h["valid_recall@20"] for h in results["history"]]
  assert len(values) < 40, "expected an early stop"
  best_epoch = int(np.argmax(values))  # first index of the maximum = the strict-> best
  assert results["best_epoch"] == best_epoch
  assert len(values) == best_epoch + 2 + 2  # stops at the (stopping_step + 1)-th epoch without improvement


def test_one_and_four_devices_give_the_same_loss_curve(tmp_path):
  if jax.local_device_count() < 4:
    pytest.skip("needs 4 CPU devices (tests/conftest.py forces them with XLA_FLAGS)")
  root = write_dataset(tmp_path / "data", n_users=70)  # 70*7 = 490 rows: the last batch is padded
  one = stage2.run(tiny_config(root, epochs=3, num_devices=1), str(tmp_path / "one"))
  four = stage2.run(tiny_config(root, epochs=3, num_devices=4), str(tmp_path / "four"))
  np.testing.assert_allclose([h["loss"] for h in four["history"]], [h["loss"] for h in one["history"]], rtol=2e-4)
  for part in ("bpr", "cca", "sim", "reg", "ui_cosine"):
    np.testing.assert_allclose([h[part] for h in four["history"]], [h[part] for h in one["history"]], rtol=2e-3,
                               err_msg=part)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  root = write_dataset(tmp_path / "data")
  workdir = str(tmp_path / "run")
  stage2.run(tiny_config(root, epochs=2), workdir)
  config = tiny_config(root, epochs=4)
  # the lr explodes from epoch 2 on (a resume may not change optim.lr itself)
  schedule = stage2.learning_rate
  monkeypatch.setattr(stage2, "learning_rate", lambda optim, epoch: 1e30 if epoch >= 2 else schedule(optim, epoch))
  with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2.*last good checkpoint \(after epoch 1\)"):
    stage2.run(config, workdir)
  ckpt = state_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()


def test_a_diverging_finite_loss_stops_the_run_with_an_error(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=3)
  config.optim.lr = 1e6  # the loss stays finite (about 4e11 in the first epoch) but is no longer training
  with pytest.raises(stage2.DivergenceError, match=r"the run diverged: epoch 0's mean loss .* above "
                                                      r"config.train.divergence_factor=1000 x the first step's loss"):
    stage2.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "results.json").exists()
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was checkpointed: the workdir is left as found


class _Guarded(loop.Stage):
  divergence_factor, divergence_growth = 1e3, 2.0

  def position_name(self, round_, step):
    return f"epoch {round_}"


class _NoCheckpoints:
  def latest_step(self):
    return None


def _first_tripped(means, first_loss, stage=None):
  """The round at which the guard stops a run whose round means are `means`, or None."""
  meta = {"first_loss": first_loss}
  for round_, mean in enumerate(means):
    try:
      loop._check_divergence(stage or _Guarded(), meta, round_, mean, _NoCheckpoints())
    except stage2.DivergenceError as e:
      return round_, str(e)
  return None


def test_the_divergence_guard_stops_a_loss_that_keeps_growing_and_spares_one_that_falls():
  # lfm2k at optim.lr=5 (first step 0.979): 47 -> 97.15 is above 0.979 and 2 x 47
  tripped = _first_tripped([47.0, 97.15, 133.28, 150.93], first_loss=0.979)
  assert tripped[0] == 1
  assert ("epoch 1's mean loss 97.15 has grown above the first step's loss 0.979 and above "
          "config.train.divergence_growth=2 x the lowest epoch mean 47") in tripped[1]
  # a falling loss that rebounds to twice its lowest is still below the untrained model's loss: no alarm
  assert _first_tripped([0.60, 0.30, 0.20, 0.45, 0.90], first_loss=0.98) is None
  # above the first step's loss but not twice the lowest (a noisy plateau): no alarm; then twice: stopped
  assert _first_tripped([1.2, 1.5, 1.9, 2.3], first_loss=0.98) is None
  assert _first_tripped([1.2, 1.5, 1.9, 2.5], first_loss=0.98)[0] == 3
  off = _Guarded()
  off.divergence_growth = 0.0
  assert _first_tripped([47.0, 97.15, 133.28, 150.93], first_loss=0.979, stage=off) is None


def test_a_steadily_growing_loss_stops_the_run_and_a_rerun_stops_the_same_way(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=6)
  config.optim.lr = 10.0  # mean loss 53, 120, 114, 121, 181, ...: far from the factor of 1000, but growing
  for _ in range(2):  # the rerun resumes from epoch 0's checkpoint, which carries the lowest mean
    with pytest.raises(stage2.DivergenceError, match=r"the run diverged: epoch 1's mean loss .* has grown above the "
                                                        r"first step's loss .* and above config.train.divergence_"
                                                        r"growth=2 x the lowest epoch mean .* \(the last checkpoint, "
                                                        r"after epoch 0, stays\)"):
      stage2.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "results.json").exists()
  config.train.divergence_growth = 0.0
  results = stage2.run(config, str(tmp_path / "unguarded"))
  assert len(results["history"]) == 6


def test_corrupt_features_and_missing_checkpoints_are_clear_errors(tmp_path):
  root = write_dataset(tmp_path / "data")
  (tmp_path / "data" / "feat.npy").write_bytes(b"not an npy file")
  with pytest.raises(mmrec.DataError, match="feat.npy: not a readable .npy"):
    stage2.run(tiny_config(root), str(tmp_path / "run"))
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
    state_lib.restore_best_params(str(tmp_path / "nowhere"), {}, {})


def _main(workdir, root, epochs, log):
  config = os.path.join(REPO, "tests", "train", "tiny_config.py")
  cmd = [sys.executable, "-m", "alignrec_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.root={root}", f"--config.train.epochs={epochs}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  with open(log, "a", encoding="utf-8") as f:  # a file, not a pipe: a full pipe would block the logging child
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _tail(path):
  return path.read_text()[-3000:]


def test_sigkill_mid_run_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
  root = write_dataset(tmp_path / "data", n_users=240)  # 1680 rows: 27 steps per epoch
  epochs = 6
  killed = tmp_path / "killed"
  log = tmp_path / "log.txt"
  proc = _main(killed, root, epochs, log)
  deadline = time.time() + 240
  ckpt_dir = killed / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before it could be killed: {_tail(log)}"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "results.json").exists()
  rerun = _main(killed, root, epochs, log)
  assert rerun.wait(timeout=300) == 0, _tail(log)
  assert "resumed from" in log.read_text()
  whole = _main(tmp_path / "whole", root, epochs, tmp_path / "whole.txt")
  assert whole.wait(timeout=300) == 0, _tail(tmp_path / "whole.txt")
  a = json.loads((killed / "results.json").read_text())
  b = json.loads((tmp_path / "whole" / "results.json").read_text())
  assert a["best_epoch"] == b["best_epoch"] and a["valid"] == b["valid"] and a["test"] == b["test"]
  assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_popularity_groups_are_reported_and_add_up(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=1)
  config.eval.popularity_groups = (0.2,)
  results = stage2.run(config, str(tmp_path / "run"))
  groups = results["test"]["groups"]
  assert set(groups) == {"head", "tail"}
  # each group's value is its share of the overall metric (values are rounded to 4 decimals, as MMRec prints)
  assert groups["head"]["recall@20"] + groups["tail"]["recall@20"] == pytest.approx(
      results["test"]["recall@20"], abs=2e-4)


def test_cold_start_run_reports_cold_metrics_and_can_stop_on_them(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = tiny_config(root, epochs=3)
  config.data.cold_items = 0.25
  results = stage2.run(config, str(tmp_path / "warm_select"))
  assert results["select_on"] == "valid"
  for name in ("valid_cold", "test_cold"):
    assert 0.0 <= results[name]["recall@20"] <= 1.0
  assert all("valid_cold_recall@20" in h and "test_cold_recall@20" in h for h in results["history"])
  best = results["history"][results["best_epoch"]]
  assert results["test_cold"]["recall@20"] == best["test_cold_recall@20"]
  config.eval.select_on = "valid_cold"
  cold_select = stage2.run(config, str(tmp_path / "cold_select"))
  values = [h["valid_cold_recall@20"] for h in cold_select["history"]]
  assert cold_select["best_epoch"] == values.index(max(values))
