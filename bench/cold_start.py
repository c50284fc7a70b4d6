"""Where content matters: AlignRec on several feature tables under the cold-start (or sparse-user) protocol.

ml100k_posters, stage 1 judged on cold items (the stage-1 workdirs come from bench/stage1_quality.py, run once with
the config's [CLS] bag-of-words term and once without it):

  python bench/stage1_quality.py --config=configs/ml100k_posters.py --workdir=/tmp/s1_bow
  python bench/stage1_quality.py --config=configs/ml100k_posters.py --config.pretrain.cls_bow_weight=0 \
      --workdir=/tmp/s1_nobow
  python bench/cold_start.py --config=configs/ml100k_posters.py --config.data.cold_items=0.2 --seeds=3 \
      --stage1=/tmp/s1_bow --stage1_no_cls_bow=/tmp/s1_nobow --text_tfidf --workdir=/tmp/cold_ml100k

lfm2k, the protocol checked where the answer is known (real features against random ones of the same width):

  python bench/cold_start.py --config=configs/lfm2k.py --config.data.cold_items=0.2 --seeds=1 \
      --features=all-MiniLM-L6-v2.npy,whisper.npy,vggish.npy --random_twins --workdir=/tmp/cold_lfm2k

Arms (each an `alignrec_jax.compare` run of AlignRec in <workdir>/<arm>/, same data, split, sampler and evaluation):
  mmenc_ica                 the feature table of <stage1>/pretrained (ICA pre-training)
  mmenc_random_init         the feature table of <stage1>/random (the same encoder at its initialisation)
  text_tfidf                TF-IDF of the item texts (the words of data.items_file's text column that occur in at
                            least two items; rows L2-normalised), written to <workdir>/tables/
  mmenc_ica_no_cls_bow      the feature table of <stage1_no_cls_bow>/pretrained
  <file stem>               a feature file of data.root (--features), and with --random_twins random_<d>: Gaussian
                            features of its width d (seeded by --table_seed)
  lightgcn_id_only          LightGCN without features: the floor a content model must beat on cold items
The sparse-user protocol is the same command with --config.data.train_fraction=0.2 instead of cold_items.
Model selection uses valid only (config.eval.select_on, warm valid by default); test is read at the selected epoch.
Finished runs are reused and interrupted ones resume, so the command can be re-run until it completes. Writes
<workdir>/cold_start.json and cold_start.md (cold test, cold valid and warm metrics, mean ± sample std over the
seeds) and prints the table and the wall time of the whole command.
"""

import collections
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

# compare's own flags (--config, --workdir, --seeds, and --config.* overrides) serve here too; --models is not used
from alignrec_jax import compare  # noqa: E402
from alignrec_jax.data import atomic  # noqa: E402
from alignrec_jax.data import content  # noqa: E402
from alignrec_jax.data import mmrec  # noqa: E402

compare.define_flags()
_STAGE1 = flags.DEFINE_string("stage1", "", "bench/stage1_quality.py workdir (pretrained/ and random/)")
_STAGE1_NO_BOW = flags.DEFINE_string("stage1_no_cls_bow", "", "the same, pre-trained without the [CLS] term")
_TFIDF = flags.DEFINE_bool("text_tfidf", False, "add the TF-IDF table of the item texts (data.items_file)")
_FEATURES = flags.DEFINE_list("features", [], "feature files under data.root, one arm each")
_TWINS = flags.DEFINE_bool("random_twins", False, "with --features: a random table of each file's width")
_TABLE_SEED = flags.DEFINE_integer("table_seed", 0, "seed of the random tables")
_ID_ONLY = flags.DEFINE_bool("id_only", True, "add LightGCN without features")

COLUMNS = ("test_cold recall@20", "test_cold ndcg@20", "valid_cold recall@20", "test recall@20", "test ndcg@20",
           "valid recall@20")


def text_tfidf(texts: list) -> np.ndarray:
  """[n_items, n_words] float32 TF-IDF (raw counts x log(n / df)) of the lower-cased words that occur in at least two
  texts, rows L2-normalised (a text without such words is a zero row)."""
  docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
  df = collections.Counter(w for d in docs for w in set(d))
  vocab = {w: j for j, w in enumerate(sorted(w for w, c in df.items() if c >= 2))}
  table = np.zeros((len(docs), len(vocab)), np.float32)
  for i, d in enumerate(docs):
    for w in d:
      if w in vocab:
        table[i, vocab[w]] += 1.0
  idf = np.log(len(docs) / np.array([df[w] for w in vocab], np.float64))
  table *= idf.astype(np.float32)
  return table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)


def _item_texts(config, n_items: int) -> list:
  table = content.read_items(os.path.join(config.data.root, config.data.items_file), check_images=False)
  if table.n_items != n_items:
    raise ValueError(f"{table.path}: {table.n_items} items, the interactions have {n_items}")
  return list(table.texts)


