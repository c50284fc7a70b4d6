"""The MMRec toolbox's data format: `<name>.inter` interactions plus item feature `.npy` files.

Format (docs/method.md §3.2): a tab-separated file with a header line; the user, item and split columns are named
by the config (`userID`, `itemID`, `x_label` by default; 0/1/2 = train/valid/test); other columns are ignored.
Item features are `.npy` matrices whose row i belongs to itemID i. As in MMRec, `n_users` and `n_items` are
`max(id) + 1` over the whole file, and valid/test rows of users who never appear in train are dropped (logged with
counts). A (user, item) pair may occur once in the file: repeated rows and pairs in two splits are errors, or are
dropped and counted with `data.drop_duplicates=True`. Ids far beyond the number of distinct ids are refused before
any table of that size is allocated; smaller gaps in the numbering are logged.

Every check raises `DataError` naming the file and the line or field, so a bad file never surfaces as a traceback
from deep inside numpy.
"""

import dataclasses
import functools
import os
from typing import Mapping

from absl import logging
import ml_collections
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import protocols
from alignrec_jax.errors import ConfigError

SPLITS = ("train", "valid", "test")
COLD_SPLITS = ("valid_cold", "test_cold")  # the cold-start protocol's splits (data/protocols.py)
HELD_OUT_SPLITS = ("valid", "test") + COLD_SPLITS  # every split a run evaluates (the cold ones with cold items only)

_WHERE_DATA_COMES_FROM = (
    "MMRec-format data (<name>.inter with userID/itemID/x_label columns, plus item features such as "
    "image_feat.npy / text_feat.npy) comes from the MMRec toolbox's data release (github.com/enoche/MMRec, "
    "data/README.md); AlignRec's own fused features from the AlignRec repository's data/README.md. Put the files in "
    "one folder and pass it with --config.data.root=DIR.")


class DataError(ValueError):
  """Bad input data; the message names the file and the line or field at fault."""


@dataclasses.dataclass(frozen=True)
class RecData:
  """A loaded recommendation dataset. Interaction arrays are `[n_rows, 2]` int32 (user, item), in file order.

  With cold-start items (data/protocols.py), `cold_items` maps "valid_cold"/"test_cold" to the sorted item ids held
  out of training for that split, `valid_cold`/`test_cold` hold their interactions, and train/valid/test hold only
  warm items.
  """
  name: str
  n_users: int
  n_items: int
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # slot -> [n_items, d] float32
  valid_cold: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.int32))
  test_cold: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.int32))
  cold_items: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  inductive: bool = False  # data.cold_inductive: the cold items take no part in training, not even in the kNN graphs

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS + COLD_SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS + COLD_SPLITS}")
    if name in COLD_SPLITS and not self.cold_items:
      raise ValueError(f"split {name!r} exists only with cold-start items: set --config.data.cold_items, e.g. 0.2")
    return getattr(self, name)

  def held_out_splits(self) -> tuple[str, ...]:
    """The evaluation splits this dataset has: valid, test, and the cold ones with cold-start items."""
    return HELD_OUT_SPLITS if self.cold_items else HELD_OUT_SPLITS[:2]

  def candidates(self, split: str):
    """The item ids that `split` is ranked over: None (every item) without cold-start items; else the warm items for
    valid/test and the split's own cold items for valid_cold/test_cold."""
    if not self.cold_items:
      return None
    if split in COLD_SPLITS:
      return self.cold_items[split]
    cold = np.zeros(self.n_items, bool)
    for items in self.cold_items.values():
      cold[items] = True
    return np.flatnonzero(~cold).astype(np.int32)

  def graph_members(self):
    """The item ids the feature kNN graphs are built over: None (every item), or in the inductive cold-start
    protocol the warm items only, so that a held-out item is attached after training as a new item is."""
    return self.candidates("valid") if self.inductive else None

  @functools.cached_property
  def _train_csr(self):
    return interactions_to_csr(self.train, self.n_users)

  def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [n_users + 1], indices [n_train]) of each user's train items, items sorted within a user."""
    return self._train_csr

  def item_popularity(self) -> np.ndarray:
    """[n_items] int64: number of train interactions of each item."""
    return np.bincount(self.train[:, 1], minlength=self.n_items)

  def summary(self) -> str:
    feats = ", ".join(f"{k} {v.shape[1]}-d" for k, v in self.features.items()) or "no features"
    cold = ""
    if self.cold_items:
      cold = (f"; cold-start items held out of training: {len(self.cold_items['valid_cold'])}/"
              f"{len(self.cold_items['test_cold'])} with {len(self.valid_cold)}/{len(self.test_cold)} valid_cold/"
              "test_cold interactions")
    return (f"{self.name}: {self.n_users} users, {self.n_items} items, {len(self.train)}/{len(self.valid)}/"
            f"{len(self.test)} train/valid/test interactions, {feats}{cold}")


