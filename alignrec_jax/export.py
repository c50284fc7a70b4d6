"""From a trained stage-2 run to recommendations: the `export` stage and the Python API `load_run`.

  python -m alignrec_jax.main --config=configs/lfm2k.py --workdir=/tmp/lfm2k --config.stage=export
  python -m alignrec_jax.recommend --workdir=/tmp/lfm2k --user=0 --k=10

  run = alignrec_jax.export.load_run("/tmp/lfm2k")   # also alignrec_jax.load_run
  items, scores = run.recommend([0, 1], k=10)         # [2, 10] item ids and scores, train items excluded
  run.item_text(int(items[0, 0]))                     # the item table's text ("Britney Spears" on lfm2k)

The export stage takes the config the run was trained with (only `EXPORT_FREE` settings from its command) and
restores the BEST checkpoint of a finished stage-2 run (the epoch selected on the valid metric,
whose test metrics results.json reports), computes the user and item vectors with the model's `representations`,
the function evaluation scores with (score = dot product), and writes into `<workdir>/export/`:

  user_emb.npy   [n_users, d] float32, row = MMRec userID
  item_emb.npy   [n_items, d] float32, row = MMRec itemID
  topk.tsv       userID, rank (1-based), itemID, score: the top `export.k` items of each user of `export.users`
                 (valid | test | all), the user's train items masked as in evaluation (eval/ranking.py, the same
                 blocked top-k); a user with fewer than k unmasked items gets fewer rows
  manifest.json  the config, best epoch and checkpoint step, the selection metric and its value, the shapes, and
                 the sha256 of each file above

The four files are written into a temporary folder that replaces `export/` only when all of them are complete.
docs/formats.md describes the formats. With model.cold_start='neighbours' the item vectors of items without train
interactions are the neighbour rule's (models/new_items.py), as evaluation scored them.

New items: `run.add_items(features=F)` ([n, d] rows in the run's feature slot), or `run.add_items(items=FILE)` (the
items.tsv layout, encoded by the run's stage-1 encoder) attaches them to the run's trained items by the neighbour
rule and gives them the ids after the run's own; `run.recommend(users, items=ids)` ranks among
given items only, `run.cold_items(split)` lists a cold-start run's held-out items and `run.item_features(ids)` their
feature rows. Nothing on disk changes.
"""

import dataclasses
import hashlib
import json
import os
from typing import Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.eval import ranking
from alignrec_jax.models import get_model
from alignrec_jax.models import new_items
from alignrec_jax.train import bridge
from alignrec_jax.train import parallel
from alignrec_jax.train import stage2
from alignrec_jax.train import pretrain
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib

EXPORT_DIR = "export"
FILES = ("user_emb.npy", "item_emb.npy", "topk.tsv")
USERS = ("valid", "test", "all")
_TSV_BLOCK = 4096  # users formatted per write


class RunError(ValueError):
  """A workdir that cannot be exported or loaded, or a bad request to a loaded run; the message says which."""


# ------------------------------------------------------------------------------------------------- the run on disk


