"""Every config value checked before any data loads, so that a typo fails in a second with one line naming the key
instead of after an epoch with a bare KeyError/TypeError.

Each stage calls the check of what it reads first (`check_stage1`, `check_stage2`, `check_probe`); each failure is a
`ConfigError` whose message starts with the key (`config.eval.valid_metric='recall@25': ...`).
"""

import numbers
import os

from alignrec_jax import graph as graph_lib
from alignrec_jax import models
from alignrec_jax.data.mmrec import COLD_SPLITS
from alignrec_jax.data.mmrec import HELD_OUT_SPLITS
from alignrec_jax.errors import ConfigError
from alignrec_jax.eval import evaluators
from alignrec_jax.eval import probes
from alignrec_jax.eval import ranking
from alignrec_jax.losses import ica
from alignrec_jax.models import mmenc
from alignrec_jax.train import bridge
from alignrec_jax.train import init_from



def _fail(key: str, value, why: str):
  raise ConfigError(f"config.{key}={value!r} {why}")


def _int(config, key: str, minimum: int) -> int:
  value = config
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    _fail(key, value, "must be an integer")
  if value < minimum:
    _fail(key, value, f"must be >= {minimum}")
  return int(value)


def _number(config, key: str, low: float = None, high: float = None, low_open: bool = True) -> float:
  value = config
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    _fail(key, value, "must be a number")
  value = float(value)
  if value != value:
    _fail(key, value, "must be a number, not nan")
  if low is not None and (value <= low if low_open else value < low):
    _fail(key, value, f"must be {'>' if low_open else '>='} {low}")
  if high is not None and value > high:
    _fail(key, value, f"must be <= {high}")
  return value


def check_eval(config) -> None:
  ev = config.eval
  topk = ev.topk
  if isinstance(topk, (str, bytes)) or not hasattr(topk, "__iter__") or not len(topk):
    _fail("eval.topk", topk, "must be a non-empty tuple of positive integers, e.g. (5, 10, 20, 50)")
  for k in topk:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
      _fail("eval.topk", tuple(topk), f"must hold positive integers, got {k!r}")
  metrics = ev.metrics
  if isinstance(metrics, str) or not metrics or any(m not in ranking.METRICS for m in metrics):
    _fail("eval.metrics", metrics, f"must be a non-empty tuple of {ranking.METRICS}")
  name, _, k = str(ev.valid_metric).partition("@")
  if name not in metrics or not k.isdigit():
    _fail("eval.valid_metric", ev.valid_metric, f"must be <metric>@<k> with a metric of eval.metrics {tuple(metrics)}")
  if int(k) not in tuple(topk):
    _fail("eval.valid_metric", ev.valid_metric, f"has a cut-off ({k}) that eval.topk {tuple(topk)} does not evaluate")
  _int(config, "eval.batch_users", 1)
  for f in ev.popularity_groups:
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1:
      _fail("eval.popularity_groups", tuple(ev.popularity_groups), "fractions must lie strictly between 0 and 1")
  evals = config.evals
  for name in ("valid", "test"):
    if name not in evals:
      _fail("evals", tuple(evals.keys()), f"must hold a {name!r} evaluator (early stopping and the report read it)")
  for name, spec in evals.items():
    if spec.get("kind") not in evaluators.KINDS:
      _fail(f"evals.{name}.kind", spec.get("kind"), f"must be one of {tuple(evaluators.KINDS)}")
    if spec.get("split") not in HELD_OUT_SPLITS:
      _fail(f"evals.{name}.split", spec.get("split"), f"must be one of {HELD_OUT_SPLITS}")
    if spec.get("split") in COLD_SPLITS and not config.data.cold_items:
      _fail(f"evals.{name}.split", spec.get("split"), "needs cold-start items: set --config.data.cold_items, e.g. 0.2")
  select = ev.select_on
  if select not in ("valid", "valid_cold"):
    _fail("eval.select_on", select, "must be 'valid' or 'valid_cold' (a test split never selects the model)")
  if select == "valid_cold" and not config.data.cold_items:
    _fail("eval.select_on", select, "needs cold-start items: set --config.data.cold_items, e.g. 0.2")


def check_protocols(config) -> None:
  """The cold-start and sparse-user protocol keys of config.data (data/protocols.py)."""
  if _number(config, "data.cold_items", 0.0, low_open=False) >= 1.0:  # _number has refused a negative value
    _fail("data.cold_items", config.data.cold_items, "must lie in [0, 1) (some items must stay warm to train on)")
  _number(config, "data.train_fraction", 0.0, 1.0)
  _int(config, "data.split_seed", 0)
  if config.data.cold_inductive and not config.data.cold_items:
    _fail("data.cold_inductive", config.data.cold_inductive, "needs cold-start items: set --config.data.cold_items, "
          "e.g. 0.2")
  if config.model.cold_start not in ("own", "neighbours"):
    _fail("model.cold_start", config.model.cold_start, "must be 'own' (the model's vectors) or 'neighbours' (the "
          "mean of the most similar trained items' vectors)")
  if config.model.cold_start == "neighbours" and config.model.name in models.registered():
    if models.get_model(config.model.name).content_slots is models.Recommender.content_slots:
      _fail("model.cold_start", "neighbours", f"needs a content model; {config.model.name!r} scores items by their "
            "ID embedding alone (keep model.cold_start='own')")


