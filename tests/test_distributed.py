"""Recognising multi-process launches (the 2-process training test lives with the trainer tests)."""

import pytest

from alignrec_jax.train import distributed


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
