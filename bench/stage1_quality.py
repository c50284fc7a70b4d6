"""Does ICA pre-training help? Zero-shot Recall@20 of pre-trained vs randomly initialised MMEnc features.

  python bench/stage1_quality.py --config=configs/ml100k_posters.py --workdir=/tmp/stage1_quality

Runs stage 1 twice with the same config and seed in `<workdir>/pretrained` (pretrain.steps from the config) and
`<workdir>/random` (pretrain.steps=0: the same encoder at its initialisation), extracts both feature tables and scores
them zero-shot (docs/method.md §9): a user is the mean of the L2-normalised features of the user's train items,
items are ranked by cosine to it with train items masked, metrics of `eval/ranking.evaluate` on the test (and valid)
split. Existing stage-1 work in the workdir is reused. Prints the ICA losses (first and last logged window) and ends
with one JSON line.

Item-CF (docs/method.md §9: ItemKNNCBF over the full table, `config.probe.item_cf_k` neighbours, shrink
`config.probe.item_cf_shrink`) scores the table's neighbourhoods, which stage 2's item-item kNN graph is built from.

Each table is also scored with its column mean removed ("centred"): cosine ranking rewards a table whose rows share
one direction differently from one whose rows are spread out, and pre-training changes exactly that (ITC spreads the
[CLS] rows), so the raw comparison alone can mislead. For scale, the same two scores of the encoder's own text input
as a bag of words (multi-hot over the tokenizer's pieces, special tokens left out): what the text alone carries.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ml100k_posters.py", "stage-1 config")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/stage1_quality", "where both stage-1 runs live")


def zero_shot(data, features, split) -> dict:
  """Metrics on `split` (ranking.make_eval_split) of the zero-shot user = mean of the user's normalised train-item
  features, cosine ranking."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alignrec_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  items = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  indptr, indices = data.train_csr()
  sums = np.add.reduceat(items[indices], indptr[:-1].clip(max=len(indices) - 1), axis=0)
  sums[np.diff(indptr) == 0] = 0.0  # users without train items (none are evaluated)
  users = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
  return ranking.evaluate(users.astype(np.float32), items.astype(np.float32), split)


def centred(features):
  """`features` with the column mean removed (the table's common direction)."""
  return features - features.mean(axis=0, keepdims=True)


def bag_of_words(tokens, special_ids):
  """Multi-hot [n_items, vocab] of the token ids of each item's text, the tokenizer's `special_ids` left out."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  vocab = max(int(tokens.max()), *special_ids) + 1
  out = np.zeros((len(tokens), vocab), np.float32)
  rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
  out[rows, tokens.reshape(-1)] = 1.0
  out[:, list(special_ids)] = 0.0
  return out


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from alignrec_jax.data import mmrec  # pylint: disable=g-import-not-at-top
  from alignrec_jax.eval import probes, ranking  # pylint: disable=g-import-not-at-top
  from alignrec_jax.train import bridge, pretrain  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  out = {"device": jax.devices()[0].device_kind, "pretrain_steps": config.pretrain.steps, "size": config.pretrain.size}
  tables = {}
  for name, steps in (("pretrained", config.pretrain.steps), ("random", 0)):
    run = config.copy_and_resolve_references()
    run.pretrain.steps = steps
    workdir = os.path.join(_WORKDIR.value, name)
    start = time.perf_counter()
    summary = pretrain.pretrain(run, workdir)
    pretrain.extract(run, workdir)
    out[f"{name}_stage1_s"] = round(time.perf_counter() - start, 1)
    if steps:
      for key in ("mlm", "mim", "mlm_acc", "loss") + (("bow",) if run.pretrain.cls_bow_weight else ()):
        out[f"ica_{key}_first"] = round(summary["first"][key], 4)
        out[f"ica_{key}_last"] = round(summary["last"][key], 4)
    data = mmrec.load_dataset(mmrec.interactions_only(run.data))
    splits = {split: ranking.make_eval_split(data, split) for split in ("valid", "test")}  # once per dataset load
    tables[name] = {v: bridge.load_feature_table(workdir, data.n_items, v) for v in bridge.VARIANTS}
    if name == "random":  # the text as a bag of words: the same items and tokenizer in both runs
      tokenizer, items = pretrain._load_items(run, workdir)  # pylint: disable=protected-access
      tables["bow"] = {"full": bag_of_words(items["tokens"], tokenizer.special_ids)}
    for table_name in [name] + (["bow"] if name == "random" else []):
      for variant, table in tables[table_name].items():
        for form, feats in (("", table), ("_centred", centred(table))):
          for split in splits:
            metrics = zero_shot(data, feats, splits[split])
            for metric in ("recall@20", "ndcg@20"):
              out[f"{table_name}_{variant}{form}_{split}_{metric}"] = metrics[metric]
      # item-CF (docs/method.md §9): the table's kNN neighbourhoods, which stage 2's item-item graph is built from
      cf = probes.probe_features(tables[table_name]["full"], data, splits, ("item_cf",), run.eval,
                                 run.probe.item_cf_k, run.probe.item_cf_shrink)["item_cf"]
      for split in splits:
        for metric in ("recall@20", "ndcg@20"):
          out[f"{table_name}_item_cf_{split}_{metric}"] = cf[split][metric]
  for variant in bridge.VARIANTS:
    for form in ("", "_centred"):
      logging.info("zero-shot test recall@20 (%s%s): pre-trained %.4f vs random init %.4f", variant, form,
                   out[f"pretrained_{variant}{form}_test_recall@20"], out[f"random_{variant}{form}_test_recall@20"])
  logging.info("zero-shot test recall@20 of the text as a bag of words: %.4f (centred %.4f)",
               out["bow_full_test_recall@20"], out["bow_full_centred_test_recall@20"])
  for split in ("valid", "test"):
    logging.info("item-CF %s recall@20: pre-trained %.4f vs random init %.4f (bag of words %.4f)", split,
                 out[f"pretrained_item_cf_{split}_recall@20"], out[f"random_item_cf_{split}_recall@20"],
                 out[f"bow_item_cf_{split}_recall@20"])
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
