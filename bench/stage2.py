"""Stage-2 speed at the paper's scale: one training epoch and one full-ranking evaluation of AlignRec.

  python bench/stage2.py                       # baby.inter + random 7,050 x 4,096 trainable features
  python bench/stage2.py --feature_dim=768     # the width of AlignRec's own (BEiT-3 base) features
  python bench/stage2.py --profile             # also time the step's parts separately

Data: ../shared/data/baby/baby.inter (19,445 users, 7,050 items, 160,792 interactions) with random features of the
paper's shape, trainable as in the reference (accuracy on random features means nothing). Settings are the paper's
(d 64, 2 + 1 layers, k 10, batch 2048). Timed exactly as the trainer runs: the same pmap step, blocking on every
step, the sampler included; compilation excluded (compile_s is reported separately).

The reference implementation on this 2-core CPU: median 39 s per training epoch, 2.1 s per evaluation pass,
1.56 GB peak RSS. Ends with ONE JSON line: {"epoch_s", "eval_s", "compile_s", "peak_rss_mb", ...}.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from alignrec_jax.data import mmrec  # noqa: E402
from alignrec_jax.data.sampler import BPRSampler  # noqa: E402
from alignrec_jax.eval import ranking  # noqa: E402
from alignrec_jax.losses import cca  # noqa: E402
from alignrec_jax.models import get_model  # noqa: E402
from alignrec_jax.train import parallel  # noqa: E402
from configs import base  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = flags.DEFINE_string("data_root", os.path.normpath(os.path.join(_REPO, os.pardir, "shared", "data", "baby")),
                            "folder with baby.inter")
_DIM = flags.DEFINE_integer("feature_dim", 4096, "width of the random item features")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "timed training epochs (after one warm-up step)")
_EVALS = flags.DEFINE_integer("evals", 3, "timed evaluation passes")
_PROFILE = flags.DEFINE_bool("profile", False, "also time the parts of a step in isolation")


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def profile_parts(config, model, inputs, params, batch, tx) -> dict:
  """Seconds of each part of a step, jitted alone with the step's shapes (a component profile)."""
  feats = params["aggregator"]["features"]
  kernel = params["aggregator"]["mm_trs"]["kernel"]
  parts = {}
  parts["projection_fwd_bwd"] = _timed(jax.jit(jax.grad(lambda f, w: jnp.sum(jnp.tanh(f @ w)), argnums=(0, 1))),
                                       feats, kernel)
  opt_state = tx.init(params)
  parts["adam_update"] = _timed(jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0])),
                                params, opt_state, params)
  pos = jnp.asarray(batch["pos"])

  def sim_target(f, pos):  # the cosine target of the similarity loss, as cca.similarity_preserving computes it
    n = cca.normalize(f[pos])
    return cca.cosine_target_sum_sq(n, n)
  parts["sim_target_cosines"] = _timed(jax.jit(sim_target), feats, pos)
  parts["similarity_loss_fwd_bwd"] = _timed(jax.jit(jax.grad(
      lambda e, f, pos: cca.similarity_preserving(e[pos], e[pos], f[pos], f[pos], jnp.ones(pos.shape[0]),
                                                  jnp.ones(pos.shape[0]), float(pos.shape[0])))),
      jnp.zeros((feats.shape[0], config.model.embedding_size)) + 0.01, feats, pos)

  def graph_only(p, inputs):
    out = model.forward(p, inputs)
    return jnp.sum(out["user"]) + jnp.sum(out["item"])
  parts["forward_backward_no_loss"] = _timed(jax.jit(jax.grad(graph_only)), params, inputs)
  parts["loss_and_grad"] = _timed(jax.jit(jax.grad(lambda p, i, b: model.loss(p, i, b)[0])), params, inputs, batch)
  return {k: round(v, 4) for k, v in parts.items()}


