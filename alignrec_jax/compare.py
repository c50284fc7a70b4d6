"""Several recommenders × seeds under one protocol (same data, splits, sampler, trainer, evaluation) → one table.

  python -m alignrec_jax.compare --config=configs/lfm2k.py \
      --models=alignrec,lightgcn,vbpr,bm3,freedom,mgcn --seeds=3 --workdir=/tmp/compare_lfm2k
  python -m alignrec_jax.compare --config=configs/lfm2k.py --models=lightgcn --grid --workdir=/tmp/grid_lfm2k

Each run is `alignrec_jax.train.stage2.run` with config.model.name = <model> and config.seed = <seed> (seeds
config.seed, config.seed + 1, ...), in <workdir>/<model>/seed<seed>/ (its results.json, checkpoints and the
compare_run.json naming its model, seed and overrides). A run whose results.json exists is not trained again; an
interrupted one resumes from its checkpoint. --config.* overrides apply to every model (a model's own
hyper-parameters are --config.model.<name>.<key>).

--grid first trains every combination of the model's hyper-parameter grid (its `hyper_grid()`; AlignRec's is
docs/method.md §7; --grid_keys restricts it to some of its keys) with the first seed, in
<workdir>/<model>/grid/<key><value>_.../, and keeps the combination with the best VALID metric (--select_metric,
default recall@20; the first one on ties); the test split plays no part in the choice. The seeds then run with that
combination (the first seed's run is the grid run itself).

A run directory reuses its results.json only if its compare_run.json records the same model, seed, overrides and
resolved config; otherwise it is refused with the differing keys named.

Output: <workdir>/comparison.json
  {"metrics": [...], "models": {name: {"seeds": [...], "overrides": {...}, "runs": {seed: {"workdir", "best_epoch",
   "valid", "test"}}, "test": {metric: {"mean", "std", "values"}}, "valid": {...}, "grid": [...]}}}
and <workdir>/comparison.md (mean ± sample std over seeds of test Recall/NDCG@10/20), also printed.

With cold-start items (--config.data.cold_items) every run's results.json also has "valid_cold"/"test_cold" (ranked
over the held-out cold items only, at the same best epoch): each run in "runs" keeps them (a grid run's summary its
"test_cold"), the model's entry gains their mean ± std as "valid_cold"/"test_cold" (a split counts only if every
seed's run has it), and the table gains "cold test recall@20" / "cold test ndcg@20" columns after the warm ones
("n/a" for a model without them). Without cold-start items the output is exactly the warm one.
"""

import copy
import itertools
import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from alignrec_jax import report
from alignrec_jax.data import atomic
from alignrec_jax.data.mmrec import COLD_SPLITS
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.data.mmrec import HELD_OUT_SPLITS
from alignrec_jax.errors import ConfigError
from alignrec_jax.models import get_model
from alignrec_jax.train import distributed
from alignrec_jax.train import preemption
from alignrec_jax.train import stage2
from alignrec_jax.train import workdir as workdir_lib

TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
COLD_TABLE_METRICS = ("recall@20", "ndcg@20")  # cold-start columns, after the warm ones
# what a user fixes (an unknown model, --seeds=0, a busy or foreign workdir, a bad config value): one line, exit 1
USER_ERRORS = (ConfigError, DataError, workdir_lib.WorkdirError, FloatingPointError, OSError)


def define_flags() -> None:
  """The command line's flags (also the benches' that drive `compare`); defined when a program asks, never at
  import."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for every run and the comparison table.")
  flags.DEFINE_list("models", ["alignrec", "lightgcn", "vbpr", "bm3", "freedom", "mgcn"],
                    "Registered model names (config.model.name) to compare.")
  flags.DEFINE_integer("seeds", 3, "Seeds per model: config.seed, config.seed + 1, ...")
  flags.DEFINE_bool("grid", False, "Select each model's hyper-parameters on its grid (valid metric) first.")
  flags.DEFINE_string("select_metric", "recall@20", "Valid metric that selects the grid combination.")
  flags.DEFINE_list("grid_keys", [], "With --grid: search only these grid keys (e.g. "
                    "model.vbpr.reg_weight); the others keep their config values. Empty = every key.")
  flags.mark_flags_as_required(["config", "workdir"])


def hyper_grid(model_name: str) -> dict:
  """{dotted config key: [values]} of the model's grid ({} = only its defaults)."""
  return get_model(model_name).hyper_grid()


def grid_combinations(grid: dict) -> list:
  """Every combination of `grid` as a list of {key: value} dicts, in the grid's order (the last key varies fastest)."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def apply_overrides(config, model_name: str, seed: int, overrides: dict):
  """A copy of `config` for one run: model name, seed and the dotted-key `overrides` (keys must exist)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.name = model_name
    config.seed = int(seed)
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(f"grid key {key!r}: config has no section {part!r}")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"grid key {key!r}: config has no key {parts[-1]!r} (known: {sorted(node.keys())})")
    current = node[parts[-1]]
    node[parts[-1]] = float(value) if isinstance(current, float) else value
  return config



