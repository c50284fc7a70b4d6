"""Raw item content for stage 1: `items.tsv` + images + text -> a tensorflow-datasets builder (array_record).

The table `items.tsv` is tab-separated with a header naming at least `itemID`, `text` and `image` (a path relative
to the table); other columns are ignored. Item ids must be dense `0..n_items-1` (row i of every feature table is
itemID i), each once. Every problem raises `DataError` naming the file and line.

Text is tokenised offline and deterministically by `Tokenizer`: lower-cased, split into words and single
punctuation marks, vocabulary built from the corpus (most frequent first, ties alphabetical) behind the special
tokens. The vocabulary is saved as JSON with the run so that extraction and later runs reuse the same ids.

`ItemContent` is a `tfds.core.GeneratorBasedBuilder` writing one split `items` in array_record format; it is read
with `builder.as_data_source()` (random access, no TensorFlow). Examples, in item-id order:
  {"item_id": int32, "image": uint8 [image_size, image_size, 3], "tokens": int32 [max_text_len]}
"""

import collections
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from alignrec_jax.data.mmrec import DataError

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, MASK, UNK)  # ids 0..4, [PAD] = 0
_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_REQUIRED_COLUMNS = ("itemID", "text", "image")


@dataclasses.dataclass(frozen=True)
class ItemTable:
  """The validated content table. `texts[i]` and `image_paths[i]` (absolute) belong to itemID i."""
  path: str
  texts: tuple
  image_paths: tuple
  line_numbers: tuple  # file line of item i, for error messages raised later (image decoding)

  @property
  def n_items(self) -> int:
    return len(self.texts)


def read_items(path: str, check_images: bool = True) -> ItemTable:
  """Reads and validates `items.tsv` (see the module docstring)."""
  if not os.path.isfile(path):
    raise DataError(f"item content table not found: {path} (a tab-separated items.tsv with columns itemID, text, "
                    "image; set --config.data.root / --config.data.items_file)")
  with open(path, "r", encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if not lines or not lines[0].strip():
    raise DataError(f"{path}, line 1: empty file or missing header (expected columns {list(_REQUIRED_COLUMNS)})")
  header = [h.strip() for h in lines[0].rstrip("\r").split("\t")]
  missing = [c for c in _REQUIRED_COLUMNS if c not in header]
  if missing:
    raise DataError(f"{path}, line 1: missing column(s) {missing} in header {header}")
  if len(set(header)) != len(header):
    raise DataError(f"{path}, line 1: duplicate column names in header {header}")
  col = {name: header.index(name) for name in _REQUIRED_COLUMNS}
  base = os.path.dirname(os.path.abspath(path))
  by_id = {}
  for lineno, line in enumerate(lines[1:], start=2):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      raise DataError(f"{path}, line {lineno}: expected {len(header)} tab-separated fields ({header}), got "
                      f"{len(fields)}")
    raw_id = fields[col["itemID"]].strip()
    try:
      item = int(raw_id)
    except ValueError:
      raise DataError(f"{path}, line {lineno}: itemID must be an integer, got {raw_id!r}") from None
    if item < 0:
      raise DataError(f"{path}, line {lineno}: itemID must be a non-negative id, got {item}")
    if item in by_id:
      raise DataError(f"{path}, line {lineno}: itemID {item} already given on line {by_id[item][2]}")
    image = fields[col["image"]].strip()
    if not image:
      raise DataError(f"{path}, line {lineno}: empty image path for itemID {item}")
    image_path = image if os.path.isabs(image) else os.path.join(base, image)
    if check_images and not os.path.isfile(image_path):
      raise DataError(f"{path}, line {lineno}: image file of itemID {item} not found: {image_path}")
    by_id[item] = (fields[col["text"]], image_path, lineno)
  if not by_id:
    raise DataError(f"{path}: no items after the header")
  n = len(by_id)
  absent = sorted(set(range(n)) - set(by_id))
  if absent:
    beyond = max(by_id)
    raise DataError(f"{path}: itemIDs must be dense 0..{n - 1} (row i = itemID i); missing {absent[:10]}"
                    f"{'...' if len(absent) > 10 else ''}, highest id {beyond} (line {by_id[beyond][2]})")
  rows = [by_id[i] for i in range(n)]
  return ItemTable(path=path, texts=tuple(r[0] for r in rows), image_paths=tuple(r[1] for r in rows),
                   line_numbers=tuple(r[2] for r in rows))


def load_image(path: str, size: int, where: str = "") -> np.ndarray:
  """Decodes an image file with Pillow, as RGB resized to `[size, size, 3]` uint8 (bicubic)."""
  try:
    with Image.open(path) as img:
      img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
      return np.asarray(img, dtype=np.uint8)
  except FileNotFoundError:
    raise DataError(f"{where or path}: image file not found: {path}") from None
  except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, ...) for a bad file
    raise DataError(f"{where or path}: cannot decode image {path} ({type(e).__name__}: {e})") from None


