"""Stage-2 speed at the paper's scale: one training epoch and one full-ranking evaluation of AlignRec.

  python bench/stage2.py                       # baby.inter + random 7,050 x 4,096 trainable features
  python bench/stage2.py --feature_dim=768     # the width of AlignRec's own (BEiT-3 base) features
  python bench/stage2.py --profile             # also time the step's parts separately
  python bench/stage2.py --scale=elec --feature_dim=768 --max_steps=5 --evals=1   # Electronics-scale memory

Data: ../shared/data/baby/baby.inter (19,445 users, 7,050 items, 160,792 interactions) with random features of the
paper's shape, trainable as in the reference (accuracy on random features means nothing). Settings are the paper's
(d 64, 2 + 1 layers, k 10, batch 2048). Timed exactly as the trainer runs: the same pmap step, blocking on every
step, the sampler included; compilation excluded (compile_s is reported separately).

The reference implementation's figures on the development machine, for comparison: docs/experiments.md.

--scale=elec replaces baby.inter by generated interactions of Amazon Electronics' shape (192,403 users, 63,001
items, 1,689,188 interactions, at least 5 per user, Zipf-like item popularity, 80/10/10 per user) to check that
the whole step (kNN build over all items, training, full-ranking evaluation of every user) fits a 24 GB host;
--max_steps caps the timed epochs (a full Electronics epoch is 618 steps). step_device_mb is XLA's own account of
one device's memory for the compiled training step (arguments + outputs + temporaries, minus aliased donations):
what a GPU must hold for it; device_peak_mb is the allocator's measured peak where the backend counts (GPU/TPU).
Ends with ONE JSON line: {"epoch_s", "eval_s", "compile_s", "peak_rss_mb", ...}.
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
_SCALE = flags.DEFINE_enum("scale", "baby", ["baby", "elec"], "baby: baby.inter; elec: generated interactions of "
                           "Amazon Electronics' shape")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 0, "timed steps per epoch (0 = the whole epoch)")

ELEC_SHAPE = {"n_users": 192_403, "n_items": 63_001, "n_interactions": 1_689_188}


def electronics_shaped(seed: int = 0) -> mmrec.RecData:
  """Random interactions with Amazon Electronics' counts: >= 5 distinct items per user, Zipf-like popularity,
  each user's items split 80/10/10 (at least one valid and one test item). Only the shapes mean anything."""
  rng = np.random.default_rng(seed)
  n_users, n_items, total = ELEC_SHAPE["n_users"], ELEC_SHAPE["n_items"], ELEC_SHAPE["n_interactions"]
  counts = 5 + rng.geometric(1.0 / (total / n_users - 4), size=n_users) - 1
  while counts.sum() != total:  # move the sum to the exact total without going under 5 per user
    diff = total - counts.sum()
    who = rng.choice(n_users, size=min(abs(diff), n_users), replace=False)
    counts[who] += int(np.sign(diff))
    counts = np.maximum(counts, 5)
  popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
  popularity = rng.permutation(popularity / popularity.sum())
  users = np.repeat(np.arange(n_users), counts)
  items = rng.choice(n_items, size=total, p=popularity)
  while True:  # redraw the repeats within a user until every user has distinct items
    key = users.astype(np.int64) * n_items + items
    order = np.argsort(key, kind="stable")
    repeat = np.zeros(total, bool)
    repeat[order[1:]] = key[order[1:]] == key[order[:-1]]
    if not repeat.any():
      break
    items[repeat] = rng.choice(n_items, size=int(repeat.sum()), p=popularity)
  position = np.empty(total, np.int64)  # rank of each row within its user, in random order
  order = np.lexsort((rng.random(total), users))
  starts = np.repeat(np.cumsum(counts) - counts, counts)
  position[order] = np.arange(total) - starts
  n_held = np.maximum(1, np.round(0.1 * counts)).astype(np.int64)[users]
  label = np.where(position < n_held, 2, np.where(position < 2 * n_held, 1, 0))
  pairs = np.stack([users, items], axis=1).astype(np.int32)
  return mmrec.RecData("elec_shaped", n_users, n_items, pairs[label == 0], pairs[label == 1], pairs[label == 2])


def device_peak_mb():
  """Peak bytes the first device's allocator has handed out (GPU/TPU); None where the backend keeps no count (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


def step_device_mb(step_fn, *args) -> float:
  """XLA's memory account of one device for the compiled step (args + outputs + temps - donated aliases)."""
  stats = step_fn.lower(*args).compile().memory_analysis()
  if stats is None:
    return float("nan")
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return round(total / 2**20, 1)


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
  config.data = mmrec.interactions_only(config.data)
  data = mmrec.load_dataset(config.data) if _SCALE.value == "baby" else electronics_shaped()
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
  device_mb = step_device_mb(step_fn, p_params, p_opt, p_inputs, first_batch)

  t0 = time.perf_counter()
  p_params, p_opt, m = step_fn(p_params, p_opt, p_inputs, first_batch)
  jax.block_until_ready(m)
  first_step_s = time.perf_counter() - t0

  epoch_times, epoch_cpu, epoch_faults, step_times = [], [], [], []
  for _ in range(_EPOCHS.value):
    t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n_steps, batch in enumerate(sampler.epoch(len(devices)), 1):
      ts = time.perf_counter()
      p_params, p_opt, m = step_fn(p_params, p_opt, p_inputs, batch)
      loss = float(parallel.get_replicated(jax.block_until_ready(m), devices)["loss"])
      step_times.append(time.perf_counter() - ts)
      if n_steps == _MAX_STEPS.value:
        break
    epoch_times.append(time.perf_counter() - t0)
    epoch_cpu.append(time.process_time() - c0)
    epoch_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"epoch {len(epoch_times) - 1}: {epoch_times[-1]:.2f}s ({n_steps} steps), loss {loss:.4f}",
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

  capped = n_steps < sampler.steps_per_epoch
  result = {"epoch_s": round(step_s * sampler.steps_per_epoch if capped else statistics.median(epoch_times), 3),
            "epoch_s_from_steps": capped,  # --max_steps: the median step time x the steps of a full epoch
            "eval_s": round(eval_s, 3),
            "compile_s": round(first_step_s - step_s + eval_first_s - eval_s, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            # CPU seconds of this process per epoch (all threads): a load-independent cross-check of epoch_s
            "epoch_cpu_s": round(statistics.median(epoch_cpu), 3), "cpus": os.cpu_count(),
            # minor page faults per epoch: host memory the steps take fresh from the kernel
            "epoch_page_faults": int(statistics.median(epoch_faults)),
            "step_s": round(step_s, 4), "steps_per_epoch": sampler.steps_per_epoch, "timed_steps": n_steps,
            "step_device_mb": device_mb, "device_peak_mb": device_peak_mb(),
            "scale": _SCALE.value, "users": data.n_users, "items": data.n_items,
            "graph_build_s": round(graph_s, 3), "feature_dim": _DIM.value,
            "devices": len(devices), "platform": jax.default_backend(), "load_avg_1m": os.getloadavg()[0]}
  if _PROFILE.value:
    batch = {k: v.reshape(-1) for k, v in first_batch.items()}
    result["profile_s"] = profile_parts(config, model, parallel.get_replicated(p_inputs, devices),
                                        parallel.get_replicated(p_params, devices), batch, tx)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
