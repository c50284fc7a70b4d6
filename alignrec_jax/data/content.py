"""Raw item content for stage 1: `items.tsv` + images + text -> a tensorflow-datasets builder (array_record).

The table `items.tsv` is tab-separated with a header naming at least `itemID`, `text` and `image` (a path relative
to the table); other columns are ignored. Item ids must be dense `0..n_items-1` (row i of every feature table is
itemID i), each once. Every problem raises `DataError` naming the file and line.

Text is tokenised by one `Tokenizer`: a sentencepiece model read through fairseq's ids, as BEiT-3 reads its
`beit3.spm` (XLM-R's convention, transformers' XLMRobertaTokenizer): `<s>` = 0, `<pad>` = 1, `</s>` = 2, `<unk>` = 3,
a piece of sentencepiece id k >= 3 gets id k + 1, `<mask>` is the last id. A text is `<s> pieces... </s>` then pads.
`config.data.tokenizer` names a `.spm` file (BEiT-3's, to start from its weights); without one, a unigram model of at
most `config.pretrain.vocab_size` ids is trained on the item texts, deterministically. Either way the model is
saved in the workdir as `tokenizer.spm`, so that resumed runs and extraction use exactly the same ids.

`ItemContent` is a `tfds.core.GeneratorBasedBuilder` writing one split `items` in array_record format; it is read
with `builder.as_data_source()` (random access, no TensorFlow). Examples, in item-id order:
  {"item_id": int32, "image": uint8 [image_size, image_size, 3], "tokens": int32 [max_text_len]}
"""

import collections
import dataclasses
import hashlib
import io
import os
import sys
from typing import Iterable, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np
from PIL import Image
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as pb

from alignrec_jax.data import atomic
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
FAIRSEQ_IDS = {BOS: 0, PAD: 1, EOS: 2, UNK: 3}  # fixed; <mask> follows the pieces
FAIRSEQ_OFFSET = 1  # id = sentencepiece id + 1 for every piece
TOKENIZER_FILE = "tokenizer.spm"  # the run's tokenizer, in the workdir
_TRAIN_SEED = 0
_REQUIRED_COLUMNS = ("itemID", "text", "image")
# BEiT-3's image normalisation: [0, 1] pixels mapped to [-1, 1]
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def normalize_images(images):
  """uint8 `[B, H, W, 3]` -> float32 normalised as BEiT-3 does (mean = std = 0.5): the MMEnc's image input."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)


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


class Tokenizer:
  """A sentencepiece model with fairseq's (XLM-R's, BEiT-3's) ids; see the module docstring.

  `<s>` = 0 (`cls_id`), `<pad>` = 1, `</s>` = 2 (`sep_id`), `<unk>` = 3, a piece of sentencepiece id k >= 3 is
  k + 1 (`FAIRSEQ_OFFSET`), `<mask>` = the last id (transformers' XLMRobertaTokenizer, which unilm's beit3 uses).
  The sentencepiece model must have `<unk>` at its id 0 (and, as XLM-R's and the trained default, its own
  `<s>`/`</s>` controls at 1/2, which encoding never produces). `len()` counts the ids: 64,002 for BEiT-3's
  beit3.spm, whose checkpoints' text embedding has 64,010 rows (the last 8 unused, per unilm's maintainers), so an
  encoder loaded from such a checkpoint takes its vocabulary size from the checkpoint.
  """

  def __init__(self, model_proto: bytes, where: str = "tokenizer"):
    sp = sentencepiece.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(bytes(model_proto))
    except (RuntimeError, OSError, TypeError) as e:
      raise DataError(f"{where}: not a sentencepiece model ({type(e).__name__}: {e})") from None
    if sp.unk_id() != 0:
      raise DataError(f"{where}: the sentencepiece model has <unk> at id {sp.unk_id()}, the fairseq id mapping "
                      "needs it at id 0 (as XLM-R's and BEiT-3's beit3.spm)")
    self._sp, self.model_proto = sp, bytes(model_proto)
    self.cls_id, self.pad_id, self.sep_id, self.unk_id = (FAIRSEQ_IDS[t] for t in (BOS, PAD, EOS, UNK))
    self.mask_id = sp.get_piece_size() + FAIRSEQ_OFFSET
    self.special_ids = (self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id)

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """A unigram sentencepiece model of the texts with at most `vocab_size` ids in all (pieces + `<pad>`, `<mask>`).

    Deterministic: one thread, every text used in order (no sampling), a fixed seed; the same texts give the same
    model byte for byte. Every character of the texts gets a piece (character coverage 1).
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
      raise DataError("the item texts are all empty: nothing to train the tokenizer on")
    n_pieces = vocab_size - FAIRSEQ_OFFSET - 1  # sentencepiece's own <unk>/<s>/</s> included, <pad>/<mask> not
    if n_pieces <= 3:
      raise DataError(f"config.pretrain.vocab_size={vocab_size} leaves no room for pieces beside the special "
                      "tokens")
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(_TRAIN_SEED)
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=n_pieces,
          hard_vocab_limit=False, character_coverage=1.0, num_threads=1, input_sentence_size=0,
          shuffle_input_sentence=False, max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
          minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces allowed than the texts have distinct characters
      raise DataError(f"config.pretrain.vocab_size={vocab_size}: cannot train the tokenizer on the item texts "
                      f"({e})") from None
    return cls(model.getvalue(), where="trained tokenizer")

  def __len__(self) -> int:
    return self.mask_id + 1

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """int32 `[max_len]`: `<s>` pieces... `</s>` then `<pad>`s; pieces beyond `max_len - 2` are dropped."""
    if max_len < 3:
      raise ConfigError(f"config.pretrain.max_text_len={max_len} must be >= 3 (<s>, one piece, </s>)")
    ids = [k + FAIRSEQ_OFFSET if k else self.unk_id for k in self._sp.encode(text)][:max_len - 2]
    out = np.full([max_len], self.pad_id, np.int32)
    out[:len(ids) + 2] = [self.cls_id] + ids + [self.sep_id]
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the pieces among `ids`; `<pad>` dropped, the other special tokens written by name."""
    names = {self.cls_id: BOS, self.sep_id: EOS, self.unk_id: UNK, self.mask_id: MASK}
    parts, run = [], []
    for i in (int(i) for i in ids):
      if i == self.pad_id:
        continue
      if i in names or not 0 <= i < len(self):
        parts.append(self._sp.decode(run))
        parts.append(names.get(i, UNK))
        run = []
      else:
        run.append(i - FAIRSEQ_OFFSET)
    parts.append(self._sp.decode(run))
    return " ".join(p.strip() for p in parts if p.strip())

  def fingerprint(self) -> str:
    return hashlib.sha256(self.model_proto).hexdigest()[:16]

  def save(self, path: str) -> None:
    """Writes the sentencepiece model (`.spm`, the format `load` and sentencepiece read) atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic.atomic_open(path, "wb") as f:
      f.write(self.model_proto)

  @classmethod
  def load(cls, path: str, key: str = "") -> "Tokenizer":
    """Reads a sentencepiece model file; errors name `key` (the config key that gave the path), if any."""
    where = f"{key}={path}" if key else path
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except FileNotFoundError:
      raise DataError(f"{where}: sentencepiece tokenizer file not found") from None
    except OSError as e:
      raise DataError(f"{where}: cannot read the sentencepiece tokenizer ({type(e).__name__}: {e})") from None
    return cls(proto, where=where)

  @classmethod
  def from_pieces(cls, pieces: Sequence[str]) -> "Tokenizer":
    """A unigram model over exactly `pieces` (equal scores; "▁" starts a word), no normalisation: a tokenizer of a
    chosen size without training one (benchmarks)."""
    proto = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece
    for piece, kind in ((UNK, kinds.UNKNOWN), (BOS, kinds.CONTROL), (EOS, kinds.CONTROL)):
      proto.pieces.add(piece=piece, score=0.0, type=kind)
    for piece in pieces:
      proto.pieces.add(piece=piece, score=-1.0, type=kinds.NORMAL)
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    return cls(proto.SerializeToString(), where="tokenizer from pieces")


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only stage 1 needs it)
  if not sys.stderr.isatty():  # its progress bars' cursor escapes ('[A') would land in log files, before error lines
    tfds.disable_progress_bar()
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