def check_stage2(config) -> None:
  """The keys stage-2 training reads (also called by stage2.run, which other entry points use directly)."""
  for key in ("train.batch_size", "train.epochs", "train.eval_every", "train.keep_checkpoints"):
    _int(config, key, 1)
  _int(config, "train.stopping_step", 0)
  _int(config, "train.num_devices", 0)
  if config.train.eval_every != 1:
    _fail("train.eval_every", config.train.eval_every, "must be 1: early stopping counts evaluated epochs, as the "
          "reference")
  _number(config, "train.divergence_factor", 0.0, low_open=False)
  _number(config, "train.divergence_growth", 0.0, low_open=False)
  if 0 < config.train.divergence_growth <= 1:
    _fail("train.divergence_growth", config.train.divergence_growth, "must be 0 (off) or above 1: a loss that "
          "only matches its lowest epoch has not grown")
  _number(config, "optim.lr", 0.0)
  _number(config, "optim.lr_decay", 0.0)
  _number(config, "optim.lr_decay_every", 0.0)
  _int(config, "seed", 0)
  if config.model.name not in models.registered():
    _fail("model.name", config.model.name, f"is not a registered model {tuple(models.registered())}")
  _int(config, "model.embedding_size", 1)
  if config.model.propagation not in graph_lib.PROPAGATION_METHODS:
    _fail("model.propagation", config.model.propagation, f"must be one of {graph_lib.PROPAGATION_METHODS}")
  if not config.data.name:
    _fail("data.name", config.data.name, "is empty: set the dataset name (the .inter file is <root>/<name>.inter)")
  if not isinstance(config.data.drop_duplicates, bool):
    _fail("data.drop_duplicates", config.data.drop_duplicates, "must be True or False")
  if config.data.features_variant not in bridge.VARIANTS:
    _fail("data.features_variant", config.data.features_variant, f"must be one of {tuple(bridge.VARIANTS)}")
  check_protocols(config)
  check_eval(config)
  models.get_model(config.model.name)(config)  # the model's own checks (its section, AlignRec's sim_target, ...)


def check_stage1(config) -> None:
  """The keys stage 1 (pre-training and extraction) reads."""
  pre = config.pretrain
  if pre.size not in mmenc.SIZES:
    _fail("pretrain.size", pre.size, f"must be one of {tuple(mmenc.SIZES)}")
  if pre.mim_target not in ica.MIM_TARGETS:
    _fail("pretrain.mim_target", pre.mim_target, f"must be one of {tuple(sorted(ica.MIM_TARGETS))}")
  if pre.compute_dtype not in mmenc.COMPUTE_DTYPES:
    _fail("pretrain.compute_dtype", pre.compute_dtype, f"must be one of {tuple(mmenc.COMPUTE_DTYPES)}")
  if pre.matmul_precision not in mmenc.MATMUL_PRECISIONS:
    _fail("pretrain.matmul_precision", pre.matmul_precision, f"must be one of {mmenc.MATMUL_PRECISIONS}")
  for key in ("pretrain.image_size", "pretrain.patch_size", "pretrain.max_text_len", "pretrain.batch_size",
              "pretrain.extract_batch_size", "pretrain.vocab_size"):
    _int(config, key, 1)
  if pre.image_size % pre.patch_size:
    _fail("pretrain.image_size", pre.image_size, f"must be a multiple of pretrain.patch_size={pre.patch_size}")
  _int(config, "pretrain.steps", 0)
  _int(config, "pretrain.warmup_steps", 0)
  _int(config, "train.num_devices", 0)
  _int(config, "seed", 0)
  _number(config, "pretrain.lr", 0.0)
  for key in ("pretrain.text_mask_ratio", "pretrain.image_mask_ratio"):
    _number(config, key, 0.0, 1.0, low_open=False)
  if pre.init_from:  # the converted weights' shape and text length, before the tokenizer and the dataset are built
    init_from.check_architecture(os.path.expanduser(pre.init_from),
                                 dict(mmenc.SIZES[pre.size], patch_size=pre.patch_size, image_size=pre.image_size),
                                 pre.max_text_len)
    init_from.tokenizer_path(config)  # a data.tokenizer that is not the weights' own


def check_probe(config) -> None:
  """What the probe stage reads (its own section, the protocols, the evaluation; stage 2 for mask_modality)."""
  classes = tuple(config.probe.classes)
  if not classes or set(classes) - set(probes.CLASSES):
    _fail("probe.classes", classes, f"must be a non-empty subset of {probes.CLASSES}")
  _int(config, "probe.item_cf_k", 1)
  _number(config, "probe.item_cf_shrink", 0.0, low_open=False)
  check_protocols(config)
  check_eval(config)
  if "mask_modality" in classes:
    check_stage2(config)

