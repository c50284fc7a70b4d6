"""The one training loop of both stages.

A stage (`Pretraining` in pretrain.py, `Recommending` in stage2.py) supplies its loss, optimiser and batches and
what happens at the end of a round (an epoch in stage 2, the steps up to a checkpoint in stage 1). The loop owns the
rest: the devices and the data-parallel step (train/parallel.py), the NaN/Inf and divergence guards, progress lines
with an ETA, a checkpoint after every round (train/state.py), a checkpoint of the unfinished round on SIGTERM or
SIGINT (train/preemption.py), and the resume that makes a killed, stopped or preempted and restarted run end exactly
as an uninterrupted one. docs/architecture.md has the picture.
"""

import itertools
import math
import time
from typing import Any, Callable, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import optax

from alignrec_jax.train import parallel
from alignrec_jax.train import preemption
from alignrec_jax.train import state as state_lib


class DivergenceError(FloatingPointError):
  """The loss stayed finite but grew by orders of magnitude: the run is stopped, never reported as a success."""


class Stage:
  """What a training stage gives `fit`. Subclasses set the attributes and override the methods they need.

  loss(params, inputs, batch, axis_name) -> (this device's share of the whole batch's loss, metrics that add up the
  same way); `tx` the optimiser (its `hyperparams` are set per round when `round_hyperparams` returns values).
  """
  name = "train"                # the log prefix
  loss: Callable
  tx: optax.GradientTransformation
  log_every = 0                 # a progress line every this many steps (0: one line per round)
  inputs_per_round = False      # True: round_inputs gives new inputs, so the host copy of `inputs` is kept
  divergence_factor = 0.0       # stop when a round's mean loss exceeds this multiple of the first step's (0: off)
  divergence_growth = 0.0       # stop when it exceeds the first step's and this multiple of the lowest round mean
  nan_hint = "lower the learning rate"
  unlogged = ()                 # metrics left out of the progress lines (terms that are off; the history keeps them)

  def rounds(self, meta: dict) -> range:
    """The rounds still to run, given the restored meta."""
    raise NotImplementedError

  def total_steps(self, meta: dict) -> Optional[int]:
    """How many steps the whole run takes at most (for the ETA); None when not known."""
    return None

  def batches(self, round_: int, n_devices: int, rows: slice) -> Iterable[dict]:
    """The round's batches, each a dict of [n_local_devices, b, ...] arrays (this process's rows of the global one)."""
    raise NotImplementedError

  def round_hyperparams(self, round_: int) -> dict:
    """Values for the optimiser's injected hyper-parameters this round ({} = none)."""
    return {}

  def round_inputs(self, inputs: Any, round_: int) -> Any:
    """The training inputs of this round (called only with `inputs_per_round`)."""
    return inputs

  def position_name(self, round_: int, step: Optional[int]) -> str:
    """Names a position in messages: 'epoch 2, step 5' (step None: the round alone, 'epoch 2')."""
    return f"round {round_}" + ("" if step is None else f", step {step}")

  def checkpoint_name(self, checkpoint_step: int) -> str:
    """Names what a checkpoint holds in messages ('after epoch 1')."""
    return f"after step {checkpoint_step}"

  def log_window(self, row: dict, steps_per_s: float, meta: dict) -> None:
    """Called with the mean metrics of every `log_every` steps (row["step"]: steps done) before they are logged."""

  def end_round(self, round_: int, means: dict, meta: dict, representations: Callable) -> tuple[int, bool, str]:
    """Updates `meta` at the end of a round (evaluation, history, early stopping); returns (the checkpoint step that
    holds this round, whether to stop, a line for the log or ''). `representations(fn)` is fn(params, inputs) on the
    current parameters and the round-independent inputs, computed on the devices; one host copy is returned."""
    raise NotImplementedError


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Pace:
  """This run's steps per second for the ETA, timed from the end of its first step (which compiles the step and
  would make the first estimates tens of times too long); 'estimating' until `min_steps` more steps are timed."""

  def __init__(self, min_steps: int = 3):
    self.start, self.steps, self.min_steps = None, 0, min_steps

  def step_done(self) -> None:
    if self.start is None:
      self.start = time.perf_counter()
    else:
      self.steps += 1

  def eta(self, remaining_steps: int) -> str:
    if remaining_steps <= 0:
      return _eta(0)
    if self.steps < self.min_steps:
      return "estimating"
    return _eta(remaining_steps * (time.perf_counter() - self.start) / self.steps)


