"""Baseline parity on lfm2k: one baseline at the parity table's fixed setting, seeds beside the reference numbers.

  python bench/baseline_parity.py --model=bm3 --seeds=3
  python bench/baseline_parity.py --model=freedom --seeds=3 --workdir=/tmp/parity
  python bench/baseline_parity.py --model=bm3 --seeds=10     # seeds 999 .. 1008 (the reference has 999 .. 1001)
  python bench/baseline_parity.py --model=lgmrec --seeds=3    # whisper audio + MiniLM text, MMRec's patience 20

The fixed setting (no grid): configs/lfm2k.py with all-MiniLM-L6-v2 features in both the image and the text slot,
lr 1e-3 without decay, batch 2048, early stopping on valid Recall@20 with patience 30, test Recall@20 at the best
valid epoch, plus each model's own hyper-parameters below. The rows measured against enoche/MMRec itself (LayerGCN,
LGMRec) use shared/tools/run_reference.sh's setting instead: whisper.npy audio features in the image slot, MiniLM
text in the text slot, and MMRec's own patience of 20 (overall.yaml's stopping_step); each row's `settings` says
which. `--image_feat` / `--text_feat` replace a row's feature files (the reference numbers stay those of the row's
own setting: the summary then says `reference_setting_differs`). Every seed is one `alignrec_jax.main.run` (stage 2) in
<workdir>/<model>/seed<S>/, which records its resolved config in parity_run.json: a finished run under the same
config is reused, an interrupted one resumes from its checkpoint, a run under another config is refused.

The reference numbers are data, not settings: the PyTorch models of the MMRec toolbox, run by this project at the same
setting and seeds; VBPR, FREEDOM and BM3 in the copy that the AlignRec authors ship beside their model
(github.com/sjtulyf123/AlignRec_CIKM24, src/models/), LayerGCN and LGMRec in enoche/MMRec itself (commit e775373,
through shared/tools/run_reference.sh). The authors' copy of BM3 sets its image features to None, so its BM3 trains
on the text slot alone; the setting below asks ours for the same (model.bm3.text_only).

Prints one line per seed (ours, the reference's where it has that seed), the mean and sample std of both and the
relative gap of the means, then ONE JSON line:
  {"model", "metric", "seeds", "ours": {"values", "mean", "std"}, "reference": {"seeds", "values", "mean", "std",
   "source"}, "gap_pct", "within_2pct", "settings", "reference_setting_differs"}
"""

import copy
import json
import math
import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

from alignrec_jax import main as main_lib  # noqa: E402
from alignrec_jax.data import atomic  # noqa: E402
from configs import lfm2k  # noqa: E402

METRIC = "recall@20"
FEATURES = "all-MiniLM-L6-v2.npy"
SHARED = {"data.image_feat": FEATURES, "data.text_feat": FEATURES, "optim.lr": 1e-3, "optim.lr_decay": 1.0,
          "train.batch_size": 2048, "train.stopping_step": 30}
# run_reference.sh's default on lfm2k: whisper audio in the image slot, MiniLM text; MMRec's overall.yaml patience
MMREC_TOOL = {"data.image_feat": "whisper.npy", "data.text_feat": FEATURES, "train.stopping_step": 20}
SOURCE = ("MMRec toolbox PyTorch models as shipped by the AlignRec authors (github.com/sjtulyf123/AlignRec_CIKM24), "
          "run by this project on lfm2k at this setting: test Recall@20 at the best valid epoch")
MMREC_SOURCE = ("MMRec toolbox PyTorch models (github.com/enoche/MMRec, commit e775373), run by this project on lfm2k "
                "with shared/tools/run_reference.sh at this setting: test Recall@20 at the best valid epoch")
SOURCES = {"layergcn": MMREC_SOURCE, "lgmrec": MMREC_SOURCE}

# model: (its own settings beside SHARED, the reference's test Recall@20 per seed)
PARITY = {
    "vbpr": ({"model.vbpr.reg_weight": 1.0},
             {999: 0.4152, 1000: 0.4141, 1001: 0.4228}),
    "freedom": ({"model.freedom.dropout": 0.9, "model.freedom.reg_weight": 0.03, "model.freedom.knn_k": 10,
                 "model.freedom.n_mm_layers": 1, "model.freedom.n_ui_layers": 2, "model.freedom.mm_image_weight": 0.1},
                {999: 0.4148, 1000: 0.4195, 1001: 0.4130}),
    "bm3": ({"model.bm3.n_layers": 1, "model.bm3.dropout": 0.5, "model.bm3.reg_weight": 0.1,
             "model.bm3.cl_weight": 2.0, "model.bm3.text_only": True},
            {999: 0.3360, 1000: 0.3434, 1001: 0.3556}),
    "layergcn": ({**MMREC_TOOL, "model.layergcn.n_layers": 4, "model.layergcn.dropout": 0.0,
                  "model.layergcn.reg_weight": 1e-2},
                 {999: 0.3637, 1000: 0.3467, 1001: 0.3502}),
    "lgmrec": ({**MMREC_TOOL, "model.lgmrec.n_ui_layers": 2, "model.lgmrec.n_mm_layers": 2,
                "model.lgmrec.n_hyper_layer": 1, "model.lgmrec.hyper_num": 4, "model.lgmrec.keep_rate": 0.5,
                "model.lgmrec.alpha": 0.3, "model.lgmrec.cl_weight": 1e-4, "model.lgmrec.reg_weight": 1e-6},
               {999: 0.3919, 1000: 0.4029, 1001: 0.3930}),
}