def train_once(config, model_name: str, seed: int, overrides: dict, workdir: str) -> dict:
  """results.json of one run, training it unless it is already there (then its recorded settings must match).

  The recorded identity holds the run's settings as a resume compares them (workdir.fingerprint: less the other
  models' config.model.<name> sections, export and logging keys) and its train.epochs, so a result trained under
  other settings (a config file changed since, another --config.* override) is refused instead of silently
  reused."""
  os.makedirs(workdir, exist_ok=True)
  run_config = apply_overrides(config, model_name, seed, overrides)
  identity = json.loads(json.dumps({"model": model_name, "seed": int(seed), "overrides": overrides,
                                    "config": _settings(json.loads(run_config.to_json()))}))
  id_path = os.path.join(workdir, "compare_run.json")
  recorded_before = os.path.exists(id_path)  # results.json counts only with an identity that vouches for it
  if recorded_before:
    with open(id_path, encoding="utf-8") as f:
      recorded = json.load(f)
    checked = identity
    if "config" not in recorded:  # written before the identity held the config: only the rest can be checked
      logging.warning("%s was recorded without its config (an older alignrec_jax): checking model, seed and "
                      "overrides only; its settings may differ from this config's", workdir)
      checked = {k: v for k, v in identity.items() if k != "config"}
    else:  # the same filter on both sides, whichever version recorded it (nested or flat, more keys or fewer)
      recorded = {**recorded, "config": _settings(recorded["config"])}
    if recorded != checked:
      old, new = workdir_lib.flatten(recorded), workdir_lib.flatten(checked)
      differ = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
      shown = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in differ[:5])
      raise ConfigError(f"{workdir} holds a different run ({len(differ)} settings differ: {shown}"
                        f"{', ...' if len(differ) > 5 else ''}): use another --workdir")
  else:
    atomic.write_json(id_path, identity)
  results_path = os.path.join(workdir, "results.json")
  if recorded_before and os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      logging.info("%s seed %d: results already in %s", model_name, seed, results_path)
      return json.load(f)
  logging.info("training %s, seed %d, overrides %s in %s", model_name, seed, overrides, workdir)
  return stage2.run(run_config, workdir)


def _settings(config_json: dict) -> dict:
  """What a results.json depends on: the keys a resume compares (workdir.fingerprint), and the epochs trained."""
  flat = workdir_lib.flatten(config_json)
  return {**workdir_lib.fingerprint(flat, 2), "train.epochs": flat.get("train.epochs")}


def select_on_grid(config, model_name: str, seed: int, workdir: str, metric: str,
                   grid_keys=()) -> tuple[dict, list, str]:
  """(best overrides, every grid run's summary, the best run's workdir) on the VALID `metric`.

  grid_keys: search only these keys of the model's grid (the others keep their config values); () = all.
  """
  grid = hyper_grid(model_name)
  if grid_keys:
    unknown = sorted(set(grid_keys) - set(grid))
    if unknown:
      raise ConfigError(f"--grid_keys {unknown} are not in the grid of {model_name!r}: {sorted(grid)}")
    grid = {k: v for k, v in grid.items() if k in grid_keys}
  combos = grid_combinations(grid)
  if not combos or combos == [{}]:
    return {}, [], ""
  summaries, best, best_value, best_dir = [], {}, -math.inf, ""
  for i, overrides in enumerate(combos):
    name = "_".join(f"{k.split('.')[-1]}{v}" for k, v in overrides.items())  # e.g. lr0.001_reg_weight0.1
    run_dir = os.path.join(workdir, model_name, "grid", name)
    results = train_once(config, model_name, seed, overrides, run_dir)
    if metric not in results.get("valid", {}):
      raise ConfigError(f"valid metric {metric!r} missing from {run_dir}/results.json (has "
                        f"{sorted(results.get('valid', {}))}); set --select_metric or config.eval.topk")
    value = float(results["valid"][metric])
    summaries.append({"overrides": overrides, "workdir": run_dir, "best_epoch": results.get("best_epoch"),
                      f"valid_{metric}": value, "test": {k: results["test"].get(k) for k in TABLE_METRICS},
                      **({"test_cold": {k: results["test_cold"].get(k) for k in COLD_TABLE_METRICS}}
                         if isinstance(results.get("test_cold"), dict) else {})})
    if value > best_value:
      best, best_value, best_dir = overrides, value, run_dir
  logging.info("%s: grid of %d selected %s (valid %s %.4f)", model_name, len(combos), best, metric, best_value)
  return best, summaries, best_dir


