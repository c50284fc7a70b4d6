"""Results of one or more runs -> a Markdown report with tables and PNG plots.

  python -m alignrec_jax.report /tmp/lfm2k_s999 /tmp/lfm2k_s1 /tmp/probe_lfm2k [--out=/tmp/report]

Reads `<workdir>/results.json` of stage-2 runs (`valid`/`test`/`history`) and probe runs (`probe`, see
eval/probes.py), and `<workdir>/comparison.json` of `alignrec_jax.compare` workdirs, and writes `<out>/report.md`
(default out: `<first workdir>/report`) with
  * the model comparison of each compare workdir (test metrics, mean ± std over seeds, the best mean in bold) and
    its bars with the seeds' std as error bars: comparison.png;
  * runs side by side (best valid epoch, valid and test metrics), the best value of each column in bold;
  * training curves (loss and the valid metric per epoch, one line per run): curves.png;
  * with cold-start items (--config.data.cold_items: results with `valid_cold`/`test_cold`, ranked over the items
    held out of training only), both tables gain "cold test" columns (--cold_metrics) after the warm ones, the
    compare workdirs' cold test bars go to comparison_cold.png, and a run's valid cold metric per epoch
    (history key valid_cold_<metric>) is a dashed line of the run's colour in curves.png. Without them nothing
    of this appears;
  * probe metrics per feature table and class (test), best per column in bold: probe.png;
  * long-tail tables and bars (metrics per item popularity group) where the results have `groups`: longtail.png.
matplotlib draws the plots; it is an optional extra (requirements-report.txt) imported only here, and without it
the report keeps its tables and says that the plots were skipped.
"""

import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from alignrec_jax.data import atomic



class ReportError(ValueError):
  """A workdir or results file that cannot be reported; the message names it."""


def define_flags() -> None:
  """The command line's flags; defined when the program runs, never at import."""
  flags.DEFINE_string("out", None, "Output folder for report.md and the PNGs (default: <first workdir>/report).")
  flags.DEFINE_list("metrics", ["recall@10", "recall@20", "ndcg@10", "ndcg@20"], "Metric columns of the tables.")
  flags.DEFINE_list("cold_metrics", ["recall@20", "ndcg@20"],
                    "Cold-start test metric columns (shown only where results have test_cold).")


PLOT_EXTRA = "pip install -r requirements-report.txt"


def load_results(workdir: str) -> dict:
  """`<workdir>/results.json`, or {"comparison": ...} of a compare workdir's comparison.json; clear errors."""
  path = os.path.join(workdir, "results.json")
  comparison = os.path.join(workdir, "comparison.json")
  if not os.path.isfile(path) and os.path.isfile(comparison):
    path = comparison
  if not os.path.isfile(path):
    raise ReportError(f"{path} not found: is {workdir} the workdir of a finished run (stage train/all/probe) or of "
                      "python -m alignrec_jax.compare (comparison.json)?")
  try:
    results = atomic.read_json_object(path)
  except (OSError, ValueError) as e:
    raise ReportError(str(e)) from None
  if path == comparison:
    if not isinstance(results.get("models"), dict):
      raise ReportError(f"{path}: no 'models' object: not written by python -m alignrec_jax.compare")
    return {"comparison": results}
  return results


def run_names(workdirs: Sequence[str]) -> list:
  """Short unique labels: the folder names, with parent folders added to the names that collide."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  depth = [1] * len(parts)
  while True:
    names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
    clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
    if not clashes:
      return names
    for i in clashes:
      depth[i] += 1


def _number(value):
  """The value a cell is ranked by: a number itself, the mean of a (mean, std) pair, else None."""
  if isinstance(value, tuple) and len(value) == 2:
    value = value[0]
  return value if isinstance(value, (int, float)) else None


def _fmt(value) -> str:
  if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
    return f"{value[0]:.4f} ± {value[1]:.4f}"
  return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def markdown_table(header: Sequence[str], rows: Sequence[tuple], bold_from: int = 1,
                   no_bold_rows: Sequence[int] = ()) -> str:
  """A Markdown table of (label, value, ...) rows; the largest value of each column from `bold_from` is in bold
  (ignoring rows in `no_bold_rows`, e.g. references). A value may be a (mean, std) pair, ranked by its mean."""
  best = {}
  for col in range(bold_from, len(header)):
    values = [_number(r[col]) for i, r in enumerate(rows) if i not in no_bold_rows and _number(r[col]) is not None]
    if values:
      best[col] = max(values)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, row in enumerate(rows):
    cells = []
    for col, value in enumerate(row):
      if col < bold_from:
        cells.append(str(value))
        continue
      text = _fmt(value)
      if i not in no_bold_rows and col in best and _number(value) == best[col]:
        text = f"**{text}**"
      cells.append(text)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def probe_rows(results: dict) -> list:
  """[(feature, class label, {"valid": {...}, "test": {...}})] of a probe run, mask-modality runs as
  'mask_modality/<variant>'."""
  out = []
  for feature, classes in results.get("probe", {}).items():
    for cls, value in classes.items():
      if cls == "mask_modality":
        for variant, run in value.items():
          out.append((feature, f"mask_modality/{variant}", run))
      else:
        out.append((feature, cls, value))
  return out


def has_cold(comparison: dict) -> bool:
  """Whether any model of a compare run's comparison.json has cold-start test metrics."""
  return any(entry.get("test_cold") for entry in comparison["models"].values())