def _check_divergence(stage: Stage, meta: dict, round_: int, mean_loss: float, ckpt: state_lib.Checkpointer) -> None:
  """Stops the run when the round's mean loss has blown up or has grown steadily; records the lowest round mean.

  Blown up: above `stage.divergence_factor` times the first step's loss. The reference is the untrained model's
  loss, not the first round's mean: a diverging lr (1e6) already lifts the first epoch's mean by eleven orders of
  magnitude. Its magnitude is floored at 1 so that a loss that starts near zero does not trip the guard.
  Grown: above the untrained model's loss and above `stage.divergence_growth` times the lowest round mean so far: an
  lr that is too large by a few orders (5 on lfm2k) climbs from 47 to 97 to 133 in three epochs while the recall barely
  moves, and a run that trains never ends a round worse than it started. The diverged round is not checkpointed, so
  a rerun stops the same way."""
  reference = meta.get("first_loss")
  if reference is None:
    return
  reason = ""
  if stage.divergence_factor and abs(mean_loss) > stage.divergence_factor * max(abs(reference), 1.0):
    reason = (f"is above config.train.divergence_factor={stage.divergence_factor:g} x the first step's loss "
              f"{reference:.4g}")
  lowest = meta.get("lowest_loss")
  if (not reason and stage.divergence_growth and lowest is not None and lowest > 0
      and mean_loss > max(reference, stage.divergence_growth * lowest)):
    reason = (f"has grown above the first step's loss {reference:.4g} and above config.train.divergence_growth="
              f"{stage.divergence_growth:g} x the lowest epoch mean {lowest:.4g}")
  if reason:
    last = ckpt.latest_step()
    raise DivergenceError(
        f"the run diverged: {stage.position_name(round_, None)}'s mean loss {mean_loss:.4g} {reason}; stopped without "
        "checkpointing it" + (f" (the last checkpoint, {stage.checkpoint_name(last)}, stays)" if last else "")
        + f": {stage.nan_hint}")
  meta["lowest_loss"] = mean_loss if lowest is None else min(lowest, mean_loss)


