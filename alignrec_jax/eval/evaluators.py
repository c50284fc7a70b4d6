"""Evaluators plugged in from the config, as big_vision's `config.evals`.

`config.evals` names each evaluator a stage-2 run calls after every epoch, and its kind:

  config.evals.valid = dict(kind="ranking", split="valid")   # early stopping reads this one (eval.valid_metric)
  config.evals.test = dict(kind="ranking", split="test")     # reported at the best valid epoch

kind "ranking": MMRec's full ranking over all items with the user's train items masked (eval/ranking.py), at the
cut-offs and metrics of `config.eval`, split by train popularity when `config.eval.popularity_groups` is set.
A new kind is one function `(data, eval_config, spec) -> evaluate(user_emb, item_emb) -> {metric: value}` in KINDS.
"""

from typing import Callable

import ml_collections

from alignrec_jax.data.mmrec import RecData
from alignrec_jax.eval import ranking

Evaluate = Callable  # (user_emb [U, d], item_emb [I, d]) -> {metric: value}


def _ranking(data: RecData, ev: ml_collections.ConfigDict, spec: ml_collections.ConfigDict) -> Evaluate:
  split = ranking.make_eval_split(data, spec.split)
  groups = ranking.popularity_groups(data, tuple(ev.popularity_groups)) if ev.popularity_groups else None

  def evaluate(user_emb, item_emb) -> dict:
    return ranking.evaluate(user_emb, item_emb, split, topk=tuple(ev.topk), batch_users=ev.batch_users,
                            metrics=tuple(ev.metrics), item_groups=groups)
  return evaluate


KINDS = {"ranking": _ranking}
SPLITS = ("valid", "test")


def build(data: RecData, config: ml_collections.ConfigDict) -> dict[str, Evaluate]:
  """{name: evaluate} of every evaluator in `config.evals`, in the config's order."""
  return {name: KINDS[spec.kind](data, config.eval, spec) for name, spec in config.evals.items()}