def split_words(text: str) -> list:
  """Lower-cased words and single punctuation marks, the tokenizer's units."""
  return _WORD_RE.findall(text.lower())


class Tokenizer:
  """Deterministic word-level tokenizer with a vocabulary built from a corpus. `[PAD]` is id 0."""

  def __init__(self, vocab: Sequence[str]):
    vocab = list(vocab)
    if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:5]}")
    if len(set(vocab)) != len(vocab):
      raise ValueError("the vocabulary has duplicate entries")
    self.vocab = tuple(vocab)
    self._ids = {w: i for i, w in enumerate(vocab)}
    self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id = range(len(SPECIAL_TOKENS))

  @classmethod
  def build(cls, texts: Iterable[str], vocab_size: int, min_count: int = 1) -> "Tokenizer":
    """Vocabulary = special tokens + words by frequency (ties alphabetical), at most `vocab_size` entries."""
    if vocab_size <= len(SPECIAL_TOKENS):
      raise ValueError(f"config.pretrain.vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special "
                       "tokens")
    counts = collections.Counter(w for t in texts for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return cls(SPECIAL_TOKENS + tuple(words[:vocab_size - len(SPECIAL_TOKENS)]))

  def __len__(self) -> int:
    return len(self.vocab)

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """int32 `[max_len]`: [CLS] words... [SEP] then [PAD]s; words beyond `max_len - 2` are dropped."""
    if max_len < 3:
      raise ValueError(f"config.pretrain.max_text_len={max_len} must be >= 3 ([CLS], one word, [SEP])")
    ids = [self._ids.get(w, self.unk_id) for w in split_words(text)][:max_len - 2]
    out = np.full([max_len], self.pad_id, np.int32)
    out[:len(ids) + 2] = [self.cls_id] + ids + [self.sep_id]
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.vocab[i] for i in ids if i != self.pad_id)

  def fingerprint(self) -> str:
    return hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()[:16]

  def save(self, path: str) -> None:
    """Writes `{"vocab": [...]}` as JSON atomically (temp file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".json")
    mask = os.umask(0o022)  # mkstemp creates 0600: give the file the mode open() would
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump({"type": "word", "vocab": list(self.vocab)}, f, ensure_ascii=False)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    try:
      with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
      return cls(data["vocab"])
    except FileNotFoundError:
      raise DataError(f"tokenizer file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"{path}: not a tokenizer vocabulary ({type(e).__name__}: {e})") from None


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only stage 1 needs it)
  return tfds


def _builder_class():
  """The builder class, defined on first use so that importing this module does not import tfds."""
  tfds = _tfds()

  class LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self):
      # A local builder has nothing on tfds's GCS bucket, and tfds's version leaves an empty /tmp/tmp*tfds
      # directory behind on every unprepared instantiation.
      pass

  class ItemContent(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # built per call: no global registry
    """Items of one `items.tsv`: resized image and token ids, one split `items` in item-id order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "item_id, image (uint8, resized), tokens (int32)."}

    def __init__(self, *, table: ItemTable, tokenizer: Tokenizer, image_size: int, max_text_len: int, **kwargs):
      self._table, self._tokenizer = table, tokenizer
      self._image_size, self._max_text_len = image_size, max_text_len
      super().__init__(**kwargs)

    def _log_download_bytes(self):  # tfds prints "Downloading and preparing dataset": nothing is downloaded here
      logging.info("building the item-content dataset from local files in %s (once)", self.data_dir)

    def _log_download_done(self):
      logging.info("item-content dataset ready in %s", self.data_dir)

    def _info(self):
      s, length = self._image_size, self._max_text_len
      return LocalDatasetInfo(
          builder=self,
          description=f"item content of {self._table.path}",
          features=tfds.features.FeaturesDict({
              "item_id": tfds.features.Scalar(dtype=np.int32),
              "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
              "tokens": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          }),
          disable_shuffling=True,  # record i = itemID i
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"items": self._generate_examples()}

    def _generate_examples(self):
      table = self._table
      for i in range(table.n_items):
        where = f"{table.path}, line {table.line_numbers[i]}"
        yield i, {"item_id": i,
                  "image": load_image(table.image_paths[i], self._image_size, where),
                  "tokens": self._tokenizer.encode(table.texts[i], self._max_text_len)}

  return ItemContent


