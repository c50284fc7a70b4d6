"""The Markdown report: runs side by side with the best value in bold, probe and long-tail tables, PNG plots."""

import json
import os
import subprocess
import sys

import pytest

from alignrec_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(r20, groups=None):
  out = {"recall@10": r20 / 2, "recall@20": r20, "ndcg@10": r20 / 3, "ndcg@20": r20 / 2.5}
  if groups:
    out["groups"] = {"head": {"recall@20": r20 * groups}, "tail": {"recall@20": r20 * (1 - groups)}}
  return out


def _write(path, results):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f)
  return str(path)


def _train_run(path, r20, history_len=3, cold=None):
  """A stage-2 results.json; with `cold` (a cold test recall@20) also the cold-start splits and history keys."""
  results = {"best_epoch": history_len - 1, "valid": _metrics(r20 + 0.01), "test": _metrics(r20, 0.7),
             "valid_metric": "recall@20",
             "history": [{"epoch": e, "loss": 1.0 / (e + 1), "valid_recall@20": r20 * (e + 1) / history_len}
                         for e in range(history_len)]}
  if cold is not None:
    results.update(valid_cold=_metrics(cold + 0.01), test_cold=_metrics(cold))
    for e, h in enumerate(results["history"]):
      h["valid_cold_recall@20"] = cold * (e + 1) / history_len
  return _write(path, results)


def _probe_run(path):
  cls = lambda r: {"valid": _metrics(r), "test": _metrics(r, 0.8)}
  return _write(path, {
      "probe": {"text": {"zero_shot": cls(0.20), "item_cf": cls(0.23),
                         "mask_modality": {"unmasked": {**cls(0.30), "best_epoch": 5},
                                           "zeroed": {**cls(0.27), "best_epoch": 4}}},
                "random": {"zero_shot": cls(0.015), "item_cf": cls(0.013)}},
      "probe_reference": {"popularity": cls(0.12)},
      "features": {"text": {"source": "text.npy", "dim": 384}, "random": {"source": "random:384", "dim": 384}}})


def _comparison(path, cold=False):
  """A compare workdir of two models; with `cold` their cold test metrics too (bprmf's cold recall@20 the best)."""
  stats = lambda mean, std: {"mean": mean, "std": std, "values": [mean - std, mean + std]}
  entry = lambda r20, std: {"seeds": [1, 2], "test": {m: stats(v, std) for m, v in _metrics(r20).items()},
                            "valid": {"recall@20": stats(r20 + 0.01, std)}}
  models = {"alignrec": entry(0.30, 0.01), "bprmf": entry(0.25, 0.02)}
  if cold:
    models["alignrec"]["test_cold"] = {"recall@20": stats(0.08, 0.005), "ndcg@20": stats(0.04, 0.003)}
    models["bprmf"]["test_cold"] = {"recall@20": stats(0.09, 0.02), "ndcg@20": stats(0.03, 0.01)}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump({"dataset": "tiny", "select_metric": None, "models": models}, f)
  return str(path)


def test_report_renders_a_compare_workdir(tmp_path):
  path = report.build_report([_comparison(tmp_path / "cmp")], str(tmp_path / "out"))
  text = open(path, encoding="utf-8").read()
  assert "## Model comparison: `cmp` (tiny)" in text and "seeds [1, 2]" in text
  assert ("| model | seeds | test recall@10 | test recall@20 | test ndcg@10 | test ndcg@20 | valid recall@20 |"
          in text)
  # mean ± std cells, the best mean of each column in bold
  assert "| alignrec | 2 | **0.1500 ± 0.0100** | **0.3000 ± 0.0100** |" in text
  assert "| bprmf | 2 | 0.1250 ± 0.0200 | 0.2500 ± 0.0200 |" in text
  assert "cold" not in text  # no cold-start splits, no cold columns
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "comparison.json").write_text("{}")
  with pytest.raises(ValueError, match="no 'models' object"):
    report.build_report([str(tmp_path / "bad")])