def interactions_to_csr(pairs: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(indptr [n_rows + 1], column indices) of `[n, 2]` (row, col) pairs; columns sorted within a row."""
  order = np.lexsort((pairs[:, 1], pairs[:, 0]))
  counts = np.bincount(pairs[:, 0], minlength=n_rows)
  indptr = np.zeros(n_rows + 1, np.int64)
  np.cumsum(counts, out=indptr[1:])
  return indptr, pairs[order, 1].astype(np.int32)


def _parse_int_column(values: list, path: str, field: str, line_numbers: np.ndarray) -> np.ndarray:
  """Converts a column of strings to int64, naming the first bad line on failure."""
  try:
    column = np.asarray(values, dtype=np.int64)
  except (ValueError, OverflowError):
    for idx, text in enumerate(values):
      try:
        int(text)
      except ValueError:
        raise DataError(f"{path}, line {line_numbers[idx]}: field {field!r} must be an integer, got {text!r}"
                        ) from None
    raise DataError(f"{path}: field {field!r} has a value out of range")  # pragma: no cover
  negative = np.flatnonzero(column < 0)
  if negative.size:
    idx = negative[0]
    raise DataError(f"{path}, line {line_numbers[idx]}: field {field!r} must be a non-negative id, got "
                    f"{column[idx]}")
  return column


def read_inter(path: str, user_field: str = "userID", item_field: str = "itemID",
               split_field: str = "x_label") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads an `.inter` file.

  Returns:
    users [n] int64, items [n] int64, splits [n] int64 in {0, 1, 2}, in file order.
  """
  return _read_inter(path, user_field, item_field, split_field)[:3]


def _read_inter(path: str, user_field: str, item_field: str,
                split_field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """read_inter's arrays and each row's line number in the file."""
  if not os.path.isfile(path):
    raise DataError(f"interaction file not found: {path}. {_WHERE_DATA_COMES_FROM}")
  with open(path, "r", encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if not lines or not lines[0].strip():
    raise DataError(f"{path}, line 1: empty file or missing header (expected tab-separated columns "
                    f"{user_field}, {item_field}, {split_field})")
  header = [h.strip() for h in lines[0].rstrip("\r").split("\t")]
  seen = set()
  for name in header:
    if name in seen:
      raise DataError(f"{path}, line 1: duplicate column {name!r} in header {header}")
    seen.add(name)
  missing = [f for f in (user_field, item_field, split_field) if f not in header]
  if missing:
    raise DataError(f"{path}, line 1: missing column(s) {missing} in header {header} (set "
                    f"--config.data.user_field/item_field/split_field if the file names them differently)")
  n_cols = len(header)
  cols = [header.index(user_field), header.index(item_field), header.index(split_field)]
  header_line = lines[0].rstrip("\r")

  rows, line_numbers = [], []
  for lineno, line in enumerate(lines[1:], start=2):
    line = line.rstrip("\r")
    if not line.strip():
      continue  # blank lines carry nothing; MMRec's pandas reader skips them too
    fields = line.split("\t")
    if len(fields) != n_cols:
      if line == header_line:
        raise DataError(f"{path}, line {lineno}: the header is repeated inside the data (concatenated files?)")
      raise DataError(f"{path}, line {lineno}: expected {n_cols} tab-separated fields ({header}), got "
                      f"{len(fields)}")
    if line == header_line:
      raise DataError(f"{path}, line {lineno}: the header is repeated inside the data (concatenated files?)")
    rows.append(fields)
    line_numbers.append(lineno)
  if not rows:
    raise DataError(f"{path}: no interactions after the header")
  line_numbers = np.asarray(line_numbers)
  parsed = [
      _parse_int_column([r[c] for r in rows], path, name, line_numbers)
      for c, name in zip(cols, (user_field, item_field, split_field))
  ]
  users, items, splits = parsed
  bad = np.flatnonzero((splits < 0) | (splits > 2))
  if bad.size:
    raise DataError(f"{path}, line {line_numbers[bad[0]]}: field {split_field!r} must be 0 (train), 1 (valid) or "
                    f"2 (test), got {splits[bad[0]]}")
  return users, items, splits, line_numbers


def load_features(path: str, n_items: int) -> np.ndarray:
  """Loads an item feature matrix and checks it: `[n_items, d]`, finite, numeric. Returns float32."""
  if not os.path.isfile(path):
    raise DataError(f"feature file not found: {path}. {_WHERE_DATA_COMES_FROM}")
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as e:  # numpy raises several types for a corrupt file
    raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
  if array.ndim != 2:
    raise DataError(f"{path}: expected a 2-D [n_items, dim] matrix, got shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise DataError(f"{path}: expected a numeric matrix, got dtype {array.dtype}")
  if array.shape[0] < n_items:
    raise DataError(f"{path}: has {array.shape[0]} rows but the interactions use itemID up to {n_items - 1} "
                    f"(row i must hold itemID i): ids beyond the feature rows")
  if array.shape[0] != n_items:
    raise DataError(f"{path}: has {array.shape[0]} rows but the dataset has {n_items} items (max itemID + 1); "
                    f"feature rows must match the item count")
  array = array.astype(np.float32)
  finite = np.isfinite(array)
  if not finite.all():
    row, col = np.argwhere(~finite)[0]
    n_bad = int((~finite.all(axis=1)).sum())
    raise DataError(f"{path}: row {row} (itemID {row}), column {col} is {array[row, col]}; {n_bad} row(s) hold "
                    f"NaN/Inf values")
  return array


def check_id_range(ids: np.ndarray, path: str, field: str, lines: np.ndarray) -> None:
  """Refuses ids far beyond the number of distinct ids (every id up to the largest gets a row of every table) and
  warns about gaps; runs before anything of size max(id) is allocated."""
  distinct = len(np.unique(ids))
  top = int(ids.max())
  limit = 10 * distinct + 1000
  if top + 1 > limit:
    at = int(np.argmax(ids))
    raise DataError(f"{path}, line {lines[at]}: {field} {top} is far beyond the {distinct} distinct {field} values "
                    f"(ids must be numbered 0..n-1; the largest allowed here is {limit - 1}): renumber the ids")
  if top + 1 > distinct:
    logging.warning("%s: %d of the %s values 0..%d never occur (gaps in the numbering): they become rows without "
                    "interactions", path, top + 1 - distinct, field, top)


def repeated_rows(users: np.ndarray, items: np.ndarray, splits: np.ndarray, lines: np.ndarray, path: str,
                  drop: bool) -> np.ndarray:
  """Boolean mask of the rows to keep: a (user, item) pair may occur once in the whole file.

  A repeated row within a split, or a pair in two splits (a test pair that is also a train pair is masked at
  evaluation and can never be hit), is an error; with `drop` (data.drop_duplicates) the first occurrence in the
  earliest split (train, valid, test) is kept and the counts are logged.
  """
  n = len(users)
  keys = users * (int(items.max()) + 1) + items  # ids are range-checked first, so this fits int64
  order = np.lexsort((np.arange(n), splits, keys))
  k, s = keys[order], splits[order]
  repeat = np.zeros(n, bool)
  repeat[1:] = k[1:] == k[:-1]
  keep = np.ones(n, bool)
  if not repeat.any():
    return keep
  first = np.maximum.accumulate(np.where(repeat, 0, np.arange(n)))  # each sorted row's group start
  within = repeat & (s == s[first])
  across = repeat & ~within
  names = ("train", "valid", "test")
  if not drop:
    if within.any():
      p = np.flatnonzero(within)[0]
      a, b = order[first[p]], order[p]
      raise DataError(f"{path}, line {lines[b]}: {names[s[p]]} row user {users[b]}, item {items[b]} repeats line "
                      f"{lines[a]} ({int(within.sum())} repeated rows, {int(across.sum())} pairs in two splits; "
                      "set --config.data.drop_duplicates=True to drop them)")
    p = np.flatnonzero(across)[0]
    a, b = order[first[p]], order[p]
    raise DataError(f"{path}, line {lines[b]}: user {users[b]}, item {items[b]} is in {names[s[p]]} and in "
                    f"{names[s[first[p]]]} (line {lines[a]}); {int(across.sum())} pairs are in two splits, which "
                    "evaluation masks and can never count (set --config.data.drop_duplicates=True to keep only the "
                    "earliest split's)")
  keep[order[repeat]] = False
  logging.warning("%s: dropped %d repeated rows and %d pairs already in an earlier split (data.drop_duplicates)",
                  path, int(within.sum()), int(across.sum()))
  return keep


def _resolve(root: str, name: str) -> str:
  return name if os.path.isabs(name) else os.path.join(root, name)


def interactions_only(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the data section that loads no feature table (neither feature file nor stage-1 table): the
  interactions and the protocols' split alone, for runs that bring their own features."""
  out = data_config.copy_and_resolve_references()
  with out.unlocked():
    for key in ("image_feat", "text_feat", "features_from"):
      out[key] = ""
  return out


def load_dataset(data_config: ml_collections.ConfigDict) -> RecData:
  """Loads the dataset that `config.data` describes (see configs/base.py): the interactions and the feature files
  under `root`. The stage-1 table of `data.features_from` and the generated default data are the trainer's to add
  (train/bridge.load_dataset)."""
  root = os.path.expanduser(data_config.root)
  if not data_config.name:
    raise ConfigError("config.data.name is empty: set it to the dataset name (the .inter file is <root>/<name>.inter)")
  inter_path = _resolve(root, data_config.inter_file or f"{data_config.name}.inter")
  users, items, splits, lines = _read_inter(inter_path, data_config.user_field, data_config.item_field,
                                            data_config.split_field)
  for ids, field in ((users, data_config.user_field), (items, data_config.item_field)):
    check_id_range(ids, inter_path, field, lines)
  n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
  keep = repeated_rows(users, items, splits, lines, inter_path, data_config.drop_duplicates)
  users, items, splits = users[keep], items[keep], splits[keep]
  pairs = np.stack([users, items], axis=1).astype(np.int32)
  by_split = {name: pairs[splits == label] for label, name in enumerate(SPLITS)}
  if not len(by_split["train"]):
    raise DataError(f"{inter_path}: the train split ({data_config.split_field} == 0) is empty")
  by_split, cold_items = _apply_protocols(by_split, data_config, inter_path)
  train = by_split["train"]
  train_users = np.zeros(n_users, bool)
  train_users[train[:, 0]] = True
  held_out = {}
  for name in HELD_OUT_SPLITS if cold_items else HELD_OUT_SPLITS[:2]:
    rows = by_split[name]
    if data_config.filter_cold_start:
      cold = ~train_users[rows[:, 0]]
      if cold.any():
        logging.warning("%s: dropped %d %s rows of %d users without train rows (data.filter_cold_start)", inter_path,
                        int(cold.sum()), name, len(np.unique(rows[cold, 0])))
      rows = rows[~cold]
    if not len(rows):
      label = SPLITS.index(name) if name in SPLITS else None
      raise DataError(f"{inter_path}: the {name} split"
                      + (f" ({data_config.split_field} == {label})" if label is not None else "") + " is empty"
                      + (" after dropping users without train interactions" if data_config.filter_cold_start else ""))
    held_out[name] = rows

  features = {}
  if data_config.image_feat and not data_config.features_from:
    features["image"] = load_features(_resolve(root, data_config.image_feat), n_items)
  if data_config.text_feat:
    features["text"] = load_features(_resolve(root, data_config.text_feat), n_items)
  return RecData(name=data_config.name, n_users=n_users, n_items=n_items, train=train, features=features,
                 cold_items=cold_items, inductive=bool(cold_items) and bool(data_config.cold_inductive),
                 **held_out)


def _apply_protocols(by_split: dict, data_config: ml_collections.ConfigDict,
                     inter_path: str) -> tuple[dict, dict]:
  """The cold-start and sparse-user protocols of `config.data` on the file's splits (data/protocols.py)."""
  cold_fraction = float(data_config.cold_items)
  train_fraction = float(data_config.train_fraction)
  seed = int(data_config.split_seed)
  cold_items = {}
  try:
    if cold_fraction:
      by_split, cold_items = protocols.hold_out_cold_items(by_split, cold_fraction, seed)
      n_train = len(by_split["train"])
      logging.info("%s: %d + %d cold-start items (data.cold_items=%g, data.split_seed=%d) hold %d + %d interactions; "
                   "%d train interactions remain", inter_path, len(cold_items["valid_cold"]),
                   len(cold_items["test_cold"]), cold_fraction, seed, len(by_split["valid_cold"]),
                   len(by_split["test_cold"]), n_train)
    if train_fraction != 1.0:
      before = len(by_split["train"])
      by_split["train"] = protocols.keep_train_fraction(by_split["train"], train_fraction, seed)
      logging.info("%s: kept %d of %d train interactions (data.train_fraction=%g, data.split_seed=%d)", inter_path,
                   len(by_split["train"]), before, train_fraction, seed)
  except ValueError as e:
    raise DataError(f"{inter_path}: {e}") from None
  if not len(by_split["train"]):
    raise DataError(f"{inter_path}: no train interactions are left after holding out the cold-start items "
                    "(lower config.data.cold_items)")
  return by_split, cold_items


def write_inter(path: str, pairs_by_split: Mapping[str, np.ndarray]) -> None:
  """Writes `(user, item)` pairs per split as an MMRec `.inter` file (atomically). Used for generated data."""
  with atomic.atomic_open(path) as f:
    f.write("userID\titemID\tx_label\n")
    for label, name in enumerate(SPLITS):
      for u, i in np.asarray(pairs_by_split[name]).reshape(-1, 2):
        f.write(f"{u}\t{i}\t{label}\n")
