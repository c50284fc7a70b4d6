"""Stage 2 as a `loop.Stage`: a recommender (AlignRec by default) trained on BPR triplets, evaluated after every
epoch, stopped early on the valid metric of `config.eval.select_on` (docs/method.md §6).

  python -m alignrec_jax.main --config=configs/lfm2k.py --workdir=/tmp/lfm2k

Adam at lr_e = lr * lr_decay ** (epoch / lr_decay_every), set per epoch (optax.inject_hyperparams: no
recompilation); one epoch is every train interaction once; the evaluators of `config.evals` run after it; early
stopping counts epochs without a strict improvement and stops at the (stopping_step + 1)-th, as MMRec; the reported
metrics are the best valid epoch's. train/loop.py runs the epochs (devices, guards, checkpoints, resume). Only
process 0 writes `<workdir>/results.json`: best_epoch, valid, test (and any other evaluator, e.g. valid_cold and
test_cold with cold-start items, under its name), the per-epoch history and `devices`, the number of devices whose
gradients were summed.
"""

import dataclasses
import json
import os
import time

from absl import logging
import jax
import ml_collections
import optax

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.data.sampler import BPRSampler
from alignrec_jax.eval import evaluators
from alignrec_jax.models import get_model
from alignrec_jax.models import new_items
from alignrec_jax.train import bridge
from alignrec_jax.train import checks
from alignrec_jax.train import distributed
from alignrec_jax.train import loop
from alignrec_jax.train import parallel
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib

DivergenceError = loop.DivergenceError