def arms(config, workdir: str, n_items: int) -> list:
  """[(arm, model, {config.data key: value})], writing the derived tables first."""
  out = []
  if _STAGE1.value:
    out.append(("mmenc_ica", "alignrec", {"features_from": os.path.join(_STAGE1.value, "pretrained")}))
  if _STAGE1.value:
    out.append(("mmenc_random_init", "alignrec", {"features_from": os.path.join(_STAGE1.value, "random")}))
  tables = os.path.join(workdir, "tables")
  os.makedirs(tables, exist_ok=True)
  if _TFIDF.value:
    path = os.path.join(tables, "text_tfidf.npy")
    if not os.path.exists(path):
      atomic.save_npy(path, text_tfidf(_item_texts(config, n_items)))
    out.append(("text_tfidf", "alignrec", {"image_feat": path}))
  if _STAGE1_NO_BOW.value:
    out.append(("mmenc_ica_no_cls_bow", "alignrec", {"features_from": os.path.join(_STAGE1_NO_BOW.value,
                                                                                    "pretrained")}))
  for name in _FEATURES.value:
    path = os.path.join(config.data.root, name)
    out.append((os.path.splitext(name)[0], "alignrec", {"image_feat": path}))
    if _TWINS.value:
      width = mmrec.load_features(path, n_items).shape[1]
      twin = os.path.join(tables, f"random_{width}.npy")
      if not os.path.exists(twin):
        rng = np.random.default_rng([_TABLE_SEED.value, width])
        atomic.save_npy(twin, rng.standard_normal((n_items, width)).astype(np.float32))
      out.append((f"random_{width}", "alignrec", {"image_feat": twin}))
  if _ID_ONLY.value:
    out.append(("lightgcn_id_only", "lightgcn", {"image_feat": ""}))
  return out


def _cell(entry: dict, split: str, metric: str) -> str:
  stats = entry.get(split, {}).get(metric)
  return f"{stats['mean']:.4f} ± {stats['std']:.4f}" if stats else "n/a"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS["models"].present:
    raise app.UsageError("--models is not used here: the arms come from the flags (see the module docstring)")
  start = time.time()
  config = flags.FLAGS.config.copy_and_resolve_references()
  workdir = os.path.expanduser(flags.FLAGS.workdir)
  with config.unlocked():
    config.stage = "train"
  merged = {"dataset": config.data.name, "cold_items": config.data.cold_items,
            "train_fraction": config.data.train_fraction, "split_seed": config.data.split_seed,
            "select_on": config.eval.select_on, "models": {}}
  data = mmrec.load_dataset(config.data)  # the split every arm trains on: its cold items and the item count
  for arm, model, data_overrides in arms(config, workdir, data.n_items):
    arm_config = config.copy_and_resolve_references()
    with arm_config.unlocked():
      arm_config.data = mmrec.interactions_only(arm_config.data)
      arm_config.data.update(data_overrides)
    result = compare.compare(arm_config, [model], flags.FLAGS.seeds, os.path.join(workdir, arm))
    merged["models"][arm] = dict(result["models"][model], model=model, data=data_overrides)
    atomic.write_json(os.path.join(workdir, "cold_start.json"), merged)
  # without cold-start items (the sparse-user protocol) the cold columns would all be n/a
  columns = [c for c in COLUMNS if data.cold_items or c.split(" ")[0] not in mmrec.COLD_SPLITS]
  header = "| arm | model | seeds | " + " | ".join(columns) + " |"
  lines = [header, "|" + "---|" * (len(columns) + 3)]
  for arm, entry in merged["models"].items():
    cells = [_cell(entry, *c.split(" ")) for c in columns]
    lines.append(f"| {arm} | {entry['model']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
  caption = "Metrics at the selected epoch, mean ± sample std over seeds"
  if data.cold_items:
    caption += "; valid_cold and test_cold rank the cold items only" + "".join(
        f"; {name} ranks {len(items)} items, where a random order has recall@20 = {min(20, len(items))}"
        f"/{len(items)} = {min(20, len(items)) / len(items):.4f}" for name, items in data.cold_items.items())
  minutes = (time.time() - start) / 60
  protocol = (f"data.cold_items={config.data.cold_items}, data.train_fraction={config.data.train_fraction}, "
              f"data.split_seed={config.data.split_seed}, selected on {config.eval.select_on} "
              f"{config.eval.valid_metric}")
  text = f"# {config.data.name}: {protocol}\n\n{caption}.\n\n" + "\n".join(lines) + "\n"
  atomic.write_text(os.path.join(workdir, "cold_start.md"), text)
  print(text)
  print(f"wall time of this command: {minutes:.1f} min (finished runs are reused, so a rerun is quicker)")


if __name__ == "__main__":
  app.run(main)
