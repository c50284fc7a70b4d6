"""Stage-2 training state on disk: orbax checkpoints of params, optimiser state and the loop's bookkeeping.

A checkpoint (one per finished epoch, step = number of finished epochs) holds
  state: {"params", "opt_state"} (host copies; restored into the structure of a freshly initialised state)
  meta:  JSON: epoch, the sampler's RNG state, early-stopping state (best valid value, best epoch, epochs without
         improvement), the best epoch's valid and test metrics, the per-epoch history and `stopped_early`.
The manager keeps the latest `keep_latest` checkpoints and the best one (the last epoch that improved the valid
metric). Writes are synchronous and orbax finalises a step by an atomic rename, so a run killed at any moment leaves
the previous complete checkpoint to resume from.
"""

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_NOT_BEST = -1.0  # the "best_rank" metric of an epoch that did not improve


class Checkpointer:
  """orbax CheckpointManager over `<directory>`, keeping the latest `keep_latest` and the best checkpoint."""

  def __init__(self, directory: str, keep_latest: int = 1):
    if keep_latest < 1:
      raise ValueError(f"config.train.keep_checkpoints={keep_latest} must be >= 1")
    self.directory = os.path.abspath(directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.preservation_policy.LatestN(n=keep_latest),
        checkpoint_managers.preservation_policy.BestN(get_metric_fn=lambda m: m["best_rank"], n=1,
                                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, meta: dict, improved: bool, valid_value: float) -> None:
    """Saves one finished epoch. `improved`: this epoch set a new best valid value (`valid_value`)."""
    state = jax.tree.map(np.asarray, {"params": params, "opt_state": opt_state})
    rank = float(valid_value) if improved else _NOT_BEST
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      metrics={"best_rank": rank})
    self.manager.wait_until_finished()

  def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
    """(params, opt_state, meta) of checkpoint `step`, in the structure of the `*_like` trees."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have: {self.manager.all_steps()})")
    target = jax.tree.map(np.asarray, {"params": params_like, "opt_state": opt_state_like})
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                    meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged or incompatible checkpoint
      raise ValueError(f"checkpoint {step} in {self.directory} cannot be restored ({type(e).__name__}: {e}); it was "
                       "written by a different model/config or is damaged: use a fresh --workdir") from e
    return restored["state"]["params"], restored["state"]["opt_state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()


def restore_best_params(directory: str, params_like: Any, opt_state_like: Any) -> tuple[Any, dict]:
  """(params, meta) of the best epoch's checkpoint under `directory` (e.g. `<workdir>/checkpoints`)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory} (train with this --workdir first)")
  ckpt = Checkpointer(directory)
  try:
    steps = ckpt.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    step = ckpt.latest_step()
    _, _, meta = ckpt.restore(step, params_like, opt_state_like)
    best = meta.get("best_step")
    if best not in steps:
      raise FileNotFoundError(f"the best epoch's checkpoint (step {best}) is missing from {directory}")
    params, _, best_meta = ckpt.restore(best, params_like, opt_state_like)
    return params, best_meta
  finally:
    ckpt.close()
