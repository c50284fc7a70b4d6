"""Stage 1: ICA pre-training of MMEnc on the items' images and texts, and extraction of the item feature table.

`pretrain(config, workdir)`: items.tsv -> tokenizer (`<workdir>/tokenizer.spm`: `data.tokenizer`'s sentencepiece
  model, or one trained on the item texts; data/content.py) -> tfds dataset (`<workdir>/tfds/`) -> AdamW (linear
  warm-up, cosine decay) on the ICA loss, run by train/loop.py (`Pretraining` is the stage; checkpoints in
  `<workdir>/pretrain/` every `pretrain.checkpoint_every` steps). Epoch e visits the items in the permutation of
  (seed, e) and a row's masks and dropout depend on its step and device only, so a resumed run, or one spread over
  other processes, sees exactly what an uninterrupted one does. Process 0 builds the tokenizer and the dataset
  first and alone writes pretrain_history.json. `pretrain.init_from = DIR` starts a fresh run from converted
  BEiT-3 weights (train/init_from.py: the encoder loaded, the MLM head tied to its text embedding, the other heads
  fresh); `pretrain.steps = 0` keeps the initial encoder, random or loaded ("BEiT-3 without ICA").

`extract(config, workdir)`: the latest checkpoint's encoder over every item -> the visual-[CLS] table
  `[n_items, hidden]` and the variants mask_image (every patch masked) and mask_text (every word masked), written by
  `bridge.save_feature_table`, in `pretrain.compute_dtype` at `pretrain.matmul_precision` (both recorded in
  features_meta.json); skipped when the workdir already holds the table of that checkpoint and arithmetic.

`encode_items(workdir, path, variant)`: the same features of other items (an items.tsv-layout file: new items), from
  the encoder, tokenizer and preprocessing that made the workdir's table; what `Run.add_items(items=...)` reads.
"""

import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alignrec_jax.data import atomic
from alignrec_jax.data import content
from alignrec_jax.data import synthetic
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError
from alignrec_jax.losses import ica
from alignrec_jax.models import mmenc
from alignrec_jax.train import bridge
from alignrec_jax.train import checks
from alignrec_jax.train import distributed
from alignrec_jax.train import init_from
from alignrec_jax.train import loop
from alignrec_jax.train import parallel
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib

_FEATURES_META = "features_meta.json"


def items_path(config) -> str:
  """`<data.root>/<data.items_file>` (the items file may be absolute)."""
  name = config.data.items_file
  return name if os.path.isabs(name) else os.path.join(os.path.expanduser(config.data.root), name)


def _load_items(config, workdir: str) -> tuple[content.Tokenizer, dict]:
  """The tokenizer and every item's arrays {"image" uint8 [n, s, s, 3], "tokens" int32 [n, L]}."""
  if config.data.synthetic:
    synthetic.ensure_synthetic_dataset(os.path.expanduser(config.data.root))
  tokenizer, source = content.prepare_content(config.pretrain, items_path(config), workdir,
                                              init_from.tokenizer_path(config))
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
  return dict(text_mask_ratio=pre.text_mask_ratio, image_mask_ratio=pre.image_mask_ratio,
              mlm_weight=pre.mlm_weight, mim_weight=pre.mim_weight, itc_weight=pre.itc_weight,
              itc_temperature=pre.itc_temperature, cls_bow_weight=pre.cls_bow_weight,
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


_LABEL = "pre-training checkpoint"


def _checkpointer(workdir: str) -> state_lib.Checkpointer:
  return state_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "pretrain"), keep_latest=2, label=_LABEL)


@functools.partial(jax.jit, static_argnums=2)
def _device_keys(base_key: jax.Array, step: int, n_devices: int) -> jax.Array:
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(step_key, d)))(jnp.arange(n_devices))


def device_keys(base_key: jax.Array, step: int, n_devices: int) -> np.ndarray:
  """[n_devices, 2] uint32: the raw key of each device at `step` (the step's key folded with the device's index),
  so that every process layout draws the same masks and dropout for the same rows."""
  return np.asarray(_device_keys(base_key, step, n_devices))


def ica_share(model: mmenc.MMEnc, loss_kwargs: dict, n_devices: int):
  """The ICA loss as the loop takes it: (params, inputs, batch, axis_name) -> this device's share of the whole
  batch's loss, its rows' mean over the number of devices (the shards are equal), and the metrics likewise.
  batch: {"image", "tokens", "key" (the device's raw key, `device_keys`)}."""
  def loss(params, inputs, batch, axis_name):
    del inputs, axis_name
    value, metrics = ica.ica_loss(model, params, batch, jax.random.wrap_key_data(batch["key"]), **loss_kwargs)
    return value / n_devices, jax.tree.map(lambda m: m / n_devices, metrics)
  return loss