def learning_rate(optim: ml_collections.ConfigDict, epoch: int) -> float:
  """The reference's LambdaLR step decay: lr * decay ** (epoch / decay_every), epoch counted from 0."""
  return float(optim.lr) * float(optim.lr_decay) ** (epoch / float(optim.lr_decay_every))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the learning rate injected, so that the schedule sets it per epoch without recompiling."""
  return optax.inject_hyperparams(optax.adam)(learning_rate=float(config.optim.lr))


def _fresh_meta() -> dict:
  return {"epoch": -1, "sampler_state": "", "best_value": -1.0, "best_epoch": -1, "best_step": -1, "bad_epochs": 0,
          "best_valid": {}, "best_test": {}, "history": [], "stopped_early": False, "first_loss": None,
          "lowest_loss": None}


def _results(meta: dict, config) -> dict:
  return {"best_epoch": meta["best_epoch"], "valid": meta["best_valid"], "test": meta["best_test"],
          **meta.get("best_others", {}),
          "valid_metric": config.eval.valid_metric, "select_on": config.eval.select_on,
          "epochs_run": meta["epoch"] + 1,
          "stopped_early": meta["stopped_early"], "history": meta["history"]}


class Recommending(loop.Stage):
  """Stage 2 for the loop: one round = one epoch of BPR triplets; evaluation and early stopping after each."""
  name = "train"
  nan_hint = "lower config.optim.lr or check the features"

  def __init__(self, config: ml_collections.ConfigDict, model, data: mmrec.RecData, sampler: BPRSampler,
               cold_start=None):
    self.config, self.model, self.sampler = config, model, sampler
    self.cold_start = cold_start  # models/new_items.ColdStart of model.cold_start='neighbours', else None
    self.loss = model.loss
    self.tx = make_optimizer(config)
    self.divergence_factor = float(config.train.divergence_factor)
    self.divergence_growth = float(config.train.divergence_growth)
    self.log_every = int(config.train.log_every_steps)
    self.inputs_per_round = model.inputs_change_per_epoch
    self.evaluators = evaluators.build(data, config)

  def rounds(self, meta: dict) -> range:
    # a run that reached train.epochs continues if train.epochs grew; an early-stopped one is done
    return range(0) if meta["stopped_early"] else range(meta["epoch"] + 1, self.config.train.epochs)

  def total_steps(self, meta: dict) -> int:
    return self.config.train.epochs * self.sampler.steps_per_epoch

  def batches(self, round_: int, n_devices: int, rows: slice):
    return self.sampler.epoch(n_devices, rows)

  def round_hyperparams(self, round_: int) -> dict:
    return {"learning_rate": learning_rate(self.config.optim, round_)}

  def round_inputs(self, inputs, round_: int):
    # keyed by (seed, epoch) so that a resumed run draws the same; evaluation keeps `inputs`
    return self.model.epoch_inputs(inputs, jax.random.fold_in(jax.random.PRNGKey(self.config.seed), round_), round_)

  def position_name(self, round_: int, step) -> str:
    return f"epoch {round_}" + ("" if step is None else f", step {step}")

  def checkpoint_name(self, checkpoint_step: int) -> str:
    return f"after epoch {checkpoint_step - 1}"

  def end_round(self, round_: int, means: dict, meta: dict, representations) -> tuple[int, bool, str]:
    train_s = means.pop("train_s")
    t0 = time.time()
    user_emb, item_emb = representations(self.model.representations)
    if self.cold_start is not None:
      item_emb = self.cold_start(item_emb)
    scores = {name: evaluate(user_emb, item_emb) for name, evaluate in self.evaluators.items()}
    valid, test = scores["valid"], scores["test"]
    eval_s = time.time() - t0

    key = self.config.eval.valid_metric
    select = self.config.eval.select_on
    value = scores[select][key]
    others = {f"{name}_{key}": s[key] for name, s in scores.items() if name not in ("valid", "test")}
    improved = value > meta["best_value"]
    if improved:
      meta.update(best_value=value, best_epoch=round_, best_step=round_ + 1, bad_epochs=0, best_valid=valid,
                  best_test=test, best_others={k: v for k, v in scores.items() if k not in ("valid", "test")})
    else:
      meta["bad_epochs"] += 1
    stop = meta["bad_epochs"] > self.config.train.stopping_step
    lr = learning_rate(self.config.optim, round_)
    meta["history"].append({"epoch": round_, "lr": lr, **{k: round(v, 6) for k, v in means.items()},
                            f"valid_{key}": valid[key], f"test_{key}": test[key], **others,
                            "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)})
    meta.update(epoch=round_, sampler_state=self.sampler.get_state(), stopped_early=stop)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in sorted(means.items()) if k != "loss")  # the model's own terms
    cold = "".join(f", {name.replace('_', ' ')} {v:.4f}" for name, v in others.items())
    line = (f"loss {means['loss']:.4f} ({parts}) lr {lr:.2e}, train {train_s:.1f}s | valid {key} {valid[key]:.4f}, "
            f"test {key} {test[key]:.4f}{cold}, eval {eval_s:.2f}s"
            + (" *" if improved else f" ({meta['bad_epochs']} without improvement)"))
    if stop:
      line += f"; early stop: {meta['bad_epochs']} epochs without a better {select} {key}"
    return round_ + 1, stop, line


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns (and writes) the results dict.

  Holds the workdir's lock and refuses to resume a checkpoint written with other settings (train/workdir.py), both
  before any data loads."""
  checks.check_stage2(config)
  with workdir_lib.claimed(config, workdir, [(config, checkpoint_dir(workdir), 2)], distributed.is_main_process()):
    return _run(config, workdir)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def after_stage1(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The stage-2 config of a --config.stage=all run: trained on the table stage 1 extracted into `workdir`."""
  config = config.copy_and_resolve_references()
  config.data.features_from = workdir
  return config


def build(config: ml_collections.ConfigDict, data) -> tuple:
  """(model, inputs, params, opt_state): the model of `config` on `data`, its training inputs, its initial
  parameters and optimiser state, the structure every stage-2 checkpoint restores into (training and export)."""
  model = get_model(config.model.name)(config)
  inputs = model.build_inputs(data)
  params = model.init(jax.random.PRNGKey(config.seed), inputs)
  inputs = model.inputs_after_init(inputs)  # drops what only seeded the parameters (AlignRec's initial features)
  return model, inputs, params, make_optimizer(config).init(params)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  data = bridge.load_dataset(config.data)
  logging.info("%s", data.summary())

  t0 = time.time()
  model, inputs, params, opt_state = build(config, data)
  cold_start = new_items.cold_start(model, data, config)
  data = dataclasses.replace(data, features={})  # the model holds what it needs; free the host copy
  logging.info("graphs, inputs and parameters built in %.1fs", time.time() - t0)
  devices = parallel.train_devices(config.train.num_devices)
  n_summed = parallel.collective_size(devices)  # == len(devices): the all-reduce spans every process's devices
  sampler = BPRSampler(data.train, data.n_items, config.train.batch_size, seed=config.seed)
  stage = Recommending(config, model, data, sampler, cold_start)
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  logging.info("model %s: %d parameters; %d device(s) in %d process(es), gradients summed over %d: %s",
               config.model.name, n_params, len(devices), jax.process_count(), n_summed, devices)

  with state_lib.Checkpointer(checkpoint_dir(workdir), config.train.keep_checkpoints) as ckpt:
    meta = dict(_fresh_meta(), sampler_state=sampler.get_state())  # a round stopped by a signal resumes from it
    # damaged steps are moved aside; a preemption checkpoint newer than the latest epoch is taken
    latest = ckpt.restore_for_resume({"params": params, "opt_state": opt_state})
    if latest is not None:
      _, restored, meta = latest
      params, opt_state = restored.pop("params"), restored.pop("opt_state")
      sampler.set_state(meta["sampler_state"])  # the state at the start of the round to run (or resume)
      within = f", {meta['partial']['step']} steps into epoch {meta['epoch'] + 1}" if "partial" in meta else ""
      logging.info("resumed from %s after epoch %d%s (best valid %s = %.4f at epoch %d)", ckpt.directory,
                   meta["epoch"], within, config.eval.valid_metric, meta["best_value"], meta["best_epoch"])
    train_state = {"params": params, "opt_state": opt_state, "inputs": inputs}  # fit empties it: no host copy stays
    del params, opt_state, inputs
    meta = loop.fit(stage, train_state, devices, ckpt, meta)
  results = dict(_results(meta, config), devices=n_summed)
  if distributed.is_main_process():  # every process holds the same results
    atomic.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("best epoch %d: valid %s, test %s", results["best_epoch"], json.dumps(results["valid"]),
               json.dumps(results["test"]))
  return results
