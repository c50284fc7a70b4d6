"""Which propagation is fastest: forward + backward of `graph.propagate` on the paper-scale graphs.

  python bench/propagation.py

Graphs: the symmetric LightGCN adjacency of ../shared/data/baby (19,445 + 7,050 nodes, 239k edges) and a k=10
item-item kNN graph (non-symmetric) of 7,050 random 768-d features; x is [n, 64]. Methods: "segment_sum" (custom
VJP: the backward is a propagation over the stored transposed edges), "gather" (the same over padded neighbour
lists, graph_lib.with_ell) and "autodiff" (XLA's transpose of the gather + segment_sum). configs/base.py's
model.propagation follows this bench's result on each platform. Median of several runs, compilation excluded. Ends with ONE JSON line.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignrec_jax import graph as graph_lib  # noqa: E402
from alignrec_jax.data import mmrec  # noqa: E402

_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
                                      "data", "baby"))


def _median_time(fn, *args, repeats=7):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  users, items, splits = mmrec.read_inter(os.path.join(_ROOT, "baby.inter"))
  train = np.stack([users, items], 1)[splits == 0]
  adj, _ = graph_lib.user_item_graph(train, int(users.max()) + 1, int(items.max()) + 1)
  feats = np.random.default_rng(0).normal(size=(int(items.max()) + 1, 768)).astype(np.float32)
  knn = graph_lib.knn_graph(feats, 10)
  result = {}
  for name, graph in (("user_item", graph_lib.with_ell(adj)), ("item_item", graph_lib.with_ell(knn))):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(graph.n_src, 64)).astype(np.float32))
    for method in ("gather", "segment_sum", "autodiff"):
      fwd = jax.jit(lambda g, x, m=method: graph_lib.propagate(g, x, m))
      grad = jax.jit(jax.grad(lambda x, g, m=method: jnp.sum(jnp.tanh(graph_lib.propagate(g, x, m)))))
      result[f"{name}_{method}_fwd_s"] = round(_median_time(fwd, graph, x), 5)
      result[f"{name}_{method}_fwd_bwd_s"] = round(_median_time(grad, x, graph), 5)
  result["load_avg_1m"] = os.getloadavg()[0]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
