"""Speed of the training-free probes (eval/probes.py): zero-shot and item-CF, valid + test, on the shared data.

  python bench/probe.py                     # lfm2k with its MiniLM features, baby with random 384-d features
  python bench/probe.py --baby_dim=4096     # baby with features of the paper's image width

For each set: the wall time of one probe pass (both classes, both splits, metrics included), once cold (with
compilation) and then the median of warm repeats. Ends with ONE JSON line:
  {"lfm2k": {"cold_s", "warm_s", "zero_shot_s", "item_cf_s", ...}, "baby": {...}, "peak_rss_mb": ...}
"""

import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from alignrec_jax.data import mmrec  # noqa: E402
from alignrec_jax.eval import probes, ranking  # noqa: E402
from configs import base  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = flags.DEFINE_string("shared_data", os.path.normpath(os.path.join(_REPO, os.pardir, "shared", "data")),
                              "folder holding lfm2k/ and baby/")
_BABY_DIM = flags.DEFINE_integer("baby_dim", 384, "width of baby's random features (0 = skip baby)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "warm repeats")


def _data(root: str, name: str) -> mmrec.RecData:
  cfg = base.get_base_config().data
  cfg.update(dict(name=name, root=root, image_feat="", text_feat=""))
  return mmrec.load_dataset(cfg)


def _bench(data: mmrec.RecData, features: np.ndarray, repeats: int) -> dict:
  ev = ml_collections.ConfigDict(dict(topk=(5, 10, 20, 50), metrics=("recall", "ndcg", "precision", "map"),
                                      batch_users=4096))
  splits = {s: ranking.make_eval_split(data, s) for s in ("valid", "test")}
  out = {"n_users": data.n_users, "n_items": data.n_items, "dim": int(features.shape[1])}
  t0 = time.perf_counter()
  result = probes.probe_features(features, data, splits, ("zero_shot", "item_cf"), ev)
  out["cold_s"] = round(time.perf_counter() - t0, 3)
  for cls in ("zero_shot", "item_cf"):
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      probes.probe_features(features, data, splits, (cls,), ev)
      times.append(time.perf_counter() - t0)
    out[f"{cls}_s"] = round(statistics.median(times), 3)
    out[f"{cls}_test_recall@20"] = result[cls]["test"]["recall@20"]
  out["warm_s"] = round(out["zero_shot_s"] + out["item_cf_s"], 3)
  return out


def main(argv):
  del argv
  results = {}
  lfm = os.path.join(_SHARED.value, "lfm2k")
  if os.path.isdir(lfm):
    data = _data(lfm, "lfm2k")
    results["lfm2k"] = _bench(data, mmrec.load_features(os.path.join(lfm, "all-MiniLM-L6-v2.npy"), data.n_items),
                              _REPEATS.value)
  baby = os.path.join(_SHARED.value, "baby")
  if _BABY_DIM.value and os.path.isdir(baby):
    data = _data(baby, "baby")
    feats = np.random.default_rng(0).standard_normal((data.n_items, _BABY_DIM.value)).astype(np.float32)
    results["baby"] = _bench(data, feats, _REPEATS.value)
  results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
