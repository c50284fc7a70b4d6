"""A workdir belongs to one run: the lock, the config-checked resume, the best checkpoint across restarts and the
verified restore that falls back to the newest intact step.

Tiny synthetic data (tests.train.test_stage2.py's) and one device: each run takes seconds.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alignrec_jax.train import stage2
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib
from tests.train.test_stage2 import REPO, tiny_config, write_dataset

_HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); from alignrec_jax.train import workdir; "
         "ctx = workdir.locked({path!r}); ctx.__enter__(); print('locked', flush=True); time.sleep(120)")


def _hold_lock_in_a_child(path):
  child = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=REPO, path=str(path))], stdout=subprocess.PIPE,
                           text=True)
  assert child.stdout.readline().strip() == "locked"
  return child


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
  child = _hold_lock_in_a_child(tmp_path)
  try:
    t0 = time.time()
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {child.pid} on host {socket.gethostname()}"):
      stage2.run(tiny_config(tmp_path / "no_data_needed"), str(tmp_path))
    assert time.time() - t0 < 5  # at once, before any data loads
  finally:
    child.kill()
    child.wait()


def test_stage1_takes_the_lock_too(tmp_path):
  """Two stage-1 runs on one workdir would build its item-content dataset at once (tfds FileExistsError)."""
  from alignrec_jax.train import pretrain
  from tests.train import tiny_pretrain_config
  child = _hold_lock_in_a_child(tmp_path)
  try:
    for stage in (pretrain.pretrain, pretrain.extract):
      with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {child.pid}"):
        stage(tiny_pretrain_config.get_config(), str(tmp_path))
    assert not (tmp_path / "tfds").exists()
  finally:
    child.kill()
    child.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning_and_released_on_exit(tmp_path, caplog):
  child = _hold_lock_in_a_child(tmp_path)
  child.kill()  # SIGKILL: the lock file stays, its flock goes with the process
  child.wait()
  assert (tmp_path / workdir_lib.LOCK_NAME).exists()
  with workdir_lib.locked(str(tmp_path)):
    holder = json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
  assert f"taking over the lock of pid {child.pid}" in caplog.text
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_a_resume_with_other_settings_is_refused_before_the_data_loads(tmp_path):
  root = write_dataset(tmp_path / "data")
  workdir = str(tmp_path / "run")
  stage2.run(tiny_config(root, epochs=1), workdir)
  changed = tiny_config(tmp_path / "gone", epochs=3)  # the data is not read: the refusal comes first
  changed.data.root = str(root)
  changed.optim.lr = 5e-3
  changed.seed = 1
  os.rename(root, tmp_path / "gone")
  with pytest.raises(workdir_lib.WorkdirError, match=r"other settings \(optim.lr: 0.01 -> 0.005; seed: 999 -> 1\)"):
    stage2.run(changed, workdir)
  os.rename(tmp_path / "gone", root)
  more = stage2.run(tiny_config(root, epochs=2), workdir)  # train.epochs may change
  assert len(more["history"]) == 2


def _best_params(workdir, config):
  from alignrec_jax.data import mmrec
  from alignrec_jax.models import get_model
  import jax
  import optax
  model = get_model(config.model.name)(config)
  params = model.init(jax.random.PRNGKey(config.seed), model.build_inputs(mmrec.load_dataset(config.data)))
  return state_lib.restore_best_params(os.path.join(workdir, "checkpoints"), params,
                                       optax.inject_hyperparams(optax.adam)(learning_rate=0.1).init(params))


def test_a_flipped_digit_in_a_checkpoints_meta_is_caught_and_the_step_set_aside(tmp_path, caplog):
  root = write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  config = tiny_config(root, epochs=2)
  config.train.keep_checkpoints = 2
  trained = stage2.run(config, str(workdir))
  path = workdir / "checkpoints" / "2" / "meta" / "metadata"
  text = path.read_text()
  value = f"{trained['test']['recall@20']}"
  assert value in text
  digit = value[-1]
  path.write_text(text.replace(value, value[:-1] + ("1" if digit != "1" else "2")))  # one digit of a reported figure
  config.train.epochs = 3
  resumed = stage2.run(config, str(workdir))
  assert "its meta (best epoch, metrics, history) differs from its saved checksum" in caplog.text
  assert os.listdir(workdir / "damaged_checkpoints")
  fresh = tiny_config(root, epochs=3)
  fresh.train.keep_checkpoints = 2
  whole = stage2.run(fresh, str(tmp_path / "whole"))
  assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]


def test_the_best_checkpoint_survives_two_restarts(tmp_path):
  root = write_dataset(tmp_path / "data")
  config = lambda epochs: tiny_config(root, epochs=epochs, stopping_step=100)
  whole = stage2.run(_lr(config(4)), str(tmp_path / "whole"))
  assert whole["best_epoch"] < 2  # the setting's point: the best epoch is older than the last kept one
  resumed = str(tmp_path / "resumed")
  for epochs in (2, 3, 4):  # two restarts
    result = stage2.run(_lr(config(epochs)), resumed)
  assert result["best_epoch"] == whole["best_epoch"] and result["test"] == whole["test"]
  a, meta_a = _best_params(str(tmp_path / "whole"), _lr(config(4)))
  b, meta_b = _best_params(resumed, _lr(config(4)))
  assert meta_a["epoch"] == meta_b["epoch"] == whole["best_epoch"]
  for x, y in zip(*(sorted(((k, v) for k, v in state_lib.checksums(t).items())) for t in (a, b))):
    assert x == y


def _lr(config):
  config.optim.lr = 0.05  # valid Recall@20 peaks at the first epoch on this data
  return config


def _largest_data_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage, caplog):
  root = write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  config = tiny_config(root, epochs=2)
  config.train.keep_checkpoints = 2
  stage2.run(config, str(workdir))
  path = _largest_data_file(str(workdir / "checkpoints" / "2"))
  if damage == "flip_byte":
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
  else:
    os.remove(path)
  config.train.epochs = 3
  resumed = stage2.run(config, str(workdir))
  assert "checkpoint 2 in" in caplog.text and "falling back to the previous checkpoint" in caplog.text
  assert "Event loop is closed" not in caplog.text
  assert os.listdir(workdir / "damaged_checkpoints") and len(resumed["history"]) == 3
  fresh = tiny_config(root, epochs=3)
  fresh.train.keep_checkpoints = 2
  whole = stage2.run(fresh, str(tmp_path / "whole"))
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]


def test_a_damaged_only_checkpoint_says_to_retrain_and_a_damaged_best_one_cannot_be_exported(tmp_path):
  from alignrec_jax import export  # pylint: disable=g-import-not-at-top
  root = write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  config = tiny_config(root, epochs=1)
  stage2.run(config, str(workdir))
  path = _largest_data_file(str(workdir / "checkpoints" / "1"))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(state_lib.CheckpointError, match=r"is damaged: .*; retrain in a fresh --workdir") as error:
    stage2.run(tiny_config(root, epochs=2), str(workdir))
  assert "another model or config" not in str(error.value)
  with pytest.raises(export.RunError, match=r"is damaged: .*cannot be exported as it is: retrain") as error:
    export.best_vectors(config, str(workdir))
  assert "the config the run was trained with" not in str(error.value)
  # a checkpoint of another width is a config matter, and says so
  write_dataset(tmp_path / "data", d_f=12)
  other = tmp_path / "other"
  stage2.run(tiny_config(root, epochs=1), str(other))
  write_dataset(tmp_path / "data")
  with pytest.raises(export.RunError, match=r"another model or feature width.*the config the run was trained with"):
    export.best_vectors(config, str(other))


def test_checksums_catch_a_changed_value():
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  saved = state_lib.checksums(tree)
  state_lib.verify(tree, saved, "here")
  tree["w"][1, 2] = np.nextafter(tree["w"][1, 2], np.float32(10))
  with pytest.raises(state_lib.CheckpointError, match=r"here is damaged: 1 of 1 arrays differ"):
    state_lib.verify(tree, saved, "here")


def test_only_keys_that_can_change_the_checkpoint_are_compared(tmp_path):
  config = tiny_config(tmp_path)
  directory = str(tmp_path / "checkpoints")
  workdir_lib.check_or_record(config, directory, stage=2)
  os.makedirs(os.path.join(directory, "1"))  # a finished step: from now on a rerun is a resume
  same = tiny_config(tmp_path)
  same.train.epochs, same.stage, same.train.keep_checkpoints = 50, "all", 3
  same.pretrain.lr, same.probe.mask_ratio, same.model.freedom.dropout = 0.5, 0.9, 0.1  # never read by this run
  workdir_lib.check_or_record(same, directory, stage=2)
  for section, name, value in (("model", "embedding_size", 16), ("eval", "topk", (5, 10))):
    other = tiny_config(tmp_path)
    other[section][name] = value
    with pytest.raises(workdir_lib.WorkdirError, match=f"{section}.{name}"):
      workdir_lib.check_or_record(other, directory, stage=2)


def test_a_checkpoint_of_another_feature_width_is_refused_and_left_in_place(tmp_path):
  root = write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  stage2.run(tiny_config(root, epochs=1), str(workdir))
  write_dataset(tmp_path / "data", d_f=12)  # same config, the feature file now 12 wide
  with pytest.raises(state_lib.CheckpointError, match=r"can be restored \(none was moved\)"):
    stage2.run(tiny_config(root, epochs=2), str(workdir))
  assert (workdir / "checkpoints" / "1").is_dir() and not (workdir / "damaged_checkpoints").exists()


def test_a_checkpoint_write_that_fails_for_space_is_one_line_and_leaves_no_temporary_step(tmp_path, monkeypatch):
  ckpt = state_lib.Checkpointer(str(tmp_path / "ckpt"))
  real_save = ckpt.manager.save

  def save_until_full(step, *args, **kwargs):
    real_save(step, *args, **kwargs)
    ckpt.manager.wait_until_finished()
    os.makedirs(tmp_path / "ckpt" / f"{step}.orbax-checkpoint-tmp-1")  # what a write cut short leaves
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database: No space left on device')

  monkeypatch.setattr(ckpt.manager, "save", save_until_full)
  with pytest.raises(state_lib.CheckpointError, match=r"checkpoint 3 in .* could not be written \(the disk is full: "
                                                      r"free space or use another --workdir; ValueError: RESOURCE"):
    ckpt.save(3, {"w": np.ones(3, np.float32)}, {"epoch": 3})
  assert not [n for n in os.listdir(tmp_path / "ckpt") if "tmp" in n]
  ckpt.close()


def _fail_inside_a_claim(workdir, write):
  config = tiny_config("unused")
  with pytest.raises(RuntimeError, match="the stage failed"):
    with workdir_lib.claimed(config, str(workdir), [(config, str(workdir / "checkpoints"), 2)]):
      assert json.loads((workdir / "config.json").read_text())["seed"] == config.seed
      write(workdir)
      raise RuntimeError("the stage failed")


def _a_run_that_built_its_inputs(workdir):
  (workdir / "tokenizer.spm").write_bytes(b"pieces")
  (workdir / "tfds" / "item_content").mkdir(parents=True)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_workdir_as_it_found_it(tmp_path):
  fresh = tmp_path / "fresh"
  _fail_inside_a_claim(fresh, _a_run_that_built_its_inputs)
  assert not fresh.exists()  # the run made the folder: it goes too
  used = tmp_path / "used"
  used.mkdir()
  (used / "notes.txt").write_text("mine")
  (used / "config.json").write_text('{"seed": -1}')
  _fail_inside_a_claim(used, _a_run_that_built_its_inputs)
  assert sorted(p.name for p in used.iterdir()) == ["config.json", "notes.txt"]
  assert (used / "config.json").read_text() == '{"seed": -1}'  # the previous command's record, not the failed one


@pytest.mark.parametrize("checkpoint", ["checkpoints/3", "checkpoints/preempted/40"])
def test_a_run_that_fails_after_writing_a_checkpoint_keeps_everything(tmp_path, checkpoint):
  def write(workdir):
    _a_run_that_built_its_inputs(workdir)
    (workdir / checkpoint).mkdir(parents=True)
  _fail_inside_a_claim(tmp_path / "run", write)
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json", "tfds",
                                                                   "tokenizer.spm"]