def finished_results(workdir: str) -> dict:
  """results.json of a finished stage-2 run in `workdir` (RunError naming what is missing otherwise)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isdir(workdir):
    raise RunError(f"workdir not found: {workdir}")
  try:
    results = atomic.read_json_object(path)
  except FileNotFoundError:
    raise RunError(f"{workdir} holds no finished stage-2 run ({path} is missing): train it to the end first "
                   "(python -m alignrec_jax.main --config=... --workdir=... with config.stage=train)") from None
  except (OSError, ValueError) as e:
    raise RunError(str(e)) from None
  if int(results.get("best_epoch", -1)) < 0:
    raise RunError(f"{path}: no best epoch (key 'best_epoch'): not the results of a finished stage-2 run")
  return results


def _to_tuples(value):
  """JSON lists back to the tuples the configs use (config.json stores tuples as lists)."""
  if isinstance(value, dict):
    return {k: _to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_to_tuples(v) for v in value)
  return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was last run with (`<workdir>/config.json`, written by alignrec_jax.main)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{path} is missing: the run was not made with python -m alignrec_jax.main, so its config is "
                   "unknown")
  try:
    with open(path, "r", encoding="utf-8") as f:
      return ml_collections.ConfigDict(_to_tuples(json.load(f)))
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: not a readable config ({e})") from None


def trained_config(workdir: str) -> ml_collections.ConfigDict:
  """The stage-2 config the run's checkpoints were trained with (`checkpoints/run_config.json`; for a
  --config.stage=all run it points data.features_from at the workdir), else config.json (older runs)."""
  path = os.path.join(workdir, "checkpoints", workdir_lib.CONFIG_NAME)
  if not os.path.isfile(path):
    config = read_config(workdir)
    if config.stage == "all" and not config.data.features_from:
      config.data.features_from = workdir  # as main.run trained it
    return config
  try:
    with open(path, "r", encoding="utf-8") as f:
      return ml_collections.ConfigDict(_to_tuples(json.load(f)))
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: not a readable config ({e})") from None


# what an export may set otherwise than the run it exports: its own section and how the vectors are computed
EXPORT_FREE = ("export", "eval.batch_users", "train.num_devices")


def config_for_export(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The trained run's config with the export's own settings (`EXPORT_FREE`) from `config`; RunError naming the key
  when `config` sets a data.* or model.* value other than the run was trained with (such an export would compute
  other vectors than the checkpoint's under the checkpoint's name)."""
  trained = trained_config(workdir)
  given, stored = workdir_lib.resolved_config(config), workdir_lib.resolved_config(trained)
  run_dir = os.path.abspath(os.path.expanduser(workdir))
  for key in sorted(set(given) & set(stored)):
    if not key.startswith(("data.", "model.")) or given[key] == stored[key]:
      continue
    if key.startswith("model.") and key.count(".") >= 2 and not key.startswith(f"model.{stored['model.name']}."):
      continue  # another model's own section
    if (key == "data.features_from" and not given[key]
        and os.path.abspath(os.path.expanduser(str(stored[key]))) == run_dir):
      continue  # a --config.stage=all run: its stage 2 read the workdir's own table
    raise RunError(f"config.{key}={given[key]!r}: the run in {workdir} was trained with {stored[key]!r}; an export "
                   f"takes only the settings {', '.join(EXPORT_FREE)} (drop the override, or train a new run)")
  out = trained.copy_and_resolve_references()
  with out.unlocked():
    out.export = config.export
    out.eval.batch_users = config.eval.batch_users
    out.train.num_devices = config.train.num_devices
  return out