_MODEL = flags.DEFINE_enum("model", "bm3", sorted(PARITY), "Baseline to measure.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds: 999, 1000, ... (the reference's are 999, 1000, 1001).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/baseline_parity", "Runs go to <workdir>/<model>/seed<S>/.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "lfm2k folder (default: configs/lfm2k.py's, ../shared/data/lfm2k).")
_IMAGE_FEAT = flags.DEFINE_string("image_feat", None, "Image-slot feature file of lfm2k (default: the row's).")
_TEXT_FEAT = flags.DEFINE_string("text_feat", None, "Text-slot feature file of lfm2k (default: the row's).")


def settings(model: str, image_feat: Optional[str] = None, text_feat: Optional[str] = None) -> dict:
  """The dotted-key overrides of `model`'s parity run (shared setting + its own, then the feature files given)."""
  out = {**SHARED, **PARITY[model][0]}
  for key, value in (("data.image_feat", image_feat), ("data.text_feat", text_feat)):
    if value is not None:
      out[key] = value
  return out


def apply(config, model: str, seed: int, overrides: dict):
  """A copy of `config` for one run: model name, seed and the dotted-key `overrides` (every key must exist)."""
  config = copy.deepcopy(config)
  config.model.name = model
  config.seed = int(seed)
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    if leaf not in node:
      raise ValueError(f"setting {key!r}: the config has no such key")
    node[leaf] = value
  return config


def mean_std(values: list) -> dict:
  """{"mean", "std" (sample std, 0 for one value), "values"}."""
  mean = sum(values) / len(values)
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
  return {"mean": mean, "std": math.sqrt(var), "values": values}


def flatten(tree: dict, prefix: str = "") -> dict:
  """{dotted key: leaf} of nested dicts."""
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def run_seed(config, workdir: str) -> dict:
  """results.json of one run in `workdir`, trained (or resumed) unless a finished run of the same config is there."""
  os.makedirs(workdir, exist_ok=True)
  identity = json.loads(config.to_json_best_effort())
  id_path, results_path = os.path.join(workdir, "parity_run.json"), os.path.join(workdir, "results.json")
  if os.path.exists(id_path):
    with open(id_path, encoding="utf-8") as f:
      recorded = json.load(f)
    if recorded != identity:
      old, new = flatten(recorded), flatten(identity)
      differ = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
      raise ValueError(f"{workdir} holds a run of another config ({', '.join(differ[:3])}"
                       f"{', ...' if len(differ) > 3 else ''} differ): use another --workdir")
    if os.path.exists(results_path):
      with open(results_path, encoding="utf-8") as f:
        return json.load(f)
  else:
    atomic.write_json(id_path, identity)
  return main_lib.run(config, workdir)


def gap_pct(ours: float, reference: float) -> float:
  """Relative gap of our mean to the reference mean, in percent (negative: ours is lower)."""
  return 100.0 * (ours - reference) / reference


def measure(model: str, n_seeds: int, workdir: str, data_root: str = "", image_feat: Optional[str] = None,
            text_feat: Optional[str] = None) -> dict:
  """Trains (or reuses) every seed's run and returns the summary that the JSON line prints."""
  if n_seeds < 1:
    raise ValueError(f"--seeds={n_seeds} must be >= 1")
  reference = PARITY[model][1]
  config = lfm2k.get_config()
  if data_root:
    config.data.root = data_root
  overrides = settings(model, image_feat, text_feat)
  seeds = [int(config.seed) + k for k in range(n_seeds)]
  values = []
  for seed in seeds:
    results = run_seed(apply(config, model, seed, overrides), os.path.join(workdir, model, f"seed{seed}"))
    values.append(float(results["test"][METRIC]))
  ours = mean_std(values)
  ref = mean_std([reference[s] for s in sorted(reference)]) if reference else {"mean": None, "std": None,
                                                                                 "values": []}
  gap = gap_pct(ours["mean"], ref["mean"]) if reference else None
  return {"model": model, "metric": f"test {METRIC}", "seeds": seeds, "ours": ours,
          "reference": {"seeds": sorted(reference), **ref, "source": SOURCES.get(model, SOURCE)},
          "gap_pct": None if gap is None else round(gap, 2), "within_2pct": None if gap is None else abs(gap) <= 2.0,
          "settings": overrides, "reference_setting_differs": overrides != settings(model)}


def report(summary: dict) -> str:
  """The human-readable table printed before the JSON line."""
  reference = dict(zip(summary["reference"]["seeds"], summary["reference"]["values"]))
  lines = [f"{summary['model']} on lfm2k, {summary['metric']} (reference: {summary['reference']['source']})",
           "seed   ours     reference"]
  for seed, value in zip(summary["seeds"], summary["ours"]["values"]):
    ref = f"{reference[seed]:.4f}" if seed in reference else "-"
    lines.append(f"{seed:<6} {value:.4f}   {ref}")
  o, r = summary["ours"], summary["reference"]
  if summary["gap_pct"] is None:
    lines.append(f"mean   {o['mean']:.4f} ± {o['std']:.4f} ({len(o['values'])} seeds)   (no reference recorded)")
    return "\n".join(lines)
  lines.append(f"mean   {o['mean']:.4f} ± {o['std']:.4f} ({len(o['values'])} seeds)   {r['mean']:.4f} ± "
               f"{r['std']:.4f} ({len(r['values'])} seeds)   gap {summary['gap_pct']:+.2f}%"
               f"{'' if summary['within_2pct'] else '  (outside 2%)'}")
  if summary["reference_setting_differs"]:
    lines.append("(the reference was measured at the row's own feature files, not these)")
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # one line per epoch and seed otherwise
  try:
    summary = measure(_MODEL.value, _SEEDS.value, _WORKDIR.value, _DATA_ROOT.value, _IMAGE_FEAT.value,
                      _TEXT_FEAT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(report(summary))
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