def content_fingerprint(table: ItemTable, tokenizer: Tokenizer, image_size: int, max_text_len: int) -> str:
  """Hash of everything an example depends on: a different table/tokenizer/size gets its own builder dir."""
  h = hashlib.sha256()
  for part in (os.path.abspath(table.path), tokenizer.fingerprint(), str(image_size), str(max_text_len)):
    h.update(part.encode("utf-8") + b"\0")
  for text, image in zip(table.texts, table.image_paths):
    stat = os.stat(image)
    h.update(f"{text}\t{image}\t{stat.st_size}\t{int(stat.st_mtime)}\n".encode("utf-8"))
  return h.hexdigest()[:16]


def item_content_source(table: ItemTable, tokenizer: Tokenizer, image_size: int, max_text_len: int,
                        data_dir: str):
  """Prepares (once) and opens the builder under `<data_dir>/<fingerprint>`; returns the `items` data source."""
  tfds = _tfds()
  cls = _builder_class()
  data_dir = os.path.join(data_dir, content_fingerprint(table, tokenizer, image_size, max_text_len))
  builder = cls(table=table, tokenizer=tokenizer, image_size=image_size, max_text_len=max_text_len,
                data_dir=data_dir, file_format="array_record")
  # tfds writes into a temporary directory and renames it when complete, so a killed run leaves nothing half-written
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  source = builder.as_data_source()["items"]
  if len(source) != table.n_items:
    raise DataError(f"{data_dir}: the prepared item dataset has {len(source)} records, the table {table.n_items}; "
                    "delete that folder to rebuild it")
  return source


def load_all(source, batch: int = 512) -> dict:
  """Every record of a data source as arrays `{"item_id" [n], "image" [n, s, s, 3], "tokens" [n, L]}`."""
  n = len(source)
  parts = collections.defaultdict(list)
  for start in range(0, n, batch):
    records = source.__getitems__(list(range(start, min(start + batch, n))))
    for key in ("item_id", "image", "tokens"):
      parts[key].append(np.stack([np.asarray(r[key]) for r in records]))
  out = {k: np.concatenate(v) for k, v in parts.items()}
  if not np.array_equal(out["item_id"], np.arange(n)):
    raise DataError("item dataset records are not in item-id order (builder written without disable_shuffling?)")
  return out


def prepare_content(pretrain_config, items_path: str, workdir: str) -> tuple:
  """(tokenizer, data source) for a run: the tokenizer is built once and saved as `<workdir>/tokenizer.json`."""
  table = read_items(items_path)
  tok_path = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(tok_path):
    tokenizer = Tokenizer.load(tok_path)
  else:
    tokenizer = Tokenizer.build(table.texts, pretrain_config.vocab_size, pretrain_config.min_token_count)
    tokenizer.save(tok_path)
  source = item_content_source(table, tokenizer, pretrain_config.image_size, pretrain_config.max_text_len,
                               os.path.join(workdir, "tfds"))
  return tokenizer, source