def run_tokenizer(texts: Sequence[str], workdir: str, configured: str, vocab_size: int) -> Tokenizer:
  """The run's tokenizer, kept as `<workdir>/tokenizer.spm`: the workdir's if it has one, else `configured` (the
  `config.data.tokenizer` path, copied there) or, without one, a model trained on `texts`."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path) and os.path.isfile(os.path.join(workdir, "tokenizer.json")):
    raise DataError(f"{workdir}: prepared with the word-level tokenizer of an earlier version (tokenizer.json); "
                    "use a fresh --workdir")
  saved = Tokenizer.load(path) if os.path.isfile(path) else None
  if configured:
    tokenizer = Tokenizer.load(os.path.expanduser(configured), key="config.data.tokenizer")
    if saved is not None and saved.fingerprint() != tokenizer.fingerprint():
      raise DataError(f"config.data.tokenizer={configured} is not the tokenizer this workdir was prepared with "
                      f"({path}); use a fresh --workdir")
  elif saved is not None:
    return saved
  else:
    tokenizer = Tokenizer.train(texts, vocab_size)
  if saved is None:
    tokenizer.save(path)
  return tokenizer


def prepare_content(pretrain_config, items_path: str, workdir: str, tokenizer_path: str = "") -> tuple:
  """(tokenizer, data source) for a run; the tokenizer is `run_tokenizer`'s (`<workdir>/tokenizer.spm`)."""
  table = read_items(items_path)
  tokenizer = run_tokenizer(table.texts, workdir, tokenizer_path, pretrain_config.vocab_size)
  source = item_content_source(table, tokenizer, pretrain_config.image_size, pretrain_config.max_text_len,
                               os.path.join(workdir, "tfds"))
  return tokenizer, source