def fit(stage: Stage, train_state: dict, devices: list, ckpt: state_lib.Checkpointer, meta: dict) -> dict:
  """Runs `stage`'s remaining rounds from `train_state` {"params", "opt_state", "inputs"} and `meta`, checkpointing
  each; returns the final meta.

  `train_state` is emptied: the caller keeps no host copy, and while the loop runs only the devices' copies of the
  parameters, optimiser state and inputs live (the host copy of the inputs only with `stage.inputs_per_round`)."""
  n_dev = len(devices)
  rows = parallel.local_rows(devices)  # this process's shards of each global batch
  step_fn = parallel.pmap_train_step(stage.loss, stage.tx, devices)
  representations_fn = {}

  p_params, p_opt = parallel.put_replicated((train_state.pop("params"), train_state.pop("opt_state")), devices)
  inputs = train_state.pop("inputs")
  p_eval_inputs = p_inputs = parallel.put_replicated(inputs, devices)
  if not stage.inputs_per_round:
    inputs = None  # only the devices' copy is needed (the graphs and tables are the run's largest arrays)

  def representations(fn: Callable) -> Any:
    if fn not in representations_fn:
      representations_fn[fn] = parallel.device_map(lambda p, i, axis_name: fn(p, i), devices)
    return parallel.get_replicated(representations_fn[fn](p_params, p_eval_inputs), devices)

  total = stage.total_steps(meta)
  pace = _Pace()
  with preemption.listening() as listener:
    for round_ in stage.rounds(meta):
      for key, value in stage.round_hyperparams(round_).items():
        p_opt.hyperparams[key] = parallel.put_replicated(jnp.asarray(value, jnp.float32), devices)
      if stage.inputs_per_round:
        p_inputs = parallel.put_replicated(stage.round_inputs(inputs, round_), devices)
      # a round stopped by a signal (a preemption checkpoint) goes on where it stopped, with its sums so far
      partial = meta.pop("partial", None) or {}
      if partial and partial["round"] != round_:
        raise state_lib.CheckpointError(f"the preemption checkpoint in {ckpt.directory} holds round "
                                        f"{partial['round']}, but the run resumes at round {round_}")
      done = partial.get("step", 0)
      sums, window = dict(partial.get("sums", {})), dict(partial.get("window", {}))
      n_steps, window_steps = done, partial.get("window_steps", 0)
      round_start = window_start = time.perf_counter() - partial.get("train_s", 0.0)
      batches = itertools.islice(stage.batches(round_, n_dev, rows), done, None)
      for step, batch in enumerate(batches, start=done):
        p_params, p_opt, metrics = step_fn(p_params, p_opt, p_inputs, batch)
        # psummed over all devices: every local copy holds the whole batch's values. Blocking on each step also
        # keeps back-to-back all-reduces from deadlocking the CPU backend.
        metrics = jax.tree.map(float, parallel.get_replicated(jax.block_until_ready(metrics), devices))
        if not math.isfinite(metrics["loss"]):
          last = ckpt.latest_step()
          kept = (f"checkpoint ({stage.checkpoint_name(last)}) is kept in {ckpt.directory}" if last else
                  "state was never checkpointed (the first round failed)")
          raise FloatingPointError(f"loss is {metrics['loss']} at {stage.position_name(round_, step)} (parts: "
                                   f"{metrics}); stopped. The last good {kept}: {stage.nan_hint}")
        if meta.get("first_loss") is None:  # the untrained model's loss: the divergence guard's reference
          meta["first_loss"] = metrics["loss"]
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
          window[k] = window.get(k, 0.0) + v
        n_steps += 1
        window_steps += 1
        pace.step_done()
        meta["steps"] = meta.get("steps", 0) + 1
        if stage.log_every and (meta["steps"] in (1, total) or meta["steps"] % stage.log_every == 0):
          window_rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
          row = {k: v / window_steps for k, v in window.items()}
          row["step"] = meta["steps"]
          stage.log_window(row, window_rate, meta)
          logging.info("%s step %d%s: %s, %.2f steps/s%s", stage.name, meta["steps"], f"/{total}" if total else "",
                       ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step" and k not in stage.unlogged),
                       window_rate, f", ETA {pace.eta(total - meta['steps'])}" if total else "")
          window, window_start, window_steps = {}, time.perf_counter(), 0
        signal_name = listener.requested(meta["steps"])
        if signal_name:
          partial = {"round": round_, "step": n_steps, "sums": sums, "window": window, "window_steps": window_steps,
                     "train_s": time.perf_counter() - round_start}
          saved = ckpt.save_preempted(parallel.get_replicated({"params": p_params, "opt_state": p_opt}, devices),
                                      dict(meta, partial=partial))
          raise preemption.Preempted(
              f"{signal_name} received: stopped after {stage.position_name(round_, step)} with a checkpoint "
              f"(step {saved} in {ckpt.directory}/{state_lib.PREEMPTED}); rerun the same command to resume")
      if not n_steps:
        break
      means = {k: v / n_steps for k, v in sums.items()}
      _check_divergence(stage, meta, round_, means["loss"], ckpt)
      means["train_s"] = time.perf_counter() - round_start
      checkpoint_step, stop, line = stage.end_round(round_, means, meta, representations)
      ckpt.save(checkpoint_step, parallel.get_replicated({"params": p_params, "opt_state": p_opt}, devices), meta)
      if line:
        logging.info("%s %s: %s%s", stage.name, stage.position_name(round_, None), line,
                     f" | ETA {pace.eta(total - meta['steps'])} at most" if total and not stop else "")
      signal_name = listener.requested(meta["steps"]) if not stop else None
      if signal_name:  # came during the evaluation: the round's own checkpoint is the one to resume from
        raise preemption.Preempted(f"{signal_name} received: stopped {stage.checkpoint_name(checkpoint_step)} "
                                   f"(checkpoint {checkpoint_step} in {ckpt.directory}); rerun the same command "
                                   "to resume")
      if stop:
        break
  return meta