def comparison_rows(comparison: dict, metrics: Sequence[str], main_metric: str,
                    cold_metrics: Sequence[str] = ()) -> list:
  """[(model, seeds, (mean, std) per test metric..., valid (mean, std), (mean, std) per cold test metric...)] of a
  compare run's comparison.json (cold_metrics: the cold-start columns, () for none)."""
  pair = lambda stats: (stats["mean"], stats["std"]) if stats else None
  return [(model, len(entry.get("seeds", [])), *[pair(entry.get("test", {}).get(m)) for m in metrics],
           pair(entry.get("valid", {}).get(main_metric)),
           *[pair((entry.get("test_cold") or {}).get(m)) for m in cold_metrics])
          for model, entry in comparison["models"].items()]


def _longtail_entries(named_results: Sequence[tuple]) -> list:
  """[(label, {group: test metrics})] of every test evaluation that has popularity groups."""
  entries = []
  for name, results in named_results:
    test = results.get("test")
    if isinstance(test, dict) and test.get("groups"):
      entries.append((name, test["groups"]))
    for feature, cls, run in probe_rows(results):
      groups = run.get("test", {}).get("groups")
      if groups:
        entries.append((f"{name}: {feature} {cls}", groups))
    pop = results.get("probe_reference", {}).get("popularity", {}).get("test", {}).get("groups")
    if pop:
      entries.append((f"{name}: (popularity)", pop))
  return entries


# ------------------------------------------------------------------------------------------------------ plots