def main(argv):
  del argv
  config = base.get_base_config()
  config.data.name = "baby"
  config.data.root = _DATA.value
  config.data.image_feat = ""
  data = mmrec.load_dataset(config.data)
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(data.n_items, _DIM.value)).astype(np.float32)
  data = mmrec.RecData(data.name, data.n_users, data.n_items, data.train, data.valid, data.test, {"image": feats})
  del feats
  print(data.summary(), flush=True)

  t0 = time.perf_counter()
  model = get_model("alignrec")(config)
  inputs = model.build_inputs(data)
  graph_s = time.perf_counter() - t0
  data = mmrec.RecData(data.name, data.n_users, data.n_items, data.train, data.valid, data.test, {})
  devices = parallel.local_devices(config.train.num_devices)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.optim.lr)
  params = model.init(jax.random.PRNGKey(0), inputs)
  inputs = model.inputs_after_init(inputs)  # as the trainer
  sampler = BPRSampler(data.train, data.n_items, config.train.batch_size, seed=0)
  step_fn = parallel.pmap_train_step(model.loss, tx, devices)
  p_params, p_opt = parallel.put_replicated((params, tx.init(params)), devices)
  p_inputs = parallel.put_replicated(inputs, devices)
  del params, inputs  # as the trainer: only the replicated copies stay alive
  first_batch = next(sampler.epoch(len(devices)))

  t0 = time.perf_counter()
  p_params, p_opt, m = step_fn(p_params, p_opt, p_inputs, first_batch)
  jax.block_until_ready(m)
  first_step_s = time.perf_counter() - t0

  epoch_times, epoch_cpu, epoch_faults, step_times = [], [], [], []
  for _ in range(_EPOCHS.value):
    t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for batch in sampler.epoch(len(devices)):
      ts = time.perf_counter()
      p_params, p_opt, m = step_fn(p_params, p_opt, p_inputs, batch)
      loss = float(parallel.get_replicated(jax.block_until_ready(m), devices)["loss"])
      step_times.append(time.perf_counter() - ts)
    epoch_times.append(time.perf_counter() - t0)
    epoch_cpu.append(time.process_time() - c0)
    epoch_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"epoch {len(epoch_times) - 1}: {epoch_times[-1]:.2f}s ({sampler.steps_per_epoch} steps), loss {loss:.4f}",
          flush=True)
  step_s = statistics.median(step_times)

  split = ranking.make_eval_split(data, "valid")
  reps = parallel.device_map(lambda p, i, axis_name: model.representations(p, i), devices)

  def evaluation():
    user_emb, item_emb = parallel.get_replicated(reps(p_params, p_inputs), devices)
    return ranking.evaluate(user_emb, item_emb, split, batch_users=config.eval.batch_users)

  t0 = time.perf_counter()
  evaluation()
  eval_first_s = time.perf_counter() - t0
  eval_times = []
  for _ in range(_EVALS.value):
    t0 = time.perf_counter()
    evaluation()
    eval_times.append(time.perf_counter() - t0)
  eval_s = statistics.median(eval_times)

  result = {"epoch_s": round(statistics.median(epoch_times), 3), "eval_s": round(eval_s, 3),
            "compile_s": round(first_step_s - step_s + eval_first_s - eval_s, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            # CPU seconds of this process per epoch (all threads): a load-independent cross-check of epoch_s
            "epoch_cpu_s": round(statistics.median(epoch_cpu), 3), "cpus": os.cpu_count(),
            # minor page faults per epoch: host memory the steps take fresh from the kernel
            "epoch_page_faults": int(statistics.median(epoch_faults)),
            "step_s": round(step_s, 4), "steps_per_epoch": sampler.steps_per_epoch,
            "graph_build_s": round(graph_s, 3), "feature_dim": _DIM.value,
            "devices": len(devices), "platform": jax.default_backend(), "load_avg_1m": os.getloadavg()[0]}
  if _PROFILE.value:
    batch = {k: v.reshape(-1) for k, v in first_batch.items()}
    result["profile_s"] = profile_parts(config, model, parallel.get_replicated(p_inputs, devices),
                                        parallel.get_replicated(p_params, devices), batch, tx)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
