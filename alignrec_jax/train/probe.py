"""The probe stage (`--config.stage=probe`): the paper's intermediate evaluations of item feature tables (the
maths: eval/probes.py), docs/method.md §9.

  python -m alignrec_jax.main --config=configs/lfm2k.py --workdir=/tmp/probe_lfm2k --config.stage=probe \
    --config.probe.features="('all-MiniLM-L6-v2.npy','whisper.npy','vggish.npy','random:384')"

Each entry of `config.probe.features` is one feature table, optionally named as `name=spec`:
  * a `.npy` file (absolute, or relative to the working directory or to `config.data.root`), row i = itemID i;
  * a stage-1 workdir (its orbax feature checkpoint, via train/bridge.py; the mask variants come with it);
  * `random:<d>`: Gaussian features of width d drawn from `config.seed` (the "no information" reference).
An empty list probes the features that `config.data` itself loads (`data.features_from`, else the feature slots).

Classes: `config.probe.classes` (eval/probes.CLASSES); mask_modality trains stage 2 (train/stage2.py) on each table
in its own workdir under `<workdir>/mask_modality/`.

`<workdir>/results.json`:
  {"probe": {feature: {"zero_shot": {"valid": {...}, "test": {...}}, "item_cf": {...},
                       "mask_modality": {"unmasked": {"valid", "test", "best_epoch"}, "zeroed" | "mask_image" |
                                         "mask_text": {...}}}},
   "probe_reference": {"popularity": {"valid": {...}, "test": {...}}},
   "features": {feature: {"source": str, "dim": int}}, "mask_items": path or absent, "seconds": {...}}
With `config.eval.popularity_groups` set, every valid/test dict also holds {"groups": {group: {metric: value}}}.
"""

import copy
import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.errors import ConfigError
from alignrec_jax.eval import probes
from alignrec_jax.eval import ranking
from alignrec_jax.train import bridge
from alignrec_jax.train import checks
from alignrec_jax.train import stage2
from alignrec_jax.train import workdir as workdir_lib


def parse_feature_spec(entry: str) -> tuple[str, str]:
  """'name=spec' -> (name, spec); a bare spec is named after its file or folder ('random:384' -> 'random384')."""
  entry = entry.strip()
  if "=" in entry:
    name, spec = (s.strip() for s in entry.split("=", 1))
  else:
    spec = entry
    if spec.startswith("random:"):
      name = "random" + spec.split(":", 1)[1]
    else:
      base = os.path.basename(os.path.normpath(spec))
      name = base[:-4] if base.endswith(".npy") else base
  if not name or not spec:
    raise ConfigError(f"config.probe.features entry {entry!r}: expected 'spec' or 'name=spec'")
  return name, spec


def load_feature_spec(spec: str, n_items: int, data_root: str, seed: int) -> dict[str, np.ndarray]:
  """The tables of one spec: {"full": [n_items, d]} plus "mask_image"/"mask_text" for a stage-1 workdir."""
  if spec.startswith("random:"):
    try:
      dim = int(spec.split(":", 1)[1])
    except ValueError:
      dim = 0
    if dim < 1:
      raise ConfigError(f"config.probe.features entry {spec!r}: expected random:<width>, e.g. random:384")
    rng = np.random.default_rng([seed, dim])
    return {"full": rng.standard_normal((n_items, dim)).astype(np.float32)}
  path = os.path.expanduser(spec)
  if not os.path.isabs(path) and not os.path.exists(path) and data_root:
    path = os.path.join(os.path.expanduser(data_root), path)
  if os.path.isdir(path):
    tables = {"full": bridge.load_feature_table(path, n_items, "full")}
    for variant in ("mask_image", "mask_text"):
      try:
        tables[variant] = bridge.load_feature_table(path, n_items, variant)
      except mmrec.DataError as e:
        logging.warning("%s: no %s table (%s); mask-modality will only zero rows", path, variant, e)
    return tables
  if not path.endswith(".npy") and not os.path.exists(path):
    raise mmrec.DataError(f"config.probe.features entry {spec!r}: neither a .npy file nor a stage-1 workdir "
                          f"(looked for {path})")
  return {"full": mmrec.load_features(path, n_items)}