def mean_std(values: list) -> dict:
  """{"mean", "std" (sample std, 0 for one value), "values"}."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return {"mean": mean, "std": std, "values": values}


def summarise(runs: dict) -> dict:
  """Per-split mean ± std over the seeds' runs {seed: results}, for each of HELD_OUT_SPLITS that every run has."""
  out = {}
  for split in HELD_OUT_SPLITS:
    if split in COLD_SPLITS and not all(isinstance(r.get(split), dict) for r in runs.values()):
      continue
    keys = sorted(set.intersection(*(set(r[split]) for r in runs.values())))
    out[split] = {k: mean_std([float(r[split][k]) for r in runs.values()]) for k in keys}
  return out



def markdown_table(comparison: dict, metrics=TABLE_METRICS, cold_metrics=COLD_TABLE_METRICS) -> str:
  """The comparison as a Markdown table: one row per model, test mean ± std over its seeds, and the cold-start test
  `cold_metrics` after the warm columns when any model has them."""
  cold = list(cold_metrics) if report.has_cold(comparison) else []
  head = "| model | seeds | " + " | ".join(f"test {m}" for m in metrics) + " | valid recall@20 |"
  head += "".join(f" cold test {m} |" for m in cold)
  lines = [head, "|" + "---|" * (len(metrics) + 3 + len(cold))]
  for name, entry in comparison["models"].items():
    cells = []
    for m in metrics:
      s = entry["test"].get(m)
      cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "n/a")
    v = entry["valid"].get("recall@20")
    row = f"| {name} | {len(entry['seeds'])} | " + " | ".join(cells) + (f" | {v['mean']:.4f} |" if v else " | n/a |")
    for m in cold:
      s = entry.get("test_cold", {}).get(m)
      row += f" {s['mean']:.4f} ± {s['std']:.4f} |" if s else " n/a |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def compare(config, models: list, n_seeds: int, workdir: str, grid: bool = False,
            select_metric: str = "recall@20", grid_keys=()) -> dict:
  """Trains every model × seed (after the grid selection with `grid`) and writes comparison.json / .md."""
  if n_seeds < 1:
    raise ConfigError(f"--seeds={n_seeds} must be >= 1")
  for name in models:
    get_model(name)  # an unknown name fails before any training
  os.makedirs(workdir, exist_ok=True)
  seeds = [int(config.seed) + k for k in range(n_seeds)]
  comparison = {"workdir": workdir, "dataset": config.data.name, "metrics": list(TABLE_METRICS),
                "select_metric": select_metric if grid else None, "models": {}}
  for name in models:
    overrides, grid_runs, grid_dir = ({}, [], "")
    if grid:
      overrides, grid_runs, grid_dir = select_on_grid(config, name, seeds[0], workdir, select_metric, grid_keys)
    runs = {}
    for seed in seeds:
      run_dir = os.path.join(workdir, name, f"seed{seed}")
      if grid_dir and seed == seeds[0]:
        run_dir = grid_dir  # the selected grid run is this seed's run
      runs[seed] = dict(train_once(config, name, seed, overrides, run_dir), workdir=run_dir)
    stats = summarise(runs)
    comparison["models"][name] = {
        "seeds": seeds, "overrides": overrides,
        "runs": {str(s): {**{k: r.get(k) for k in ("workdir", "best_epoch", "valid", "test")},
                          **{k: r[k] for k in COLD_SPLITS if k in r}} for s, r in runs.items()},
        "test": stats["test"], "valid": stats["valid"], **{k: stats[k] for k in COLD_SPLITS if k in stats},
        "grid": grid_runs}
    # partial tables survive an interruption
    atomic.write_json(os.path.join(workdir, "comparison.json"), comparison)
  text = f"# {config.data.name}: test metrics at the best valid epoch, mean ± sample std over seeds {seeds}\n\n"
  if report.has_cold(comparison):
    text += "cold test: ranked over the cold-start items (held out of training) only.\n\n"
  atomic.write_text(os.path.join(workdir, "comparison.md"), text + markdown_table(comparison))
  return comparison


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  workdir = os.path.expanduser(FLAGS.workdir)
  try:
    comparison = compare(FLAGS.config, [m.strip() for m in FLAGS.models if m.strip()], FLAGS.seeds, workdir,
                         FLAGS.grid, FLAGS.select_metric, tuple(FLAGS.grid_keys))
  except preemption.Preempted as e:  # the run in progress checkpointed; rerunning the command goes on from there
    print(f"preempted: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
  except USER_ERRORS as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print("\n" + markdown_table(comparison))
  print(f"comparison: {os.path.join(workdir, 'comparison.json')}, {os.path.join(workdir, 'comparison.md')}")
  sys.stdout.flush()


if __name__ == "__main__":
  distributed.configure_xla()  # before JAX starts its backend
  define_flags()
  app.run(main)