def test_report_shows_cold_columns_of_a_compare_workdir_and_of_runs(tmp_path):
  c = _comparison(tmp_path / "cmp", cold=True)
  a = _train_run(tmp_path / "a", 0.30, cold=0.06)
  b = _train_run(tmp_path / "b", 0.25)  # a warm-only run beside it: its cold cells are empty
  text = open(report.build_report([c, a, b], str(tmp_path / "out")), encoding="utf-8").read()
  assert ("| model | seeds | test recall@10 | test recall@20 | test ndcg@10 | test ndcg@20 | valid recall@20 "
          "| cold test recall@20 | cold test ndcg@20 |") in text
  # cold cells are mean ± std, the best mean of each cold column in bold like the warm ones
  assert "| alignrec | 2 | **0.1500 ± 0.0100** |" in text and "| 0.0800 ± 0.0050 | **0.0400 ± 0.0030** |" in text
  assert "| **0.0900 ± 0.0200** | 0.0300 ± 0.0100 |" in text
  assert "ranked over the cold-start items" in text
  assert "| run | best epoch | valid recall@20 | test recall@10 | test recall@20 | test ndcg@10 | test ndcg@20 " \
         "| cold test recall@20 | cold test ndcg@20 |" in text
  assert "| a | 2 | **0.3100** | **0.1500** | **0.3000** | **0.1000** | **0.1200** | **0.0600** | **0.0240** |" in text
  assert "| b | 2 | 0.2600 | 0.1250 | 0.2500 | 0.0833 | 0.1000 | – | – |" in text
  # --cold_metrics picks the cold columns
  text = open(report.build_report([a], str(tmp_path / "o2"), cold_metrics=("ndcg@20",)), encoding="utf-8").read()
  assert "| test ndcg@20 | cold test ndcg@20 |" in text and "cold test recall@20" not in text


class _Recorder:
  """A stand-in for pyplot that records every Axes.plot call (no matplotlib needed)."""

  def __init__(self):
    self.calls = []
    recorder = self

    class Axes:
      def plot(self, xs, ys, **kwargs):
        recorder.calls.append((self, list(ys), kwargs))
        return [type("Line", (), {"get_color": lambda self: "C7"})()]

      def __getattr__(self, name):
        return lambda *args, **kwargs: None

    self.axes = (Axes(), Axes())

  def subplots(self, *args, **kwargs):
    fig = type("Fig", (), {"tight_layout": lambda self: None, "savefig": lambda self, *a, **k: None})()
    return fig, self.axes

  def close(self, fig):
    pass


def test_curves_draw_the_cold_valid_metric_dashed_in_the_runs_colour(tmp_path):
  with open(_train_run(tmp_path / "a", 0.3, cold=0.06) + "/results.json") as f:
    cold_run = json.load(f)
  with open(_train_run(tmp_path / "b", 0.3) + "/results.json") as f:
    warm_run = json.load(f)
  plt = _Recorder()
  assert report.plot_curves(plt, [("a", cold_run), ("b", warm_run)], str(tmp_path / "curves.png"))
  metric_panel = [(ys, kw) for ax, ys, kw in plt.calls if ax is plt.axes[1]]
  assert len(metric_panel) == 3  # a, a's cold items, b
  ys, kwargs = metric_panel[1]
  assert kwargs == {"linestyle": "--", "color": "C7", "label": "a (cold items)"}
  assert ys == pytest.approx([0.02, 0.04, 0.06])
  assert all("linestyle" not in kw for _, kw in (metric_panel[0], metric_panel[2]))


