"""SIGTERM/SIGINT during training: the step finishes, the unfinished round is checkpointed, the run raises
Preempted, and the resumed run ends exactly as an uninterrupted one (both stages)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alignrec_jax.data import sampler as sampler_lib
from alignrec_jax.train import preemption
from alignrec_jax.train import pretrain as pretrain_lib
from alignrec_jax.train import stage2
from alignrec_jax.train import state as state_lib
from tests.train import test_pretrain
from tests.train.test_stage2 import tiny_config
from tests.train.test_stage2 import write_dataset


def _signal_during(monkeypatch, owner, name, signum, when):
  """Wraps owner.name (a batch source) so that the process sends itself `signum` just before the call or item
  `when` picks."""
  real = getattr(owner, name)
  calls = {"n": 0}

  def wrapped(*args, **kwargs):
    calls["n"] += 1
    result = real(*args, **kwargs)
    if not hasattr(result, "__next__"):
      if when(calls["n"], None):
        os.kill(os.getpid(), signum)
      return result

    def items(epoch):
      for i, item in enumerate(result):
        if when(epoch, i):
          os.kill(os.getpid(), signum)
        yield item
    return items(calls["n"])

  monkeypatch.setattr(owner, name, wrapped)


def _history_without_times(results):
  return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in results["history"]]


def test_sigterm_mid_epoch_checkpoints_the_epoch_so_far_and_the_resume_ends_like_an_uninterrupted_run(
    tmp_path, monkeypatch):
  root = write_dataset(tmp_path / "data")  # 420 rows: 7 steps per epoch
  config = tiny_config(root, epochs=4)
  workdir = tmp_path / "run"
  # the second epoch (epoch 1): the signal comes while step 3 is fetched, so steps 0-3 run and the run stops
  _signal_during(monkeypatch, sampler_lib.BPRSampler, "epoch", signal.SIGTERM, lambda epoch, i: (epoch, i) == (2, 3))
  with pytest.raises(preemption.Preempted, match=r"SIGTERM received: stopped after epoch 1, step 3 with a "
                                                 r"checkpoint \(step 11 in .*checkpoints/preempted\)"):
    stage2.run(config, str(workdir))
  assert not (workdir / "results.json").exists()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]  # epoch 0
  assert [p.name for p in (workdir / "checkpoints" / "preempted").iterdir() if p.name.isdigit()] == ["11"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone
  monkeypatch.undo()

  resumed = stage2.run(config, str(workdir))
  assert not (workdir / "checkpoints" / "preempted").exists()  # epoch 1's own checkpoint supersedes it
  whole = stage2.run(config, str(tmp_path / "whole"))
  assert _history_without_times(resumed) == _history_without_times(whole)
  assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]


def test_sigint_mid_pretraining_round_resumes_to_the_same_encoder(tmp_path, monkeypatch):
  test_pretrain._items(tmp_path)
  config = test_pretrain._config(tmp_path)  # 6 steps, a checkpoint every 2
  workdir = str(tmp_path / "run")
  # before step index 2 is fetched: step 2 (the first of the round up to step 4) runs, then the run stops
  _signal_during(monkeypatch, pretrain_lib, "batch_indices", signal.SIGINT, lambda n, _: n == 3)
  with pytest.raises(preemption.Preempted, match=r"SIGINT received: stopped after step 3 with a checkpoint"):
    pretrain_lib.pretrain(config, workdir)
  monkeypatch.undo()
  with state_lib.Checkpointer(os.path.join(workdir, "pretrain", "preempted"), create=False) as ckpt:
    assert ckpt.all_steps() == [3]
  pretrain_lib.pretrain(config, workdir)
  pretrain_lib.pretrain(config, str(tmp_path / "whole"))
  _, resumed, step = test_pretrain._params(config, workdir)
  _, whole, _ = test_pretrain._params(config, str(tmp_path / "whole"))
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)
  history = [json.loads((tmp_path / d / "pretrain_history.json").read_text()) for d in ("run", "whole")]
  drop = lambda rows: [{k: v for k, v in r.items() if k != "items_per_s"} for r in rows]
  assert drop(history[0]) == drop(history[1])


def test_a_second_signal_while_the_first_is_pending_stops_at_once():
  with preemption.listening() as listener:
    os.kill(os.getpid(), signal.SIGINT)
    assert listener.requested(1) == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _command(workdir, root, epochs, log):
  from tests.train.test_stage2 import REPO
  config = os.path.join(REPO, "tests", "train", "tiny_config.py")
  cmd = [sys.executable, "-m", "alignrec_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.root={root}", f"--config.train.epochs={epochs}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  # files, not pipes: a full pipe would block the logging child
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(f"{log}.out", "a", encoding="utf-8"),
                          stderr=open(f"{log}.err", "a", encoding="utf-8"))


def test_sigterm_to_the_command_exits_75_with_one_line_and_the_same_command_resumes_to_the_same_end(tmp_path):
  root = write_dataset(tmp_path / "data", n_users=240)  # 1680 rows: 27 steps per epoch
  epochs, stopped, log = 6, tmp_path / "stopped", tmp_path / "log"
  proc = _command(stopped, root, epochs, log)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (stopped / "checkpoints" / "2").is_dir():
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before the signal: {open(f'{log}.err').read()[-3000:]}"
  os.kill(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=120) == preemption.EXIT_CODE
  lines = [line for line in open(f"{log}.err").read().splitlines() if line.startswith("preempted:")]
  assert len(lines) == 1 and "SIGTERM received: stopped" in lines[0] and "rerun the same command" in lines[0]
  assert "Traceback" not in open(f"{log}.err").read()
  assert not (stopped / "results.json").exists() and not (stopped / ".lock").exists()
  rerun = _command(stopped, root, epochs, log)
  assert rerun.wait(timeout=300) == 0, open(f"{log}.err").read()[-3000:]
  whole = _command(tmp_path / "whole", root, epochs, tmp_path / "whole")
  assert whole.wait(timeout=300) == 0, open(f"{tmp_path / 'whole'}.err").read()[-3000:]
  a, b = (json.loads((d / "results.json").read_text()) for d in (stopped, tmp_path / "whole"))
  assert a["best_epoch"] == b["best_epoch"] and a["valid"] == b["valid"] and a["test"] == b["test"]
  assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
