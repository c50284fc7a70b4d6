"""Stage 1: ICA pre-training of MMEnc on the items' images and texts, and extraction of the item feature table.

`pretrain(config, workdir)`:
  items.tsv -> tokenizer (`<workdir>/tokenizer.spm`: `config.data.tokenizer`'s sentencepiece model, or one trained
  on the item texts once; data/content.py) -> tfds array_record dataset (`<workdir>/tfds/`)
  -> AdamW (linear warm-up, cosine decay; optax) on the ICA loss, data parallel with `pmap` over the devices
  (`config.train.num_devices`, 0 = all local ones; the global batch `pretrain.batch_size` is split across them).
  Under `jax.distributed` the pmap spans every process's devices and each process feeds its devices' rows of the
  same global batch (train/parallel.py), so N processes compute what one process with all their devices does.
  Process 0 builds the tokenizer and the tfds dataset first (the others then load them) and alone writes
  pretrain_history.json; every process takes part in the orbax checkpoint saves.
  Batches: epoch e visits the items in the permutation drawn from (seed, e), so a resumed run sees exactly the
  batches an uninterrupted one would. Checkpoints (orbax, `<workdir>/pretrain/`) every `pretrain.checkpoint_every`
  steps and at the end hold params, optimiser state, the logged history and checksums of the arrays; a rerun resumes
  from the newest intact one (a damaged step is moved aside with a warning) and returns at once when
  `pretrain.steps` are done. The workdir is locked while a stage runs, and a resume with other stage-1 settings is
  refused (train/workdir.py). `pretrain.init_from = DIR` (a fresh run only) starts from converted BEiT-3 weights
  (train/init_from.py): the encoder is loaded, the MLM head is tied to the loaded text embedding and the MIM (and
  optional [CLS] bag-of-words) heads start fresh. `pretrain.steps = 0` saves the initial encoder without any ICA
  step: the randomly initialised one, or with init_from the released BEiT-3 itself ("BEiT-3 without ICA").

`extract(config, workdir)`: the encoder of the latest pre-training checkpoint over every item (image + text) ->
  the visual-[CLS] feature table `[n_items, hidden]` with variants full / mask_image (every patch replaced by the
  [MASK] patch embedding) / mask_text (every text token but the special ones replaced by `<mask>`), written by
  `bridge.save_feature_table`.
  Skipped when the workdir already holds the table extracted from that checkpoint.
"""

import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from alignrec_jax.data import atomic
from alignrec_jax.data import content
from alignrec_jax.losses import ica
from alignrec_jax.models import mmenc
from alignrec_jax.train import bridge
from alignrec_jax.train import distributed
from alignrec_jax.train import init_from
from alignrec_jax.train import parallel
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib

_FEATURES_META = "features_meta.json"


def items_path(config) -> str:
  """`<data.root>/<data.items_file>` (the items file may be absolute)."""
  name = config.data.items_file
  return name if os.path.isabs(name) else os.path.join(os.path.expanduser(config.data.root), name)


def _write_json(path: str, obj: Any) -> None:
  with atomic.atomic_open(path) as f:
    json.dump(obj, f, indent=1)


def _load_items(config, workdir: str) -> tuple[content.Tokenizer, dict]:
  """The tokenizer and every item's arrays {"image" uint8 [n, s, s, 3], "tokens" int32 [n, L]}."""
  if config.data.get("synthetic", False):
    from alignrec_jax.data import synthetic  # pylint: disable=g-import-not-at-top  (the default data only)
    synthetic.ensure_synthetic_dataset(os.path.expanduser(config.data.root))
  tokenizer, source = content.prepare_content(config.pretrain, items_path(config), workdir,
                                              config.data.get("tokenizer", ""))
  return tokenizer, content.load_all(source)