def test_report_tables_bold_the_best_and_cover_probe_and_longtail(tmp_path):
  a = _train_run(tmp_path / "seed1" / "run", 0.30)
  b = _train_run(tmp_path / "seed2" / "run", 0.25)
  p = _probe_run(tmp_path / "probe")
  path = report.build_report([a, b, p], str(tmp_path / "out"))
  text = open(path, encoding="utf-8").read()
  # Two runs named 'run' are told apart by their parent folder.
  assert "| seed1/run | 2 | **0.3100** | **0.1500** | **0.3000** |" in text
  assert "| seed2/run | 2 | 0.2600 | 0.1250 | 0.2500 |" in text
  # Probe: per class, the better feature table in bold; the popularity reference is never bold.
  assert "| text | zero_shot | **0.2000** |" in text and "| random | zero_shot | 0.0150 |" in text
  assert "| text | mask_modality/unmasked | **0.3000** |" in text and "| text | mask_modality/zeroed | 0.2700 |" in text
  assert "| (popularity) | – | 0.1200 | 0.0600 | 0.1200 | 0.0400 | 0.0480 |" in text
  assert "## Long-tail items" in text and "| seed1/run | 0.2100 | **0.0900** |" in text
  assert "| probe: text mask_modality/unmasked | **0.2400** | 0.0600 |" in text
  assert "text (384-d, text.npy)" in text


def test_report_draws_the_plots(tmp_path):
  pytest.importorskip("matplotlib", reason="matplotlib is the report's optional extra (requirements-report.txt)")
  a = _train_run(tmp_path / "a", 0.3)
  p = _probe_run(tmp_path / "probe")
  c = _comparison(tmp_path / "cmp")
  path = report.build_report([a, p, c])  # default out: <first workdir>/report
  assert path == os.path.join(a, "report", "report.md")
  for name in ("comparison.png", "curves.png", "probe.png", "longtail.png"):
    png = os.path.join(a, "report", name)
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in open(path, encoding="utf-8").read()
  assert not os.path.exists(os.path.join(a, "report", "comparison_cold.png"))  # no cold-start splits anywhere
  assert "comparison_cold" not in open(path, encoding="utf-8").read()


def test_report_draws_the_cold_comparison_next_to_the_warm_one(tmp_path):
  pytest.importorskip("matplotlib", reason="matplotlib is the report's optional extra (requirements-report.txt)")
  c = _comparison(tmp_path / "cmp", cold=True)
  path = report.build_report([c, _train_run(tmp_path / "a", 0.3, cold=0.06)], str(tmp_path / "out"))
  text = open(path, encoding="utf-8").read()
  for name in ("comparison.png", "comparison_cold.png", "curves.png"):
    with open(tmp_path / "out" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in text
  assert text.index("](comparison.png)") < text.index("](comparison_cold.png)")


def test_report_without_matplotlib_keeps_the_tables(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "_pyplot", lambda: None)
  path = report.build_report([_train_run(tmp_path / "a", 0.3)], str(tmp_path / "out"))
  text = open(path, encoding="utf-8").read()
  assert "Plots skipped" in text and "requirements-report.txt" in text and "| a |" in text
  assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".png")]


def test_report_errors_name_the_missing_or_bad_file(tmp_path):
  with pytest.raises(ValueError, match="results.json not found"):
    report.build_report([str(tmp_path)])
  (tmp_path / "results.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    report.build_report([str(tmp_path)])
  with pytest.raises(ValueError, match="no workdirs"):
    report.build_report([])


def test_command_line(tmp_path):
  a = _train_run(tmp_path / "a", 0.3)
  out = subprocess.run([sys.executable, "-m", "alignrec_jax.report", a, f"--out={tmp_path / 'o'}",
                        "--metrics=recall@20,ndcg@20"], cwd=REPO, capture_output=True, text=True, check=True)
  assert "report:" in out.stdout
  text = (tmp_path / "o" / "report.md").read_text()
  assert "| run | best epoch | valid recall@20 | test recall@20 | test ndcg@20 |" in text
  cold = _train_run(tmp_path / "cold", 0.3, cold=0.06)
  subprocess.run([sys.executable, "-m", "alignrec_jax.report", cold, f"--out={tmp_path / 'c'}",
                  "--metrics=recall@20", "--cold_metrics=ndcg@20"], cwd=REPO, capture_output=True, text=True,
                 check=True)
  text = (tmp_path / "c" / "report.md").read_text()
  assert "| run | best epoch | valid recall@20 | test recall@20 | cold test ndcg@20 |" in text