def best_vectors(config: ml_collections.ConfigDict, workdir: str,
                 data: Optional[mmrec.RecData] = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """(user_emb [U, d], item_emb [I, d], meta) of the best checkpoint in `workdir`, computed as the trainer's
  evaluation computes them: the model's `representations` on the built inputs, on the trainer's devices."""
  if data is None:
    data = bridge.load_dataset(config.data)
  model, inputs, params, opt_state = stage2.build(config, data)
  directory = stage2.checkpoint_dir(workdir)
  try:
    params, meta = state_lib.restore_best_params(directory, params, opt_state)
  except FileNotFoundError as e:
    raise RunError(str(e)) from None
  except state_lib.CheckpointError as e:  # damaged, or another model or config (the checkpointer checks both)
    advice = state_lib.what_to_do(e.kind)
    message = str(e).removesuffix("; " + advice)  # the resume's advice, replaced by the export's
    if e.kind == state_lib.MISMATCH:
      raise RunError(f"{message} (export with the config the run was trained with)") from None
    raise RunError(f"{message}; it cannot be exported as it is: {advice.replace('rerun', 'export')}") from None
  devices = parallel.local_devices(config.train.num_devices)
  representations = parallel.device_map(lambda p, i, axis_name: model.representations(p, i), devices)
  user_emb, item_emb = parallel.get_replicated(
      representations(parallel.put_replicated(params, devices), parallel.put_replicated(inputs, devices)), devices)
  user_emb, item_emb = np.asarray(user_emb), np.asarray(item_emb)
  cold_start = new_items.cold_start(model, data, config)
  if cold_start is not None and item_emb.ndim == 2 and item_emb.shape[0] == data.n_items:
    item_emb = cold_start(item_emb)  # the table evaluation scored with
  if (user_emb.ndim != 2 or item_emb.ndim != 2 or user_emb.shape[1] != item_emb.shape[1]
      or user_emb.shape[0] != data.n_users or item_emb.shape[0] != data.n_items):
    raise RunError(f"model {config.model.name!r} scores with something other than user x item dot products "
                   f"(representations of shapes {user_emb.shape}, {item_emb.shape}): it cannot be exported")
  return user_emb.astype(np.float32), item_emb.astype(np.float32), meta


# ------------------------------------------------------------------------------------------------- the export stage


def _check_best_epoch(meta: dict, results: dict, workdir: str) -> None:
  if meta["best_epoch"] != results["best_epoch"]:
    raise RunError(f"the checkpoints' best epoch ({meta['best_epoch']}) is not results.json's "
                   f"({results['best_epoch']}): the run in {workdir} was continued and has not finished; rerun its "
                   "training command first")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _scores(user_emb: np.ndarray, item_emb: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """[n, k] float32 dot products user_emb[users[n]] . item_emb[items[n, k]]."""
  return np.einsum("nd,nkd->nk", user_emb[users], item_emb[items]).astype(np.float32)


def _write_topk(path: str, split: ranking.EvalSplit, top: np.ndarray, user_emb: np.ndarray,
                item_emb: np.ndarray) -> int:
  """Writes topk.tsv; rows whose item is masked (users with fewer than k unmasked items) are left out."""
  n_rows = 0
  masked = ranking.hits_matrix(top, dataclasses.replace(split, truth_indptr=split.mask_indptr,
                                                        truth_items=split.mask_items))
  with open(path, "w", encoding="utf-8") as f:
    f.write("userID\trank\titemID\tscore\n")
    for lo in range(0, len(split.users), _TSV_BLOCK):
      users, items = split.users[lo:lo + _TSV_BLOCK], top[lo:lo + _TSV_BLOCK]
      scores = _scores(user_emb, item_emb, users, items)
      keep = ~masked[lo:lo + _TSV_BLOCK]
      lines = [f"{u}\t{r + 1}\t{items[n, r]}\t{scores[n, r]:.7g}"
               for n, u in enumerate(users) for r in np.flatnonzero(keep[n])]
      if lines:
        f.write("\n".join(lines) + "\n")
      n_rows += len(lines)
  return n_rows


def export_split(data: mmrec.RecData, which: str) -> ranking.EvalSplit:
  """The users of `export.users` with their train items masked as in evaluation."""
  if which in ("valid", "test"):
    return ranking.make_eval_split(data, which)
  if which == "all":
    return ranking.make_user_split(data, np.arange(data.n_users), name="all")
  raise RunError(f"config.export.users={which!r} must be one of {USERS}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The export stage: writes <workdir>/export/ from the best checkpoint; returns the manifest. Holds the workdir's
  lock (not while a run trains in it); writes nothing else (config.json stays the run's)."""
  if not os.path.isdir(workdir):
    raise RunError(f"workdir not found: {workdir}")
  with workdir_lib.locked(workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  export_config = config.export
  k, which = int(export_config.k), str(export_config.users)
  if k < 1:
    raise RunError(f"config.export.k={k} must be >= 1")
  if which not in USERS:
    raise RunError(f"config.export.users={which!r} must be one of {USERS}")
  if jax.process_count() > 1:
    raise RunError("the export stage runs in one process: start it without --num_processes / coordinator")
  results = finished_results(workdir)
  config = config_for_export(config, workdir)
  data = bridge.load_dataset(config.data)
  user_emb, item_emb, meta = best_vectors(config, workdir, data)
  _check_best_epoch(meta, results, workdir)
  split = export_split(data, which)
  top = ranking.topk_items(user_emb, item_emb, split, k=k, batch_users=config.eval.batch_users)
  out_dir = os.path.join(workdir, EXPORT_DIR)
  with atomic.atomic_dir(out_dir) as tmp:
    np.save(os.path.join(tmp, "user_emb.npy"), user_emb)
    np.save(os.path.join(tmp, "item_emb.npy"), item_emb)
    n_rows = _write_topk(os.path.join(tmp, "topk.tsv"), split, top, user_emb, item_emb)
    valid_metric = results.get("valid_metric", config.eval.valid_metric)
    manifest = {
        "model": config.model.name,
        "dataset": config.data.name,
        "best_epoch": results["best_epoch"],
        "checkpoint_step": meta["best_step"],
        "selected_on": {"split": "valid", "metric": valid_metric,
                        "value": results.get("valid", {}).get(valid_metric)},
        "test_metrics": results.get("test", {}),
        "score": "dot product of user_emb and item_emb rows",
        "k": min(k, data.n_items),
        "users": which,
        "shapes": {"user_emb": list(user_emb.shape), "item_emb": list(item_emb.shape),
                   "topk": [int(len(split.users)), min(k, data.n_items)], "topk_rows": n_rows},
        "cold_items": ({name: [int(i) for i in items] for name, items in data.cold_items.items()}
                       if data.cold_items else None),  # items held out of training (their rows: model.cold_start)
        "cold_start": config.model.cold_start,
        "sha256": {name: _sha256(os.path.join(tmp, name)) for name in FILES},
        "config": json.loads(config.to_json_best_effort()),
    }
    atomic.write_json(os.path.join(tmp, "manifest.json"), manifest)
  logging.info("exported the best epoch %d (valid %s %s) of %s to %s: %d users x %d items, d=%d, %d top-k rows",
               manifest["best_epoch"], valid_metric, manifest["selected_on"]["value"], workdir, out_dir,
               user_emb.shape[0], item_emb.shape[0], user_emb.shape[1], n_rows)
  return manifest


# ------------------------------------------------------------------------------------------------- the Python API


def read_item_table(path: str, text_column: str, n_items: int) -> dict:
  """{itemID: text} from a tab-separated table with a header naming `itemID` and `text_column`."""
  if not os.path.isfile(path):
    raise RunError(f"item table not found: {path} (config.export.item_table)")
  table = {}
  with open(path, "r", encoding="utf-8") as f:
    header = f.readline().rstrip("\r\n").split("\t")
    if "itemID" not in header or text_column not in header:
      raise RunError(f"{path}, line 1: needs columns 'itemID' and {text_column!r} (config.export.item_text), "
                     f"has {header}")
    id_col, text_col = header.index("itemID"), header.index(text_column)
    for lineno, line in enumerate(f, start=2):
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) != len(header):
        if not line.strip():
          continue
        raise RunError(f"{path}, line {lineno}: expected {len(header)} tab-separated fields, got {len(fields)}")
      try:
        item = int(fields[id_col])
      except ValueError:
        raise RunError(f"{path}, line {lineno}: itemID must be an integer, got {fields[id_col]!r}") from None
      if 0 <= item < n_items:
        table[item] = fields[text_col]
  return table


def _item_table_path(config: ml_collections.ConfigDict) -> str:
  """The configured item table, else the data's items.tsv when there is one ('' when there is none)."""
  root = os.path.expanduser(config.data.root)
  name = config.export.item_table or config.data.items_file
  if not name:
    return ""
  path = name if os.path.isabs(name) else os.path.join(root, name)
  if not config.export.item_table and not os.path.isfile(path):
    return ""  # the default items.tsv is optional
  return path


class Run:
  """A finished stage-2 run, ready to recommend: see `load_run`. Items added with `add_items` get the ids after the
  run's own and take part in `recommend` and `similar_items` like every other item."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, results: dict, data: mmrec.RecData,
               user_emb: np.ndarray, item_emb: np.ndarray, items: Optional[dict], slots: tuple = ()):
    self.workdir, self.config, self.results = workdir, config, results
    self.user_emb = user_emb
    self.best_epoch = int(results["best_epoch"])
    self._items = items
    self._slots = tuple(slots)  # the model's content slots (models/new_items.py); () for an ID-only model
    self._trained_emb = item_emb  # the run's own items: new items are attached to them only
    self._rule = None
    self._set_items(data, item_emb)

  def _set_items(self, data: mmrec.RecData, item_emb: np.ndarray) -> None:
    self.data, self.item_emb = data, item_emb
    norms = np.linalg.norm(item_emb, axis=1, keepdims=True)
    self._unit_items = item_emb / np.maximum(norms, 1e-12)

  @property
  def n_users(self) -> int:
    return self.data.n_users

  @property
  def n_items(self) -> int:
    return self.data.n_items

  def cold_items(self, split: str = "test") -> np.ndarray:
    """The item ids a cold-start protocol run held out of training for `split` ("valid"/"test" or
    "valid_cold"/"test_cold"), sorted."""
    name = split if split.endswith("_cold") else f"{split}_cold"
    if not self.data.cold_items:
      raise RunError(f"{self.workdir} was not trained with cold-start items (config.data.cold_items): it holds no "
                     "cold items")
    if name not in self.data.cold_items:
      raise RunError(f"unknown cold split {split!r}: expected 'valid' or 'test'")
    return np.asarray(self.data.cold_items[name], np.int32).copy()

  def item_features(self, item_ids):
    """The content feature rows of the items (the run's and added ones): [n, d] for a model with one content slot,
    {slot: [n, d]} for several. RunError for an ID-only model."""
    self._need_content("item_features")
    items, _ = self._ids(item_ids, self.n_items, "item")
    rows = {slot: np.asarray(self.data.features[slot])[items] for slot in self._slots}
    return rows[self._slots[0]] if len(rows) == 1 else rows

  def add_items(self, features=None, items: Optional[str] = None) -> np.ndarray:
    """Adds new items scored by the neighbour rule (models/new_items.py) and returns their ids [n] (after every
    existing id). Nothing on disk changes and the existing items' vectors stay as they are.

    features: [n, d] rows in the run's feature slot (a model with several slots: {slot: [n, d_slot]}), each row
      checked for width and finite values (RunError naming the row).
    items: a file in the items.tsv layout (itemID 0..n-1 numbering its rows, text, image path), for a run whose
      features came from stage 1 (data.features_from): each row encoded by that workdir's encoder, tokenizer and
      preprocessing, as its extraction did (`pretrain.encode_items`); `item_text` then gives the rows' texts.
    """
    self._need_content("add_items")
    if (features is None) == (items is None):
      raise RunError("add_items needs one of features=[n, d] (the new items' rows in the run's feature slot) or "
                     "items=FILE (an items.tsv-layout file, for a run whose features came from stage 1)")
    texts = None
    if items is not None:
      features, texts = self._encode(items)
    tables = features if isinstance(features, dict) else {self._slots[0]: features}
    if sorted(tables) != sorted(self._slots):
      raise RunError(f"add_items: features for slots {sorted(tables)}, the run's model reads {list(self._slots)}")
    checked, n_new = {}, None
    for slot in self._slots:
      table = _feature_rows(tables[slot], np.asarray(self.data.features[slot]).shape[1], slot)
      if n_new is not None and len(table) != n_new:
        raise RunError(f"add_items: slot {slot!r} has {len(table)} rows, another slot {n_new}")
      checked[slot], n_new = table, len(table)
    if self._rule is None:
      trained = new_items.trained_items(self.data.train, self._trained_emb.shape[0])
      rows = new_items.similarity_rows({s: np.asarray(self.data.features[s])[:len(trained)] for s in self._slots},
                                       self._slots)
      self._rule = new_items.NeighbourRule(np.flatnonzero(trained), rows[trained], int(self.config.model.knn_k))
    vectors = self._rule.vectors(self._trained_emb, new_items.similarity_rows(checked, self._slots))
    first = self.n_items
    features = {s: np.concatenate([np.asarray(self.data.features[s]), checked[s]]) for s in self._slots}
    self._set_items(dataclasses.replace(self.data, n_items=first + n_new, features=features),
                    np.concatenate([self.item_emb, vectors]).astype(np.float32))
    if texts is not None:
      self._items = {**(self._items or {}), **{first + i: text for i, text in enumerate(texts)}}
    return np.arange(first, first + n_new, dtype=np.int32)

  def _encode(self, items: str) -> tuple[dict, tuple]:
    """({slot: [n, d]}, texts) of an items.tsv-layout file, from the stage-1 workdir the run's features came from."""
    stage1 = os.path.expanduser(str(self.config.data.features_from))
    if not stage1:
      raise RunError(f"add_items(items={items}): the features of {self.workdir} did not come from stage 1 "
                     f"(data.features_from is empty; they are data.image_feat={self.config.data.image_feat!r}), so no "
                     "encoder can compute new rows: pass add_items(features=[n, d] array)")
    if self._slots != ("image",):
      raise RunError(f"add_items(items={items}): model {self.config.model.name!r} also reads the slots "
                     f"{[s for s in self._slots if s != 'image']}, which stage 1 does not compute: pass "
                     "add_items(features={slot: [n, d]})")
    try:
      table, texts = pretrain.encode_items(stage1, os.path.expanduser(items),
                                           self.config.data.features_variant)
    except (ValueError, OSError) as e:  # DataError (a ValueError) names the file and line
      raise RunError(f"add_items(items={items}): {e}") from None
    return {"image": table}, texts

  def save_export(self) -> str:
    """Writes the run's vectors with the added items into a new folder `<workdir>/export_added_<n_items>` beside
    `export/` (the layout of export/, plus `new_items_<slot>.npy`, the added items' feature rows), atomically;
    returns its path. export/ and the checkpoints are not touched."""
    n_trained = self._trained_emb.shape[0]
    if self.n_items == n_trained:
      raise RunError("save_export: no items were added (add_items first); the run's own export is `export/`")
    k = int(self.config.export.k)
    split = ranking.make_user_split(self.data, np.arange(self.n_users), name="all")
    top = ranking.topk_items(self.user_emb, self.item_emb, split, k=k, batch_users=self.config.eval.batch_users)
    out_dir = os.path.join(self.workdir, f"{EXPORT_DIR}_added_{self.n_items}")
    with atomic.atomic_dir(out_dir) as tmp:
      np.save(os.path.join(tmp, "user_emb.npy"), self.user_emb)
      np.save(os.path.join(tmp, "item_emb.npy"), self.item_emb)
      n_rows = _write_topk(os.path.join(tmp, "topk.tsv"), split, top, self.user_emb, self.item_emb)
      added = {}
      for slot in self._slots:
        added[slot] = f"new_items_{slot}.npy"
        np.save(os.path.join(tmp, added[slot]), np.asarray(self.data.features[slot])[n_trained:])
      atomic.write_json(os.path.join(tmp, "manifest.json"), {
          "model": self.config.model.name, "dataset": self.config.data.name, "best_epoch": self.best_epoch,
          "trained_items": n_trained, "added_items": [n_trained, self.n_items - 1], "added_features": added,
          "added_by": "the neighbour rule (alignrec_jax/models/new_items.py)",
          "score": "dot product of user_emb and item_emb rows", "k": min(k, self.n_items), "users": "all",
          "shapes": {"user_emb": list(self.user_emb.shape), "item_emb": list(self.item_emb.shape),
                     "topk": [int(len(split.users)), min(k, self.n_items)], "topk_rows": n_rows},
          "sha256": {name: _sha256(os.path.join(tmp, name)) for name in FILES},
          "config": json.loads(self.config.to_json_best_effort())})
    return out_dir

  def _need_content(self, what: str) -> None:
    if not self._slots:
      raise RunError(f"{what}: model {self.config.model.name!r} scores items by their ID embedding alone, so it "
                     "cannot score an item it was not trained on (use a content model: alignrec, vbpr, freedom, ...)")

  def _ids(self, ids, n: int, what: str) -> tuple[np.ndarray, bool]:
    scalar = np.ndim(ids) == 0
    try:
      arr = np.asarray(ids).reshape(-1).astype(np.int64, casting="safe")
    except TypeError:
      raise RunError(f"{what} ids must be integers, got {ids!r}") from None
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
      raise RunError(f"unknown {what} id {int(bad[0])}: this run's {what} ids are 0..{n - 1}")
    return arr.astype(np.int32), scalar

  def recommend(self, user_ids, k: int = 10, exclude_seen: bool = True,
                items=None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, scores) of the top k items of each user, ranked by the dot product as evaluation ranks them.

    user_ids: an int (-> arrays [k]) or a sequence (-> [n, k]). exclude_seen masks the user's train items (as
    evaluation does); a user with fewer than k unmasked items gets item id -1 and score -inf in the last places.
    items: None (every item), or the item ids to rank among (e.g. the ids `add_items` returned, as the cold splits
    rank only their own items).
    """
    users, scalar = self._ids(user_ids, self.n_users, "user")
    data, item_emb, ids = self.data, self.item_emb, None
    if items is not None:
      ids = np.unique(self._ids(items, self.n_items, "item")[0])
      position = np.full(self.n_items, -1, np.int64)
      position[ids] = np.arange(len(ids))
      train = self.data.train[position[self.data.train[:, 1]] >= 0]
      train = np.stack([train[:, 0], position[train[:, 1]]], axis=1).astype(np.int32)
      data = dataclasses.replace(self.data, n_items=len(ids), train=train, features={})
      item_emb = self.item_emb[ids]
    k = self._k(k, data.n_items)
    split = ranking.make_user_split(data, users, exclude_seen)
    top = ranking.topk_items(self.user_emb, item_emb, split, k=k, batch_users=self.config.eval.batch_users)
    scores = _scores(self.user_emb, item_emb, users, top)
    if exclude_seen:
      masked = ranking.hits_matrix(top, dataclasses.replace(split, truth_indptr=split.mask_indptr,
                                                            truth_items=split.mask_items))
      top, scores = np.where(masked, -1, top), np.where(masked, -np.inf, scores).astype(np.float32)
    if ids is not None:
      top = np.where(top >= 0, ids[np.maximum(top, 0)], -1).astype(np.int32)
    return (top[0], scores[0]) if scalar else (top, scores)

  def similar_items(self, item_ids, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, cosine similarities) of the k items whose vectors are closest to each item's (itself left out).

    item_ids: an int (-> arrays [k]) or a sequence (-> [n, k]).
    """
    items, scalar = self._ids(item_ids, self.n_items, "item")
    k = self._k(k, self.n_items - 1)
    n = len(items)
    split = ranking.EvalSplit("similar", items, np.arange(n + 1, dtype=np.int64), items.copy(),
                              np.zeros(n + 1, np.int64), np.zeros(0, np.int32), self.n_items)
    top = ranking.topk_items(self._unit_items, self._unit_items, split, k=k,
                             batch_users=self.config.eval.batch_users)
    scores = _scores(self._unit_items, self._unit_items, items, top)
    return (top[0], scores[0]) if scalar else (top, scores)

  def item_text(self, item_id: int) -> Optional[str]:
    """The item table's text of `item_id` (lfm2k: the artist's name); None when the data has no item table."""
    item = int(self._ids(item_id, self.n_items, "item")[0][0])
    if self._items is None:
      return None
    return self._items.get(item)

  def train_items(self, user_id: int) -> np.ndarray:
    """The user's train items (what exclude_seen masks)."""
    user = int(self._ids(user_id, self.n_users, "user")[0][0])
    indptr, indices = self.data.train_csr()
    return indices[indptr[user]:indptr[user + 1]]

  def _k(self, k, limit: Optional[int] = None) -> int:
    limit = self.n_items if limit is None else limit
    if int(k) != k or k < 1:
      raise RunError(f"k={k} must be a positive integer")
    return min(int(k), limit)


def _feature_rows(table, width: int, slot: str) -> np.ndarray:
  """`table` as [n, width] float32 rows, or RunError naming the first bad row."""
  try:
    table = np.asarray(table, np.float32)
  except (TypeError, ValueError) as e:
    raise RunError(f"add_items: the {slot} features are not a numeric array ({e})") from None
  if table.ndim == 1 and table.shape[0] == width:
    table = table[None]
  if table.ndim != 2 or table.shape[1] != width or not len(table):
    raise RunError(f"add_items: the {slot} features have shape {table.shape}; this run's rows are {width} wide "
                   f"([n, {width}], n >= 1)")
  bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
  if bad.size:
    raise RunError(f"add_items: row {int(bad[0])} of the {slot} features holds NaN or Inf ({bad.size} such rows)")
  return table


def _exported(workdir: str, results: dict) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
  """(user_emb, item_emb, config) of export/ when it was written from results.json's best epoch, else None."""
  directory = os.path.join(workdir, EXPORT_DIR)
  try:
    with open(os.path.join(directory, "manifest.json"), "r", encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("best_epoch") != results["best_epoch"]:
      return None
    user_emb = np.load(os.path.join(directory, "user_emb.npy"), allow_pickle=False)
    item_emb = np.load(os.path.join(directory, "item_emb.npy"), allow_pickle=False)
  except (OSError, ValueError):
    return None
  if [list(user_emb.shape), list(item_emb.shape)] != [manifest["shapes"]["user_emb"], manifest["shapes"]["item_emb"]]:
    return None
  return user_emb, item_emb, manifest["config"]


def load_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """A finished stage-2 run of `workdir` for recommending from Python.

  The vectors come from `<workdir>/export/` when it holds the best epoch's, else from the best checkpoint, restored
  and computed as the export stage does (RunError when that is not results.json's best epoch). `config` defaults to
  the one the run was trained with (`trained_config`; its export section from export/'s manifest).
  """
  workdir = os.path.expanduser(workdir)
  results = finished_results(workdir)
  exported = _exported(workdir, results)
  if config is None:
    config = trained_config(workdir)
    if exported is not None and "export" in exported[2]:
      with config.unlocked():
        config.export = ml_collections.ConfigDict(_to_tuples(exported[2]["export"]))
  data = bridge.load_dataset(config.data)
  if exported is not None:
    user_emb, item_emb, _ = exported
  else:
    user_emb, item_emb, meta = best_vectors(config, workdir, data)
    _check_best_epoch(meta, results, workdir)
  slots = get_model(config.model.name)(config).content_slots(data)
  data = dataclasses.replace(data, features={s: np.asarray(data.features[s], np.float32) for s in slots})
  if user_emb.shape[0] != data.n_users or item_emb.shape[0] != data.n_items:
    raise RunError(f"the vectors of {workdir} ({user_emb.shape[0]} users, {item_emb.shape[0]} items) do not match "
                   f"its data ({data.n_users} users, {data.n_items} items)")
  table_path = _item_table_path(config)
  text_column = config.export.item_text
  items = read_item_table(table_path, text_column, data.n_items) if table_path else None
  return Run(workdir, config, results, data, user_emb, item_emb, items, slots)


def recall_from_topk(path: str, split: ranking.EvalSplit, k: int = 20) -> float:
  """Recall@k of a topk.tsv against a split's held-out items, computed from the file alone (a consistency check
  of an export against results.json)."""
  ranked = {}
  with open(path, "r", encoding="utf-8") as f:
    f.readline()
    for line in f:
      user, rank, item, _ = line.rstrip("\n").split("\t")
      if int(rank) <= k:
        ranked.setdefault(int(user), set()).add(int(item))
  recalls = []
  for row, user in enumerate(split.users):
    truth = set(split.truth_items[split.truth_indptr[row]:split.truth_indptr[row + 1]].tolist())
    recalls.append(len(truth & ranked.get(int(user), set())) / len(truth))
  return float(np.mean(recalls))
