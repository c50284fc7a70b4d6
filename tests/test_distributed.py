"""Multi-process runs: recognising the launch, and 2 processes on localhost training exactly as 1 process with the
same total number of devices (each process a `python -m alignrec_jax.main` subprocess, joined by jax.distributed)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alignrec_jax.train import distributed
from tests.train.test_pretrain import _items as write_items
from tests.train.test_stage2 import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "train", "tiny_config.py")
TINY_PRETRAIN_CONFIG = os.path.join(REPO, "tests", "train", "tiny_pretrain_config.py")
EPOCHS = 3


def test_single_process_does_nothing():
  assert distributed.initialize(environ={}) is False
  assert distributed._cluster_wants_distributed({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is False


def test_cluster_environments_are_recognised():
  assert distributed._cluster_wants_distributed({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
  assert distributed._cluster_wants_distributed({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
  assert not distributed._cluster_wants_distributed({"TPU_WORKER_HOSTNAMES": "localhost"})


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "needs all of --coordinator_address"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"--process_id=2 must lie in \[0, 2\)"),
])
def test_incomplete_multi_process_flags(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(environ={}, **kwargs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _main(workdir, root, devices, log, *extra, config=TINY_CONFIG):
  """`python -m alignrec_jax.main` on the tiny dataset, with `devices` forced CPU devices (its own XLA_FLAGS: the
  pytest process's 4 must not leak in)."""
  cmd = [sys.executable, "-m", "alignrec_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.root={root}", f"--config.train.epochs={EPOCHS}", "--config.train.num_devices=0", *extra]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  with open(log, "w", encoding="utf-8") as f:  # a file, not a pipe: a full pipe would block the child
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(procs, logs, deadline):
  for proc, log in zip(procs, logs):
    try:
      rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      pytest.fail(f"{log.name} did not finish in time; its log ends:\n{log.read_text()[-3000:]}")
    assert rc == 0, f"{log.name} exited with {rc}; its log ends:\n{log.read_text()[-3000:]}"


def _pair_then_single(tmp_path, root, config, seconds):
  """2 processes x 2 devices (workdirs process0, process1), then 1 process x 4 devices (workdir single), within
  `seconds`; every process is killed if anything fails."""
  deadline = time.monotonic() + seconds
  port = _free_port()
  procs, logs = [], [tmp_path / f"process{i}.log" for i in range(2)] + [tmp_path / "single.log"]
  try:
    for i in range(2):
      procs.append(_main(tmp_path / f"process{i}", root, 2, logs[i], f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", config=config))
    _wait(procs, logs, deadline)
    procs.append(_main(tmp_path / "single", root, 4, logs[2], config=config))  # after the pair: one run at a time
    _wait(procs[2:], logs[2:], deadline)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path):
  """2 processes x 2 CPU devices joined by jax.distributed = 1 process x 4 devices: same loss curve, same metrics.

  Each process gets its own workdir so that what process 1 writes can be seen: nothing (orbax writes the
  checkpoints from process 0; results.json and config.json are process 0's). A real launch shares one workdir.
  """
  root = write_dataset(tmp_path / "data", n_users=70)  # 490 rows in batches of 64: the last batch is padded
  _pair_then_single(tmp_path, root, TINY_CONFIG, seconds=110)
  multi = json.loads((tmp_path / "process0" / "results.json").read_text())
  single = json.loads((tmp_path / "single" / "results.json").read_text())
  assert multi["devices"] == single["devices"] == 4
  assert len(multi["history"]) == EPOCHS
  for key in ("loss", "bpr", "cca", "sim"):
    np.testing.assert_allclose([h[key] for h in multi["history"]], [h[key] for h in single["history"]], rtol=1e-5,
                               err_msg=key)
  assert multi["best_epoch"] == single["best_epoch"]
  np.testing.assert_allclose([multi["test"][k] for k in sorted(single["test"])],
                             [single["test"][k] for k in sorted(single["test"])], rtol=1e-5)
  written = [p.relative_to(tmp_path / "process1") for p in (tmp_path / "process1").rglob("*")]
  assert all(p.parts[0] == "checkpoints" for p in written), f"process 1 wrote {written}"
  assert sorted(p.name for p in (tmp_path / "process0").iterdir()) == ["checkpoints", "config.json", "results.json"]


def test_two_processes_pretrain_like_one_process_of_four(tmp_path):
  """Stage 1 (ICA pre-training, dropout on) in 2 processes x 2 CPU devices = 1 process x 4 devices: the same logged
  losses step by step; only process 0 writes the history, both take part in the checkpoint saves."""
  root = tmp_path / "items"
  write_items(root)
  _pair_then_single(tmp_path, root, TINY_PRETRAIN_CONFIG, seconds=300)  # MMEnc compiles slower than stage 2
  multi = json.loads((tmp_path / "process0" / "pretrain_history.json").read_text())
  single = json.loads((tmp_path / "single" / "pretrain_history.json").read_text())
  assert [h["step"] for h in multi] == [h["step"] for h in single] == [1, 2, 3, 4]
  for key in ("loss", "mlm", "mim"):
    np.testing.assert_allclose([h[key] for h in multi], [h[key] for h in single], rtol=1e-5, err_msg=key)
  assert not (tmp_path / "process1" / "pretrain_history.json").exists()