def weight_decay_mask(params: Any) -> Any:
  """True where AdamW decays the weight: the matrices of the linear maps and the patch convolution, and the text
  embedding (BEiT-3's rule). Biases, LayerNorms, the position tables and the [CLS]/mask tokens are not decayed."""
  def decays(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return names[-1] == "kernel" or (names[-1] == "embedding" and "text_embed" in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(pre, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up to `pre.lr` and cosine decay to 1% of it; weight decay as `weight_decay_mask`."""
  warmup = min(pre.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, pre.lr, warmup, max(total_steps, warmup + 1),
                                                end_value=0.01 * pre.lr)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=pre.weight_decay, mask=weight_decay_mask))


def _loss_kwargs(pre, tokenizer: content.Tokenizer) -> dict:
  if pre.mim_target not in ica.MIM_TARGETS:
    raise ValueError(f"config.pretrain.mim_target={pre.mim_target!r} is not one of {sorted(ica.MIM_TARGETS)}")
  return dict(text_mask_ratio=pre.text_mask_ratio, image_mask_ratio=pre.image_mask_ratio,
              mlm_weight=pre.mlm_weight, mim_weight=pre.mim_weight, itc_weight=pre.itc_weight,
              itc_temperature=pre.get("itc_temperature", 0.07), cls_bow_weight=pre.get("cls_bow_weight", 0.0),
              mim_target=ica.MIM_TARGETS[pre.mim_target],
              mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids)


def init_params(model: mmenc.MMEnc, key: jax.Array) -> Any:
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.max_text_len), jnp.int32)
  return jax.jit(lambda k: model.init(k, images, tokens)["params"])(key)


def batch_indices(seed: int, step: int, n_items: int, batch_size: int) -> np.ndarray:
  """Item ids of global batch `step`: consecutive slices of the permutation of epoch `step // steps_per_epoch`."""
  per_epoch = n_items // batch_size
  epoch, j = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n_items)
  return order[j * batch_size:(j + 1) * batch_size]


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True, max_to_keep=2)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "pretrain"), options=options,
                               item_names=("state", "meta"))


def _restore(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict]:
  """(params, opt_state, meta) of `step`, checksums verified; CheckpointError (one line) if damaged/incompatible."""
  target = jax.tree.map(np.asarray, {"params": params, "opt_state": opt_state})
  where = f"pre-training checkpoint {step} in {manager.directory}"
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for an incompatible or damaged checkpoint
    raise state_lib.restore_failed(where, e) from e
  meta = dict(restored["meta"])
  state = jax.tree.map(np.asarray, restored["state"])
  state_lib.verify(state, meta.pop("checksums", None), where)
  state_lib.check_shapes(state, target, where)
  return state["params"], state["opt_state"], meta


def _restore_newest_intact(manager: ocp.CheckpointManager, params: Any, opt_state: Any):
  """(step, params, opt_state, meta) of the newest intact step (damaged ones moved aside with a warning), or None."""
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = _restore(manager, step, params, opt_state)
    except state_lib.CheckpointError as e:
      failed.append((step, str(e)))
      logging.warning("%s; falling back to the previous checkpoint", e)
      continue
    for bad, _ in failed:  # moved only once an older step restores (else the encoder/config differs)
      state_lib.quarantine(manager, str(manager.directory), bad)
    return (step, *restored)
  if failed:
    raise state_lib.CheckpointError(f"no pre-training checkpoint in {manager.directory} can be restored (none was "
                                    f"moved): {failed[-1][1]}; use a fresh --workdir for another encoder or config")
  return None


def _save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict) -> None:
  state = jax.tree.map(np.asarray, {"params": params, "opt_state": opt_state})
  meta = dict(meta, checksums=state_lib.checksums(state))  # verified by _restore
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)
  manager.wait_until_finished()


def make_train_step(model: mmenc.MMEnc, tx: optax.GradientTransformation, loss_kwargs: dict, devices: list):
  """pmapped `(params, opt_state, batch, key) -> (params, opt_state, metrics)`; params/opt_state/batch carry a
  leading device axis, `key` is shared (each device folds in its index) and metrics come back averaged."""

  def step(params, opt_state, batch, key):
    key = jax.random.fold_in(key, jax.lax.axis_index("devices"))
    grad_fn = jax.value_and_grad(lambda p: ica.ica_loss(model, p, batch, key, **loss_kwargs), has_aux=True)
    (_, metrics), grads = grad_fn(params)
    grads = jax.lax.pmean(grads, "devices")
    metrics = jax.lax.pmean(metrics, "devices")
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.pmap(step, axis_name="devices", in_axes=(0, 0, 0, None), devices=devices, donate_argnums=(0, 1))


def pretrain(config, workdir: str) -> dict:
  """Runs (or resumes) ICA pre-training; returns the logged history summary {"first": {...}, "last": {...}}."""
  os.makedirs(workdir, exist_ok=True)
  main_process = distributed.is_main_process()
  with workdir_lib.locked(workdir, main_process):
    workdir_lib.check_or_record(config, os.path.join(os.path.abspath(workdir), "pretrain"), stage=1,
                                main_process=main_process)
    return _pretrain(config, workdir)


def _pretrain(config, workdir: str) -> dict:
  pre = config.pretrain
  # Process 0 first: it writes tokenizer.spm and the tfds dataset into the (shared) workdir, the others load them.
  tokenizer, items = distributed.main_process_first(_load_items, config, workdir)
  n_items = len(items["tokens"])
  devices = parallel.train_devices(config.train.num_devices)
  n_dev = len(devices)
  if pre.batch_size % n_dev:
    raise ValueError(f"config.pretrain.batch_size={pre.batch_size} must be divisible by the {n_dev} devices")
  if pre.batch_size > n_items:
    raise ValueError(f"config.pretrain.batch_size={pre.batch_size} exceeds the {n_items} items")
  model = mmenc.make_mmenc(pre, encoder_vocab_size(pre, tokenizer), tokenizer.pad_id)
  tx = make_optimizer(pre, pre.steps)
  params = init_params(model, jax.random.key(config.seed))
  opt_state = tx.init(params)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

  manager = _checkpoint_manager(workdir)
  try:
    start, meta = 0, {"history": []}
    newest = _restore_newest_intact(manager, params, opt_state)
    latest = None if newest is None else newest[0]
    if newest is not None:
      _, params, opt_state, meta = newest
      if meta.get("tokenizer") != tokenizer.fingerprint():
        raise ValueError(f"{manager.directory}: the checkpoint was trained with another tokenizer than "
                         f"{workdir}/{content.TOKENIZER_FILE}; use a fresh --workdir")
      start = latest
      logging.info("pretrain: resuming from step %d of %d (%s)", start, pre.steps, manager.directory)
    else:
      if pre.get("init_from", ""):
        loaded, source = init_from.load(os.path.expanduser(pre.init_from), model)
        params = init_from.apply(params, loaded)
        opt_state = tx.init(params)
        meta["init_from"] = {"dir": os.path.abspath(os.path.expanduser(pre.init_from)),
                             "source": source.get("source", "")}
        logging.info("pretrain: encoder initialised from %s (converted from %s)", pre.init_from,
                     source.get("source", "?"))
      logging.info("pretrain: MMEnc-%s, %d parameters, %d items, vocab %d, %d device(s), batch %d", pre.size,
                   n_params, n_items, len(tokenizer), n_dev, pre.batch_size)
    meta.update(tokenizer=tokenizer.fingerprint(), n_items=n_items, n_params=n_params, size=pre.size)
    if start >= pre.steps:
      if latest is None:  # steps = 0: keep the initial (random or loaded) encoder as the checkpoint
        _save(manager, 0, params, opt_state, meta)
      logging.info("pretrain: %d steps already done in %s", start, manager.directory)
      return _summary(meta)

    train_step = make_train_step(model, tx, _loss_kwargs(pre, tokenizer), devices)
    params, opt_state = parallel.replicate((params, opt_state), devices)
    rows = parallel.local_rows(devices)  # this process's devices' shards of each global batch
    base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    per_device = pre.batch_size // n_dev
    window, window_start, window_steps = {}, time.perf_counter(), 0
    for step in range(start, pre.steps):
      idx = batch_indices(config.seed, step, n_items, pre.batch_size)
      batch = {k: items[k][idx].reshape(n_dev, per_device, *items[k].shape[1:])[rows] for k in ("image", "tokens")}
      params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.fold_in(base_key, step))
      metrics = jax.block_until_ready(metrics)  # block each step: CPU all-reduce deadlock trap
      values = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}  # pmeaned: any local copy
      if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"pretrain: loss is {values['loss']} at step {step + 1}; lower config.pretrain.lr")
      for k, v in values.items():
        window[k] = window.get(k, 0.0) + v
      window_steps += 1
      done = step + 1
      if done == 1 or done % max(pre.log_every, 1) == 0 or done == pre.steps:
        elapsed = time.perf_counter() - window_start
        row = {k: v / window_steps for k, v in window.items()}
        row.update(step=done, items_per_s=window_steps * pre.batch_size / max(elapsed, 1e-9))
        meta["history"].append(row)
        logging.info("pretrain step %d/%d: loss %.4f  mlm %.4f (acc %.3f)  mim %.4f%s%s  %.1f items/s", done,
                     pre.steps, row["loss"], row["mlm"], row["mlm_acc"], row["mim"],
                     f"  itc {row['itc']:.4f}" if pre.itc_weight else "",
                     f"  cls-bow {row['bow']:.4f}" if pre.get("cls_bow_weight", 0.0) else "", row["items_per_s"])
        window, window_start, window_steps = {}, time.perf_counter(), 0
      if done % max(pre.checkpoint_every, 1) == 0 or done == pre.steps:
        host = parallel.unreplicate((params, opt_state))
        _save(manager, done, host[0], host[1], meta)  # every process: orbax saves collectively
    if distributed.is_main_process():
      _write_json(os.path.join(workdir, "pretrain_history.json"), meta["history"])
    return _summary(meta)
  finally:
    manager.close()


def _summary(meta: dict) -> dict:
  history = meta.get("history", [])
  return {"first": history[0] if history else None, "last": history[-1] if history else None}


def encoder_vocab_size(pre, tokenizer: content.Tokenizer) -> int:
  """Rows of the encoder's text embedding: the tokenizer's ids, or with `init_from` the converted checkpoint's rows
  (BEiT-3's 64,010 rows hold beit3.spm's 64,002 ids; the last rows are never produced by the tokenizer)."""
  if not pre.get("init_from", ""):
    return len(tokenizer)
  rows = int(init_from.read_meta(os.path.expanduser(pre.init_from))["vocab_size"])
  if len(tokenizer) > rows:
    raise content.DataError(f"config.pretrain.init_from={pre.init_from}: the checkpoint's text embedding has {rows} "
                            f"rows, the tokenizer {len(tokenizer)} ids; use the tokenizer the checkpoint was "
                            "trained with (--config.data.tokenizer=beit3.spm) or a smaller pretrain.vocab_size")
  return rows


def load_pretrained(config, workdir: str, tokenizer: content.Tokenizer) -> tuple[mmenc.MMEnc, Any, int]:
  """(model, params, step) of the latest pre-training checkpoint in `workdir`."""
  model = mmenc.make_mmenc(config.pretrain, encoder_vocab_size(config.pretrain, tokenizer), tokenizer.pad_id)
  params = init_params(model, jax.random.key(config.seed))
  tx = make_optimizer(config.pretrain, config.pretrain.steps)
  manager = _checkpoint_manager(workdir)
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"no pre-training checkpoint in {manager.directory}: run --config.stage=pretrain (or all) "
                       "with this --workdir first (pretrain.steps=0 saves the random initialisation)")
    params, _, _ = _restore(manager, step, params, tx.init(params))
  finally:
    manager.close()
  return model, params, step


def extract_features(model: mmenc.MMEnc, params: Any, images: np.ndarray, tokens: np.ndarray,
                     tokenizer: content.Tokenizer, batch_size: int) -> dict:
  """{variant: [n_items, hidden] float32} visual-[CLS] features of every item, in fixed-size jitted batches."""
  special_ids = tokenizer.special_ids

  @jax.jit
  def run(params, images, tokens):
    x = mmenc.normalize_images(images)
    b = tokens.shape[0]
    no_mask = jnp.zeros((b, model.n_patches), bool)
    words = ica.word_positions(tokens, special_ids)
    feats = lambda t, m: model.apply({"params": params}, x, t, m, method=model.features)
    return {"full": feats(tokens, no_mask),
            "mask_image": feats(tokens, jnp.ones_like(no_mask)),
            "mask_text": feats(jnp.where(words, tokenizer.mask_id, tokens), no_mask)}

  n = len(tokens)
  out = {k: [] for k in bridge.VARIANTS}
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)  # fixed shapes: one compilation
    img = np.concatenate([images[start:stop], np.zeros((pad,) + images.shape[1:], images.dtype)])
    tok = np.concatenate([tokens[start:stop],
                          np.full((pad,) + tokens.shape[1:], tokenizer.pad_id, tokens.dtype)])
    result = jax.device_get(run(params, img, tok))
    for k in out:
      out[k].append(result[k][:stop - start])
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def extract(config, workdir: str) -> dict:
  """Writes the feature table of every item (see the module docstring); returns {"n_items", "dim", "step"}."""
  with workdir_lib.locked(workdir, distributed.is_main_process()):
    return _extract(config, workdir)


def _extract(config, workdir: str) -> dict:
  tokenizer, items = _load_items(config, workdir)
  n_items = len(items["tokens"])
  model, params, step = load_pretrained(config, workdir, tokenizer)
  meta_path = os.path.join(workdir, _FEATURES_META)
  if os.path.isfile(meta_path) and bridge.has_feature_table(workdir, n_items):
    with open(meta_path, "r", encoding="utf-8") as f:
      done = json.load(f)
    if done.get("pretrain_step") == step and done.get("tokenizer") == tokenizer.fingerprint():
      logging.info("extract: %s already holds the features of pre-training step %d", workdir, step)
      return done
  start = time.perf_counter()
  tables = extract_features(model, params, items["image"], items["tokens"], tokenizer,
                            config.pretrain.extract_batch_size)
  elapsed = time.perf_counter() - start
  if distributed.is_main_process() and os.path.isfile(meta_path):
    os.remove(meta_path)  # the old marker must not vouch for the table being replaced
  bridge.save_feature_table(workdir, tables)  # every process joins the (collective) save; process 0 writes files
  info = {"n_items": n_items, "dim": int(tables["full"].shape[1]), "pretrain_step": step,
          "tokenizer": tokenizer.fingerprint(), "items_per_s": n_items * len(tables) / elapsed}
  if distributed.is_main_process():
    _write_json(meta_path, info)
  distributed.barrier("extract:written")  # stage 2 in this run reads the table next, in every process
  logging.info("extract: %d items x %d variants -> %s (%d-d, %.1f item-encodings/s, pre-training step %d)",
               n_items, len(tables), bridge.features_dir(workdir), info["dim"], info["items_per_s"], step)
  return info