class Pretraining(loop.Stage):
  """Stage 1 for the loop: one round = the steps up to the next checkpoint (`pretrain.checkpoint_every`); the loss
  is `ica_share`, whose sum over the devices is the whole batch's mean."""
  name = "pretrain"
  nan_hint = "lower config.pretrain.lr"

  def __init__(self, config, model: mmenc.MMEnc, tokenizer: content.Tokenizer, items: dict, n_devices: int):
    pre = config.pretrain
    self.unlogged = (("itc",) if not pre.itc_weight else ()) + (("bow",) if not pre.cls_bow_weight else ())
    self.config, self.items = config, items
    self.tx = make_optimizer(pre, pre.steps)
    self.every = max(pre.checkpoint_every, 1)
    self.log_every = max(pre.log_every, 1)
    self.base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.loss = ica_share(model, _loss_kwargs(pre, tokenizer), n_devices)

  def rounds(self, meta: dict) -> range:
    # a preemption checkpoint may hold every step of its round, but not the round's end (its checkpoint)
    first = meta["partial"]["round"] if "partial" in meta else meta.get("steps", 0) // self.every
    return range(first, -(-self.config.pretrain.steps // self.every))

  def total_steps(self, meta: dict) -> int:
    return self.config.pretrain.steps

  def batches(self, round_: int, n_devices: int, rows: slice):
    steps = self.config.pretrain.steps
    for step in range(round_ * self.every, min((round_ + 1) * self.every, steps)):
      idx = batch_indices(self.config.seed, step, len(self.items["tokens"]), self.config.pretrain.batch_size)
      batch = {k: self.items[k][idx].reshape(n_devices, -1, *self.items[k].shape[1:]) for k in ("image", "tokens")}
      batch["key"] = device_keys(self.base_key, step, n_devices)
      yield {k: v[rows] for k, v in batch.items()}

  def position_name(self, round_: int, step) -> str:
    return f"step {round_ * self.every + (step or 0) + 1}"

  def log_window(self, row: dict, steps_per_s: float, meta: dict) -> None:
    row["items_per_s"] = steps_per_s * self.config.pretrain.batch_size
    meta["history"].append(row)

  def end_round(self, round_: int, means: dict, meta: dict, representations) -> tuple[int, bool, str]:
    return meta["steps"], False, ""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "pretrain")


def pretrain(config, workdir: str) -> dict:
  """Runs (or resumes) ICA pre-training; returns the logged history summary {"first": {...}, "last": {...}}.

  Checks the stage-1 config and claims the workdir (train/workdir.py) before any data loads."""
  checks.check_stage1(config)
  with workdir_lib.claimed(config, workdir, [(config, checkpoint_dir(workdir), 1)], distributed.is_main_process()):
    return _pretrain(config, workdir)


def _pretrain(config, workdir: str) -> dict:
  pre = config.pretrain
  # Process 0 first: it writes tokenizer.spm and the tfds dataset into the (shared) workdir, the others load them.
  tokenizer, items = distributed.main_process_first(_load_items, config, workdir)
  n_items = len(items["tokens"])
  devices = parallel.train_devices(config.train.num_devices)
  n_dev = len(devices)
  if pre.batch_size % n_dev:
    raise ConfigError(f"config.pretrain.batch_size={pre.batch_size} must be divisible by the {n_dev} devices")
  if pre.batch_size > n_items:
    raise ConfigError(f"config.pretrain.batch_size={pre.batch_size} exceeds the {n_items} items")
  model = mmenc.make_mmenc(pre, encoder_vocab_size(pre, tokenizer), tokenizer.pad_id)
  stage = Pretraining(config, model, tokenizer, items, n_dev)
  params = init_params(model, jax.random.key(config.seed))
  opt_state = stage.tx.init(params)
  n_params = sum(int(p.size) for p in jax.tree.leaves(params))

  with _checkpointer(workdir) as ckpt:
    meta = {"history": [], "steps": 0}
    newest = ckpt.restore_for_resume({"params": params, "opt_state": opt_state})
    if newest is not None:
      start, restored, meta = newest
      params, opt_state = restored.pop("params"), restored.pop("opt_state")
      if meta.get("tokenizer") != tokenizer.fingerprint():
        raise DataError(f"{ckpt.directory}: the checkpoint was trained with another tokenizer than "
                        f"{workdir}/{content.TOKENIZER_FILE}; use a fresh --workdir")
      meta["steps"] = start
      logging.info("pretrain: resuming from step %d of %d (%s)", start, pre.steps, ckpt.directory)
    else:
      if pre.init_from:
        loaded, source = init_from.load(os.path.expanduser(pre.init_from), model)
        params = init_from.apply(params, loaded)
        del loaded  # the loaded host copy; the parameters hold their own
        opt_state = stage.tx.init(params)
        meta["init_from"] = {"dir": os.path.abspath(os.path.expanduser(pre.init_from)),
                             "source": source.get("source", "")}
        logging.info("pretrain: encoder initialised from %s (converted from %s)", pre.init_from,
                     source.get("source", "?"))
      logging.info("pretrain: MMEnc-%s, %d parameters, %d items, vocab %d, %d device(s), batch %d", pre.size,
                   n_params, n_items, len(tokenizer), n_dev, pre.batch_size)
    meta.update(tokenizer=tokenizer.fingerprint(), n_items=n_items, n_params=n_params, size=pre.size)
    if newest is None and pre.steps == 0:  # keep the initial (random or loaded) encoder as the checkpoint
      ckpt.save(0, {"params": params, "opt_state": opt_state}, meta)
    if meta["steps"] >= pre.steps and "partial" not in meta:
      logging.info("pretrain: %d steps already done in %s", meta["steps"], ckpt.directory)
      return _summary(meta)
    train_state = {"params": params, "opt_state": opt_state, "inputs": None}  # fit empties it: no host copy stays
    del params, opt_state
    meta = loop.fit(stage, train_state, devices, ckpt, meta)
  if distributed.is_main_process():
    atomic.write_json(os.path.join(workdir, "pretrain_history.json"), meta["history"])
  return _summary(meta)


def _summary(meta: dict) -> dict:
  history = meta.get("history", [])
  return {"first": history[0] if history else None, "last": history[-1] if history else None}


def encoder_vocab_size(pre, tokenizer: content.Tokenizer) -> int:
  """Rows of the encoder's text embedding: the tokenizer's ids, or with `init_from` the converted checkpoint's rows
  (BEiT-3's 64,010 rows hold beit3.spm's 64,002 ids; the last rows are never produced by the tokenizer)."""
  if not pre.init_from:
    return len(tokenizer)
  rows = int(init_from.read_meta(os.path.expanduser(pre.init_from))["vocab_size"])
  if len(tokenizer) > rows:
    raise content.DataError(f"config.pretrain.init_from={pre.init_from}: the checkpoint's text embedding has {rows} "
                            f"rows, the tokenizer {len(tokenizer)} ids; use the tokenizer the checkpoint was "
                            "trained with (convert it with --tokenizer=beit3.spm, or --config.data.tokenizer)")
  return rows


def load_pretrained(config, workdir: str, tokenizer: content.Tokenizer) -> tuple[mmenc.MMEnc, Any, int]:
  """(model, params, step) of the latest pre-training checkpoint in `workdir`."""
  model = mmenc.make_mmenc(config.pretrain, encoder_vocab_size(config.pretrain, tokenizer), tokenizer.pad_id)
  params = init_params(model, jax.random.key(config.seed))
  opt_state = make_optimizer(config.pretrain, config.pretrain.steps).init(params)
  with _checkpointer(workdir) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise DataError(f"no pre-training checkpoint in {ckpt.directory}: run --config.stage=pretrain (or all) "
                      "with this --workdir first (pretrain.steps=0 saves the random initialisation)")
    state, _ = ckpt.restore(step, {"params": params, "opt_state": opt_state})
  return model, state["params"], step


def extract_features(model: mmenc.MMEnc, params: Any, images: np.ndarray, tokens: np.ndarray,
                     tokenizer: content.Tokenizer, batch_size: int, variants=bridge.VARIANTS) -> dict:
  """{variant: [n_items, hidden] float32} visual-[CLS] features of every item, in fixed-size jitted batches."""
  special_ids = tokenizer.special_ids

  @jax.jit
  def run(params, images, tokens):
    x = mmenc.normalize_images(images)
    b = tokens.shape[0]
    no_mask = jnp.zeros((b, model.n_patches), bool)
    feats = lambda t, m: model.apply({"params": params}, x, t, m, method=model.features)
    inputs = {"full": lambda: (tokens, no_mask), "mask_image": lambda: (tokens, jnp.ones_like(no_mask)),
              "mask_text": lambda: (jnp.where(ica.word_positions(tokens, special_ids), tokenizer.mask_id, tokens),
                                    no_mask)}
    return {v: feats(*inputs[v]()) for v in variants}

  n = len(tokens)
  out = {k: [] for k in variants}
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


def _arithmetic(pre) -> dict:
  """How the encoder computed a table (features_meta.json): a table from other arithmetic is extracted again."""
  return {"compute_dtype": pre.compute_dtype, "matmul_precision": pre.matmul_precision}


def extract(config, workdir: str) -> dict:
  """Writes the feature table of every item (see the module docstring); returns {"n_items", "dim", "step"}."""
  checks.check_stage1(config)
  with workdir_lib.claimed(config, workdir, (), distributed.is_main_process()):
    return _extract(config, workdir)


def _extract(config, workdir: str) -> dict:
  tokenizer, items = _load_items(config, workdir)
  n_items = len(items["tokens"])
  model, params, step = load_pretrained(config, workdir, tokenizer)
  meta_path = os.path.join(workdir, _FEATURES_META)
  arithmetic = _arithmetic(config.pretrain)
  if os.path.isfile(meta_path) and bridge.has_feature_table(workdir, n_items):
    with open(meta_path, "r", encoding="utf-8") as f:
      done = json.load(f)
    if (done.get("pretrain_step") == step and done.get("tokenizer") == tokenizer.fingerprint()
        and all(done.get(k) == v for k, v in arithmetic.items())):
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
          "tokenizer": tokenizer.fingerprint(), **arithmetic, "items_per_s": n_items * len(tables) / elapsed}
  if distributed.is_main_process():
    atomic.write_json(meta_path, info)
  distributed.barrier("extract:written")  # stage 2 in this run reads the table next, in every process
  logging.info("extract: %d items x %d variants -> %s (%d-d, %.1f item-encodings/s, pre-training step %d)",
               n_items, len(tables), bridge.features_dir(workdir), info["dim"], info["items_per_s"], step)
  return info


