"""Stage 2: train a recommender (AlignRec by default) with BPR triplets, evaluate every epoch, stop early.

  python -m alignrec_jax.main --config=configs/lfm2k.py --workdir=/tmp/lfm2k

Loop (docs/method.md §6): Adam with lr_e = lr * lr_decay ** (epoch / lr_decay_every), set per epoch through
optax.inject_hyperparams (no recompilation); one epoch = every train interaction once, in batches split over the
devices (pmap, gradients summed; under `jax.distributed` every device of every process, each process feeding its
devices' shards, see train/parallel.py); after every epoch the representations are computed once and the valid and
test splits are ranked (users sharded over the processes, eval/ranking.py); early stopping on the valid metric
(strict improvement; stop at the (stopping_step + 1)-th epoch in a row without one, as MMRec); the reported test
metrics are those of the best valid epoch. A NaN/Inf loss, or an epoch whose mean loss exceeds
`train.divergence_factor` times the first step's, stops the run with an error; the checkpoint of the last good
epoch stays.

Every finished epoch is checkpointed (train/state.py): rerunning the same command in the same workdir resumes
after the last finished epoch and ends exactly as an uninterrupted run. Every process takes part in the (orbax,
collective) checkpoint saves: give them one shared workdir (a resume reads the checkpoints in every process).
Only process 0 writes `<workdir>/results.json`:
  {"best_epoch": int, "valid": {...}, "test": {...}, "history": [{"epoch", "loss", "<valid metric>", ...}],
   "devices": int (the devices of all processes that the gradients were summed over), ...}
"""

import dataclasses
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alignrec_jax.data import mmrec
from alignrec_jax.data.sampler import BPRSampler
from alignrec_jax.eval import ranking
from alignrec_jax.models import get_model
from alignrec_jax.train import checks
from alignrec_jax.train import distributed
from alignrec_jax.train import parallel
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib


def learning_rate(optim: ml_collections.ConfigDict, epoch: int) -> float:
  """The reference's LambdaLR step decay: lr * decay ** (epoch / decay_every), epoch counted from 0."""
  return float(optim.lr) * float(optim.lr_decay) ** (epoch / float(optim.lr_decay_every))