def _pyplot():
  """matplotlib.pyplot with a file-only backend, or None if matplotlib is not installed."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top  (optional extra, report only)
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _grouped_bars(plt, ax, categories: Sequence[str], series: Sequence[tuple], ylabel: str) -> None:
  """Bars of several series ((label, [value per category])) side by side per category."""
  width = 0.8 / max(1, len(series))
  for k, (label, values) in enumerate(series):
    xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
    ax.bar(xs, [v if isinstance(v, (int, float)) else 0.0 for v in values], width, label=label)
  ax.set_xticks(range(len(categories)))
  ax.set_xticklabels(categories, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  del plt


def plot_curves(plt, named_results: Sequence[tuple], path: str) -> bool:
  runs = [(n, r) for n, r in named_results if r.get("history")]
  if not runs:
    return False
  fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
  dashed = False
  for name, results in runs:
    metric = results.get("valid_metric", "recall@20")
    history = results["history"]
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    ax_loss.plot(epochs, [h.get("loss", float("nan")) for h in history], label=name)
    (line,) = ax_metric.plot(epochs, [h.get(f"valid_{metric}", float("nan")) for h in history], label=name)
    cold = f"valid_cold_{metric}"
    if any(cold in h for h in history):  # cold-start items: the same run's cold valid metric, dashed
      ax_metric.plot(epochs, [h.get(cold, float("nan")) for h in history], linestyle="--", color=line.get_color(),
                     label=f"{name} (cold items)")
      dashed = True
    ax_metric.set_ylabel(f"valid {metric}" + (" (dashed: cold items)" if dashed else ""))
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("training loss")
  ax_metric.set_xlabel("epoch")
  for ax in (ax_loss, ax_metric):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_probe(plt, named_results: Sequence[tuple], metric: str, path: str) -> bool:
  panels = [(n, probe_rows(r), r) for n, r in named_results if r.get("probe")]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 4 * len(panels) + 2), 4), squeeze=False)
  for ax, (name, rows, results) in zip(axes[0], panels):
    classes = list(dict.fromkeys(cls for _, cls, _ in rows))
    features = list(dict.fromkeys(f for f, _, _ in rows))
    value = {(f, c): r.get("test", {}).get(metric) for f, c, r in rows}
    _grouped_bars(plt, ax, classes, [(f, [value.get((f, c)) for c in classes]) for f in features], f"test {metric}")
    pop = results.get("probe_reference", {}).get("popularity", {}).get("test", {}).get(metric)
    if isinstance(pop, (int, float)):
      ax.axhline(pop, color="grey", linestyle="--", linewidth=1, label="popularity")
      ax.legend(fontsize=7)
    ax.set_title(name, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_comparison(plt, named_results: Sequence[tuple], metric: str, path: str, split: str = "test") -> bool:
  """Bars of each compare workdir's `split` metric per model (test, or test_cold where a model has it)."""
  panels = [(n, r["comparison"]) for n, r in named_results if r.get("comparison")]
  if split != "test":
    panels = [(n, c) for n, c in panels if any(e.get(split) for e in c["models"].values())]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 5 * len(panels)), 4), squeeze=False)
  for ax, (name, comparison) in zip(axes[0], panels):
    models = list(comparison["models"])
    stats = [(comparison["models"][m].get(split) or {}).get(metric) or {"mean": 0.0, "std": 0.0} for m in models]
    ax.bar(range(len(models)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{'cold test' if split == 'test_cold' else split} {metric} (mean ± std over seeds)")
    ax.set_title(f"{name} ({comparison.get('dataset', '?')})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_longtail(plt, entries: Sequence[tuple], metric: str, path: str) -> bool:
  if not entries:
    return False
  groups = list(dict.fromkeys(g for _, gs in entries for g in gs))
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(entries) + 3), 4))
  _grouped_bars(plt, ax, [label for label, _ in entries],
                [(g, [gs.get(g, {}).get(metric) for _, gs in entries]) for g in groups],
                f"test {metric} from the group's items")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------------------------ report

