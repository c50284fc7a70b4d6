"""Evaluators plugged in from the config, as big_vision's `config.evals`.

`config.evals` names each evaluator a stage-2 run calls after every epoch, and its kind:

  config.evals.valid = dict(kind="ranking", split="valid")   # early stopping reads eval.select_on's valid_metric
  config.evals.test = dict(kind="ranking", split="test")     # reported at the best valid epoch

kind "ranking": MMRec's full ranking over all items with the user's train items masked (eval/ranking.py), at the
cut-offs and metrics of `config.eval`, split by train popularity when `config.eval.popularity_groups` is set.
With cold-start items (`data.cold_items`, data/protocols.py) the warm splits rank the warm items only, and
`valid_cold` / `test_cold` ranking evaluators, over their own cold items, are added unless the config names an
evaluator of those splits.
A new kind is one function `(data, eval_config, spec) -> evaluate(user_emb, item_emb) -> {metric: value}` in KINDS.
"""

from typing import Callable

import ml_collections

from alignrec_jax.data import mmrec
from alignrec_jax.data.mmrec import RecData
from alignrec_jax.errors import ConfigError
from alignrec_jax.eval import ranking

Evaluate = Callable  # (user_emb [U, d], item_emb [I, d]) -> {metric: value}


def _ranking(data: RecData, ev: ml_collections.ConfigDict, spec: ml_collections.ConfigDict) -> Evaluate:
  split = ranking.make_eval_split(data, spec.split)
  groups = None
  if ev.popularity_groups and spec.split not in mmrec.COLD_SPLITS:  # cold items have no train popularity
    groups = ranking.popularity_groups(data, tuple(ev.popularity_groups))

  def evaluate(user_emb, item_emb) -> dict:
    return ranking.evaluate(user_emb, item_emb, split, topk=tuple(ev.topk), batch_users=ev.batch_users,
                            metrics=tuple(ev.metrics), item_groups=groups)
  return evaluate


KINDS = {"ranking": _ranking}


def specs(data: RecData, config: ml_collections.ConfigDict) -> dict:
  """{name: spec} of `config.evals`, plus a ranking evaluator named after each cold split the config does not cover.

  The config's cold splits and eval.select_on are checked against data.cold_items before any data loads
  (train/checks.check_eval); what is left to check here is that eval.select_on names one of these evaluators."""
  out = dict(config.evals.items())
  covered = {spec.split for spec in out.values()}
  for split in data.held_out_splits():
    if split not in covered and split not in out:
      out[split] = ml_collections.ConfigDict(dict(kind="ranking", split=split))
  select = config.eval.select_on
  if select not in out:  # e.g. the config's own evaluator of valid_cold goes by another name
    raise ConfigError(f"config.eval.select_on={select!r} names no evaluator of this run {tuple(out)}")
  return out


def build(data: RecData, config: ml_collections.ConfigDict) -> dict[str, Evaluate]:
  """{name: evaluate} of every evaluator of `specs(data, config)`, in that order."""
  return {name: KINDS[spec.kind](data, config.eval, spec) for name, spec in specs(data, config).items()}
