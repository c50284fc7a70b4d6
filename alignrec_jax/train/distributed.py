"""JAX's multi-controller runtime (`jax.distributed`): one process per host (or per GPU), all devices in one mesh.

A single process does nothing here. A multi-process launch is recognised from explicit flags
(`--coordinator_address`, `--num_processes`, `--process_id`), from `JAX_COORDINATOR_ADDRESS` /
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, or from the cluster's own environment (Slurm with several tasks, Cloud TPU
VMs with several workers), in which case `jax.distributed.initialize()` reads the cluster's variables itself.
"""

import os
from typing import Optional

from absl import logging

from alignrec_jax.errors import ConfigError

# jax is imported inside the functions: entry points import this module to set the XLA flags (configure_xla) while
# they stay free of JAX, so that --help answers at once

# XLA:CPU's YNNPACK fusion (jaxlib 0.10) merges a matmul with the reduction that consumes it into one kernel that
# runs several times slower than the plain matmul, and the similarity-preserving loss and InfoNCE are exactly that
# pattern (docs/experiments.md has the measurement).
_NO_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type="


def configure_xla(environ=None) -> None:
  """Sets the process's XLA flags; every entry point (main, compare, the benches, the tests) calls it before JAX
  starts its backend. A user who sets the flag in XLA_FLAGS keeps their own value."""
  environ = os.environ if environ is None else environ
  if "xla_cpu_experimental_ynn_fusion_type" not in environ.get("XLA_FLAGS", ""):
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {_NO_YNN_FUSION}".strip()


def _cluster_wants_distributed(environ) -> bool:
  """True under a launcher that starts several cooperating processes (Slurm tasks, multi-worker TPU VMs)."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return True
  workers = environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in workers


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, environ=None) -> bool:
  """Starts `jax.distributed` when this is one process of several; returns whether it did.

  Must run before any JAX computation (JAX's own rule).
  """
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(environ["JAX_NUM_PROCESSES"])
  if process_id is None and environ.get("JAX_PROCESS_ID"):
    process_id = int(environ["JAX_PROCESS_ID"])
  import jax
  if coordinator_address or (num_processes or 1) > 1:
    if not (coordinator_address and num_processes and process_id is not None):
      raise ConfigError("a multi-process run needs all of --coordinator_address (host:port), --num_processes and "
                        f"--process_id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must lie in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif _cluster_wants_distributed(environ):
    jax.distributed.initialize()  # the cluster's environment names the coordinator and this process
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """Only process 0 writes logs, results and non-orbax files."""
  import jax
  return jax.process_index() == 0


def main_process_first(fn, *args, **kwargs):
  """fn(*args, **kwargs) in every process, process 0 first and the others after it finished: for steps that build
  files in a shared directory once (tokenizer, datasets) and load them afterwards. fn must not itself wait for the
  other processes (no orbax or other collectives)."""
  import jax
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  from jax.experimental import multihost_utils
  name = getattr(fn, "__name__", "step")
  if is_main_process():
    result = fn(*args, **kwargs)
  multihost_utils.sync_global_devices(f"main_process_first:{name}")
  if not is_main_process():
    result = fn(*args, **kwargs)
  return result


def barrier(name: str) -> None:
  """Every process waits here for all the others (a no-op in a single process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