def build_report(workdirs: Sequence[str], out_dir: Optional[str] = None,
                 metrics: Sequence[str] = ("recall@10", "recall@20", "ndcg@10", "ndcg@20"),
                 cold_metrics: Sequence[str] = ("recall@20", "ndcg@20")) -> str:
  """Writes `<out_dir>/report.md` (+ PNGs) for the runs in `workdirs`; returns the report's path.

  cold_metrics: the cold-start test columns, shown where some result has test_cold."""
  if not workdirs:
    raise ReportError("no workdirs given: python -m alignrec_jax.report <workdir> [<workdir> ...]")
  named = list(zip(run_names(workdirs), [load_results(w) for w in workdirs]))
  out_dir = out_dir or os.path.join(workdirs[0], "report")
  os.makedirs(out_dir, exist_ok=True)
  main_metric = "recall@20" if "recall@20" in metrics else metrics[0]  # the valid metric of the runs
  plt = _pyplot()
  lines = ["# alignrec_jax report", "", "Runs: " + ", ".join(f"`{n}` ({os.path.abspath(w)})"
                                                            for (n, _), w in zip(named, workdirs)), ""]

  for name, results in named:
    comparison = results.get("comparison")
    if not comparison:
      continue
    seeds = sorted({s for entry in comparison["models"].values() for s in entry.get("seeds", [])})
    cold = list(cold_metrics) if has_cold(comparison) else []
    header = ["model", "seeds"] + [f"test {m}" for m in metrics] + [f"valid {main_metric}"]
    header += [f"cold test {m}" for m in cold]
    lines += [f"## Model comparison: `{name}` ({comparison.get('dataset', '?')})", "",
              f"Each model trained with seeds {seeds} on the same data, splits, sampler and evaluation; metrics at "
              "each run's best valid epoch, mean ± sample std over its seeds; the best mean of each column in bold."
              + (f" Hyper-parameters selected on valid {comparison['select_metric']}."
                 if comparison.get("select_metric") else "")
              + (" Cold test: ranked over the cold-start items (held out of training) only." if cold else ""), "",
              markdown_table(header, comparison_rows(comparison, metrics, main_metric, cold), bold_from=2), ""]

  trained = [(n, r) for n, r in named if isinstance(r.get("test"), dict) and r.get("test")]
  if trained:
    cold = list(cold_metrics) if any(isinstance(r.get("test_cold"), dict) for _, r in trained) else []
    header = ["run", "best epoch", f"valid {main_metric}"] + [f"test {m}" for m in metrics]
    header += [f"cold test {m}" for m in cold]
    rows = [(n, r.get("best_epoch", "–"), r.get("valid", {}).get(main_metric), *[r["test"].get(m) for m in metrics],
             *[(r.get("test_cold") or {}).get(m) for m in cold]) for n, r in trained]
    lines += ["## Runs side by side", "", "Best valid epoch's metrics; the best of each column in bold."
              + (" Cold test: ranked over the cold-start items (held out of training) only." if cold else ""), "",
              markdown_table(header, rows, bold_from=2), ""]

  probed = [(n, r) for n, r in named if r.get("probe")]
  if probed:
    lines += ["## Intermediate evaluations (probe)", "",
              "zero_shot: cosine to the user's mean train-item feature; item_cf: ItemKNNCBF (shrunk cosine, top-k "
              "neighbours); mask_modality/<variant>: stage 2 trained on the table with the saved masked items "
              "replaced (unmasked = the plain table). Test metrics, best of each column in bold; popularity is a "
              "reference row.", ""]
    for name, results in probed:
      rows, reference = [], []
      for feature, cls, run in probe_rows(results):
        rows.append((feature, cls, run.get("valid", {}).get(main_metric), *[run.get("test", {}).get(m)
                                                                            for m in metrics]))
      pop = results.get("probe_reference", {}).get("popularity")
      if pop:
        reference.append(len(rows))
        rows.append(("(popularity)", "–", pop["valid"].get(main_metric), *[pop["test"].get(m) for m in metrics]))
      header = ["feature", "class", f"valid {main_metric}"] + [f"test {m}" for m in metrics]
      dims = results.get("features", {})
      lines += [f"### `{name}`", "",
                "Feature tables: " + ", ".join(f"{f} ({d.get('dim')}-d, {d.get('source')})" for f, d in dims.items()),
                ""]
      # Bold within each class (mask-modality variants together): which feature table wins a class.
      for family in dict.fromkeys(r[1].split("/")[0] for r in rows if r[1] != "–"):
        sub = [r for r in rows if r[1].split("/")[0] == family] + [rows[i] for i in reference]
        cls = family
        lines += [f"**{cls}**", "", markdown_table(header, sub, bold_from=2,
                                                   no_bold_rows=range(len(sub) - len(reference), len(sub))), ""]

  entries = _longtail_entries(named)
  if entries:
    groups = list(dict.fromkeys(g for _, gs in entries for g in gs))
    header = ["evaluation"] + [f"{g} {main_metric}" for g in groups]
    rows = [(label, *[gs.get(g, {}).get(main_metric) for g in groups]) for label, gs in entries]
    references = [i for i, (label, _) in enumerate(entries) if label.endswith("(popularity)")]
    lines += ["## Long-tail items", "",
              f"Test {main_metric} split by train-popularity group of the hit items (the groups add up to the "
              "overall value); best per column in bold (popularity rows are references).", "",
              markdown_table(header, rows, no_bold_rows=references), ""]

  plots = []
  if plt is None:
    lines += [f"_Plots skipped: matplotlib is not installed ({PLOT_EXTRA})._", ""]
  else:
    for file, title, draw in (
        ("comparison.png", "Model comparison", lambda p: plot_comparison(plt, named, main_metric, p)),
        ("comparison_cold.png", "Model comparison on cold-start items",
         lambda p: plot_comparison(plt, named, main_metric, p, split="test_cold")),
        ("curves.png", "Training curves", lambda p: plot_curves(plt, named, p)),
        ("probe.png", "Probe metrics per feature table", lambda p: plot_probe(plt, named, main_metric, p)),
        ("longtail.png", "Long-tail groups", lambda p: plot_longtail(plt, entries, main_metric, p))):
      if draw(os.path.join(out_dir, file)):
        plots.append(file)
        lines += [f"## {title}", "", f"![{title}]({file})", ""]

  path = os.path.join(out_dir, "report.md")
  atomic.write_text(path, "\n".join(lines))
  logging.info("report: %s (plots: %s)", path, ", ".join(plots) or "none")
  return path


def main(argv):
  FLAGS = flags.FLAGS
  try:
    path = build_report(argv[1:], FLAGS.out, tuple(FLAGS.metrics), tuple(FLAGS.cold_metrics))
  except (ReportError, OSError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(f"report: {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