def write_json_atomic(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _fresh_meta() -> dict:
  return {"epoch": -1, "sampler_state": "", "best_value": -1.0, "best_epoch": -1, "best_step": -1, "bad_epochs": 0,
          "best_valid": {}, "best_test": {}, "history": [], "stopped_early": False, "first_loss": None}


def _results(meta: dict, config) -> dict:
  return {"best_epoch": meta["best_epoch"], "valid": meta["best_valid"], "test": meta["best_test"],
          "valid_metric": config.eval.valid_metric, "epochs_run": meta["epoch"] + 1,
          "stopped_early": meta["stopped_early"], "history": meta["history"]}


def _check_config(config) -> None:
  checks.check_stage2(config)


class DivergenceError(FloatingPointError):
  """The loss stayed finite but grew by orders of magnitude: the run is stopped, never reported as a success."""


def _check_divergence(config, meta: dict, epoch: int, mean_loss: float, ckpt) -> None:
  """Stops the run when the epoch's mean loss exceeds `train.divergence_factor` times the first step's loss.

  The reference is the untrained model's loss, not the first epoch's mean: a diverging lr (1e6) already lifts the
  first epoch's mean by eleven orders of magnitude. Its magnitude is floored at 1 so that a loss that starts near
  zero does not trip the guard. The diverged epoch is not checkpointed, so a rerun stops the same way."""
  factor = float(config.train.divergence_factor)
  reference = meta.get("first_loss")
  if reference is None and meta["history"]:  # a checkpoint from before first_loss was recorded
    reference = meta["history"][0]["loss"]
  if not factor or reference is None:
    return
  limit = factor * max(abs(reference), 1.0)
  if abs(mean_loss) > limit:
    last = ckpt.latest_step()
    raise DivergenceError(
        f"the run diverged: epoch {epoch}'s mean loss {mean_loss:.4g} is above config.train.divergence_factor="
        f"{factor:g} x the first step's loss {reference:.4g}; stopped without checkpointing it"
        + (f" (the last checkpoint, after epoch {last - 1}, stays)" if last else "")
        + ": lower config.optim.lr")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns (and writes) the results dict.

  Holds the workdir's lock and refuses to resume a checkpoint written with other settings (train/workdir.py), both
  before any data loads."""
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  main_process = distributed.is_main_process()
  with workdir_lib.locked(workdir, main_process):
    workdir_lib.check_or_record(config, os.path.join(workdir, "checkpoints"), stage=2, main_process=main_process)
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.data.get("synthetic", False):  # process 0 generates the default data once, the others then find it
    from alignrec_jax.data import synthetic  # pylint: disable=g-import-not-at-top  (the default data only)
    distributed.main_process_first(synthetic.ensure_synthetic_dataset, os.path.expanduser(config.data.root))
  data = mmrec.load_dataset(config.data)
  logging.info("%s", data.summary())

  model = get_model(config.model.name)(config)
  t0 = time.time()
  inputs = model.build_inputs(data)
  data = dataclasses.replace(data, features={})  # the model holds what it needs; free the host copy
  logging.info("graphs and inputs built in %.1fs", time.time() - t0)
  devices = parallel.train_devices(config.train.num_devices)
  n_dev = len(devices)
  n_summed = parallel.collective_size(devices)  # == n_dev: the gradient all-reduce spans every process's devices
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=float(config.optim.lr))
  params = model.init(jax.random.PRNGKey(config.seed), inputs)
  if hasattr(model, "inputs_after_init"):  # drops what only seeded the parameters (AlignRec's initial features)
    inputs = model.inputs_after_init(inputs)
  opt_state = tx.init(params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("model %s: %d parameters; %d device(s) in %d process(es), gradients summed over %d: %s",
               config.model.name, n_params, n_dev, jax.process_count(), n_summed, devices)

  sampler = BPRSampler(data.train, data.n_items, config.train.batch_size, seed=config.seed)
  ckpt = state_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  try:
    meta = _fresh_meta()
    latest = ckpt.restore_latest(params, opt_state)  # the newest intact step; damaged ones are moved aside
    if latest is not None:
      _, params, opt_state, meta = latest
      sampler.set_state(meta["sampler_state"])
      logging.info("resumed from %s after epoch %d (best valid %s = %.4f at epoch %d)", ckpt.directory,
                   meta["epoch"], config.eval.valid_metric, meta["best_value"], meta["best_epoch"])
    if not meta["stopped_early"]:  # a run that reached train.epochs continues if train.epochs grew
      # Handed over in a dict that _train empties: no unreplicated copy stays alive in this frame.
      carry = {"inputs": inputs, "params": params, "opt_state": opt_state}
      del inputs, params, opt_state
      meta = _train(config, model, carry, data, tx, sampler, ckpt, meta, devices)
  finally:
    ckpt.close()
  results = _results(meta, config)
  results["devices"] = n_summed
  if distributed.is_main_process():  # every process holds the same results
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  logging.info("best epoch %d: valid %s, test %s", results["best_epoch"], json.dumps(results["valid"]),
               json.dumps(results["test"]))
  return results


def _train(config, model, carry, data, tx, sampler, ckpt, meta, devices) -> dict:
  n_dev = len(devices)
  valid_split = ranking.make_eval_split(data, "valid")
  test_split = ranking.make_eval_split(data, "test")
  ev = config.eval
  # Representations are computed on the replicated state (the first local device's output), so no unreplicated
  # copy of the inputs and parameters has to live beside the replicated one. A pmap over the same (global) devices
  # as the train step: its arguments are this process's replicated copies.
  representations = parallel.device_map(lambda p, i, axis_name: model.representations(p, i), devices)
  rows = parallel.local_rows(devices)  # this process's shards of each global batch

  # Long-tail analysis: metrics split by train-popularity groups (eval.popularity_groups, e.g. (0.2,) = head/tail).
  item_groups = ranking.popularity_groups(data, tuple(ev.popularity_groups)) if ev.popularity_groups else None

  def evaluate(user_emb, item_emb, split):
    return ranking.evaluate(user_emb, item_emb, split, topk=tuple(ev.topk), batch_users=ev.batch_users,
                            metrics=tuple(ev.metrics), item_groups=item_groups)

  step_fn = parallel.pmap_train_step(model.loss, tx, devices)
  inputs = carry.pop("inputs")
  p_params, p_opt = parallel.put_replicated((carry.pop("params"), carry.pop("opt_state")), devices)
  p_eval_inputs = p_inputs = parallel.put_replicated(inputs, devices)
  if not hasattr(model, "epoch_inputs"):
    del inputs  # only the replicated copy is needed
  valid_key = ev.valid_metric
  for epoch in range(meta["epoch"] + 1, config.train.epochs):
    lr = learning_rate(config.optim, epoch)
    p_opt.hyperparams["learning_rate"] = parallel.put_replicated(jnp.asarray(lr, jnp.float32), devices)
    if hasattr(model, "epoch_inputs"):  # per-epoch training inputs (FREEDOM's pruned graph, BM3's dropout key);
      # keyed by (seed, epoch) so that a resumed run draws the same; evaluation keeps `inputs`.
      epoch_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch)
      p_inputs = parallel.put_replicated(model.epoch_inputs(inputs, epoch_rng, epoch), devices)
    t0 = time.time()
    sums, n_steps = {}, 0
    for step, batch in enumerate(sampler.epoch(n_dev, rows)):
      p_params, p_opt, metrics = step_fn(p_params, p_opt, p_inputs, batch)
      # psummed over all devices: every local copy holds the whole batch's values
      metrics = jax.tree.map(float, parallel.get_replicated(jax.block_until_ready(metrics), devices))
      if not math.isfinite(metrics["loss"]):
        last = ckpt.latest_step()
        raise FloatingPointError(
            f"loss is {metrics['loss']} at epoch {epoch}, step {step} (parts: {metrics}); stopped. The last good "
            + (f"checkpoint (after epoch {last - 1}) is kept in {ckpt.directory}" if last else
               "state was never checkpointed (the first epoch failed)")
            + ": lower config.optim.lr or check the features")
      if meta.get("first_loss") is None:  # the untrained model's loss: the divergence guard's reference
        meta["first_loss"] = metrics["loss"]
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v
      n_steps += 1
    train_s = time.time() - t0
    _check_divergence(config, meta, epoch, sums["loss"] / n_steps, ckpt)

    t0 = time.time()
    user_emb, item_emb = parallel.get_replicated(representations(p_params, p_eval_inputs), devices)
    valid = evaluate(user_emb, item_emb, valid_split)
    test = evaluate(user_emb, item_emb, test_split)
    eval_s = time.time() - t0

    value = valid[valid_key]
    improved = value > meta["best_value"]
    if improved:
      meta.update(best_value=value, best_epoch=epoch, best_step=epoch + 1, bad_epochs=0, best_valid=valid,
                  best_test=test)
    else:
      meta["bad_epochs"] += 1
    stop = meta["bad_epochs"] > config.train.stopping_step
    means = {k: v / n_steps for k, v in sums.items()}
    meta["history"].append({"epoch": epoch, "lr": lr, **{k: round(v, 6) for k, v in means.items()},
                            f"valid_{valid_key}": value, f"test_{valid_key}": test[valid_key],
                            "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)})
    meta.update(epoch=epoch, sampler_state=sampler.get_state(), stopped_early=stop)
    ckpt.save(epoch + 1, parallel.get_replicated(p_params, devices), parallel.get_replicated(p_opt, devices), meta,
              improved, value)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in sorted(means.items()) if k != "loss")  # the model's own terms
    logging.info("epoch %d: loss %.4f (%s) lr %.2e, train %.1fs | valid %s %.4f, test %s %.4f, eval %.2fs%s", epoch,
                 means["loss"], parts, lr, train_s, valid_key, value, valid_key, test[valid_key], eval_s,
                 " *" if improved else f" ({meta['bad_epochs']} without improvement)")
    if stop:
      logging.info("early stop after epoch %d: %d epochs without a better valid %s", epoch, meta["bad_epochs"],
                   valid_key)
      break
  return meta