def _stage2(config, workdir: str, feature_path: str) -> dict:
  """Trains stage 2 on one feature file in its own workdir (resumable) and returns its best valid/test metrics."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.stage = "train"
    cfg.data = mmrec.interactions_only(cfg.data)
    cfg.data.synthetic = False  # the probe already generated/loaded the data
    cfg.data.image_feat = os.path.abspath(feature_path)
  result = stage2.run(cfg, workdir)
  return {"valid": result["valid"], "test": result["test"], "best_epoch": result["best_epoch"],
          "workdir": os.path.abspath(workdir)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Probes every table of `config.probe.features` (see the module docstring); writes <workdir>/results.json."""
  checks.check_probe(config)
  with workdir_lib.claimed(config, workdir, (), jax.process_index() == 0):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  probe_cfg, ev = config.probe, config.eval
  specs = [parse_feature_spec(e) for e in probe_cfg.features]
  if not specs and config.data.features_from:  # a stage-1 workdir: with its mask variants
    specs = [parse_feature_spec(config.data.features_from)]
  names = [n for n, _ in specs]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.probe.features: duplicate feature names {names}; name them as 'name=spec'")

  # the probed tables replace the dataset's own features: do not require those
  data = bridge.load_dataset(mmrec.interactions_only(config.data) if specs else config.data)
  logging.info("probe on %s", data.summary())
  # with cold-start items: the cold splits too, each ranked over its candidates (masking the other items)
  splits = {name: ranking.over_all_items(data, ranking.make_eval_split(data, name))
            for name in data.held_out_splits()}
  item_groups = ranking.popularity_groups(data, tuple(ev.popularity_groups)) if ev.popularity_groups else None

  tables, sources = {}, {}
  if specs:
    for name, spec in specs:
      tables[name] = load_feature_spec(spec, data.n_items, config.data.root, config.seed)
      sources[name] = spec
  else:
    if not data.features:
      raise ConfigError("nothing to probe: config.probe.features is empty and config.data loads no features")
    for slot, table in data.features.items():
      tables[slot] = {"full": table}
      sources[slot] = f"config.data ({slot} slot)"

  results = {"probe": {}, "features": {}, "seconds": {}}
  popularity = data.item_popularity().astype(np.float32)[:, None]
  results["probe_reference"] = {"popularity": {
      name: probes.evaluate_topk(ranking.topk_items(np.ones((data.n_users, 1), np.float32), popularity, split,
                                              max(ev.topk), ev.batch_users), split, ev, item_groups)
      for name, split in splits.items()}}
  masked = None
  if "mask_modality" in probe_cfg.classes:
    mask_path = os.path.join(workdir, "mask_items.npy")
    masked = probes.masked_item_set(data.n_items, probe_cfg.mask_ratio, config.seed, mask_path,
                             probe_cfg.mask_items)
    results["mask_items"] = os.path.abspath(mask_path)

  for name, variants in tables.items():
    full = variants["full"]
    results["features"][name] = {"source": sources[name], "dim": int(full.shape[1])}
    t0 = time.time()
    results["probe"][name] = probes.probe_features(full, data, splits, probe_cfg.classes, ev, probe_cfg.item_cf_k,
                                            probe_cfg.item_cf_shrink, item_groups)
    results["seconds"][name] = {"zero_shot_item_cf": round(time.time() - t0, 3)}
    logging.info("probe %s (%d-d): %s", name, full.shape[1], json.dumps(
        {c: r["test"].get(ev.valid_metric) for c, r in results["probe"][name].items()}))
    if masked is not None:
      t0 = time.time()
      feat_dir = os.path.join(workdir, "features")
      os.makedirs(feat_dir, exist_ok=True)
      runs = {"unmasked": full, **probes.masked_tables(variants, masked)}
      out = {}
      for variant, table in runs.items():
        path = os.path.join(feat_dir, f"{name}.{variant}.npy")
        atomic.save_npy(path, table)
        out[variant] = _stage2(config, os.path.join(workdir, "mask_modality", name, variant), path)
        logging.info("mask-modality %s/%s: test %s %.4f", name, variant, ev.valid_metric,
                     out[variant]["test"].get(ev.valid_metric, float("nan")))
      results["probe"][name]["mask_modality"] = out
      results["seconds"][name]["mask_modality"] = round(time.time() - t0, 3)

  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("\n%s", probes.format_probe_table(results, ev.valid_metric))
  return results