def encode_items(workdir: str, path: str, variant: str = "full") -> tuple[np.ndarray, tuple]:
  """(features [n, hidden] float32, texts) of the items of `path` (the items.tsv layout, itemIDs 0..n-1 in the
  order of the returned rows) as `extract` computed the feature table of the stage-1 `workdir`: the checkpoint and
  tokenizer that table was extracted with, its image size and text length. DataError (one line naming the file and
  line) for a bad row or an image that does not decode; ValueError when the workdir no longer holds that encoder."""
  config_path = os.path.join(os.path.abspath(workdir), "pretrain", workdir_lib.CONFIG_NAME)
  meta_path = os.path.join(workdir, _FEATURES_META)
  if not os.path.isfile(config_path) or not os.path.isfile(meta_path):
    raise DataError(f"{workdir} holds no stage-1 encoder with an extracted table ({config_path} or {meta_path} is "
                    "missing)")
  with open(config_path, "r", encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(meta_path, "r", encoding="utf-8") as f:
    extracted = json.load(f)
  tokenizer = content.Tokenizer.load(os.path.join(workdir, content.TOKENIZER_FILE))
  if tokenizer.fingerprint() != extracted.get("tokenizer"):
    raise DataError(f"{workdir}: its tokenizer is not the one its feature table was extracted with")
  # the arithmetic the table was extracted with; a table without the keys is older than them: float32 at JAX's
  # default precision
  config.pretrain.compute_dtype = extracted.get("compute_dtype", "float32")
  config.pretrain.matmul_precision = extracted.get("matmul_precision", "default")
  model, params, step = load_pretrained(config, workdir, tokenizer)
  if step != extracted.get("pretrain_step"):
    raise DataError(f"{workdir}: its latest stage-1 checkpoint is step {step}, its feature table was extracted at "
                    f"step {extracted.get('pretrain_step')}: the encoder that made the run's features is gone")
  table = content.read_items(path)
  pre = config.pretrain
  images = np.stack([content.load_image(image, pre.image_size, f"{path}, line {line}")
                     for image, line in zip(table.image_paths, table.line_numbers)])
  tokens = np.stack([tokenizer.encode(text, pre.max_text_len) for text in table.texts])
  features = extract_features(model, params, images, tokens, tokenizer, pre.extract_batch_size, (variant,))
  return features[variant], table.texts
