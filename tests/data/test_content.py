"""items.tsv validation, the tokenizer, and the tensorflow-datasets builder round trip."""

import os
import tempfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from alignrec_jax.data import content
from alignrec_jax.data.mmrec import DataError

TEXTS = ["Toy Story (1995). Genres: Animation, Comedy", "GoldenEye (1995). Genres: Action",
         "Four Rooms (1995). Genres: Thriller", "Get Shorty (1995). Genres: Action, Comedy",
         "Copycat (1995). Genres: Crime, Drama, Thriller"]


def _write_table(tmp_path, rows=None, header="itemID\tmovie\ttext\timage", n=5):
  os.makedirs(tmp_path / "images", exist_ok=True)
  rng = np.random.default_rng(0)
  if rows is None:
    rows = []
    for i in range(n):
      # different sizes and modes: the builder must resize and convert every one
      pixels = rng.integers(0, 256, size=(20 + 3 * i, 12 + 2 * i, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
      rows.append(f"{i}\tm{i}\t{TEXTS[i % len(TEXTS)]}\timages/{i}.png")
  path = tmp_path / "items.tsv"
  path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
  return str(path)


def test_read_items_orders_by_id_and_resolves_paths(tmp_path):
  path = _write_table(tmp_path)
  lines = open(path).read().splitlines()
  path = tmp_path / "items.tsv"
  path.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")  # rows in reverse order
  table = content.read_items(str(path))
  assert table.n_items == 5
  assert table.texts[0].startswith("Toy Story")
  assert table.image_paths[3] == os.path.join(str(tmp_path), "images", "3.png")
  assert table.line_numbers[0] == 6


@pytest.mark.parametrize("header,rows,message", [
    ("itemID\ttitle\timage", ["0\tx\timages/0.png"], r"line 1: missing column\(s\) \['text'\]"),
    ("itemID\ttext\timage", ["0\tx\timages/0.png", "a\ty\timages/0.png"], r"line 3: itemID must be an integer"),
    ("itemID\ttext\timage", ["-1\tx\timages/0.png"], r"line 2: itemID must be a non-negative"),
    ("itemID\ttext\timage", ["0\tx\timages/0.png", "2\ty\timages/0.png"], r"dense 0..1 .*missing \[1\]"),
    ("itemID\ttext\timage", ["0\tx\timages/0.png", "0\ty\timages/0.png"], r"line 3: itemID 0 already given"),
    ("itemID\ttext\timage", ["0\tx\timages/nope.png"], r"line 2: image file of itemID 0 not found"),
    ("itemID\ttext\timage", ["0\tx"], r"line 2: expected 3 tab-separated fields"),
])
def test_read_items_errors_name_file_and_line(tmp_path, header, rows, message):
  os.makedirs(tmp_path / "images")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "0.png")
  path = _write_table(tmp_path, rows=rows, header=header)
  with pytest.raises(DataError, match=message) as err:
    content.read_items(path)
  assert "items.tsv" in str(err.value)


def test_missing_table_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="item content table not found"):
    content.read_items(str(tmp_path / "items.tsv"))


def test_undecodable_image_names_the_line(tmp_path):
  path = _write_table(tmp_path)
  (tmp_path / "images" / "2.png").write_bytes(b"not a png at all")
  table = content.read_items(path)
  with pytest.raises(DataError, match=r"items.tsv, line 4: cannot decode image .*2.png"):
    content.load_image(table.image_paths[2], 8, f"{table.path}, line {table.line_numbers[2]}")
  tok = content.Tokenizer.train(table.texts, 100)
  with pytest.raises(DataError, match=r"line 4: cannot decode image"):
    content.item_content_source(table, tok, 8, 8, str(tmp_path / "tfds"))


def _train_xlmr_style_spm(texts, path, vocab_size=60):
  """A tiny sentencepiece model as XLM-R's/BEiT-3's are laid out (<unk> 0, <s> 1, </s> 2), written to `path`."""
  import sentencepiece as spm
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=f, model_type="bpe",
                                   vocab_size=vocab_size, hard_vocab_limit=False, num_threads=1, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(path))


def test_fairseq_ids_of_a_hand_built_model():
  tok = content.Tokenizer.from_pieces(["\u2581a", "\u2581b", "\u2581c"])
  # sentencepiece ids: <unk> 0, <s> 1, </s> 2, a 3, b 4, c 5 -> fairseq: pieces + 1, <mask> after the last piece
  assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 7)
  assert len(tok) == 8 and set(tok.special_ids) == {0, 1, 2, 3, 7}
  ids = tok.encode("a c b x", max_len=8)
  assert ids.dtype == np.int32 and ids.shape == (8,)
  np.testing.assert_array_equal(ids, [0, 4, 6, 5, 3, 2, 1, 1])  # x is no piece: <unk>
  # truncation keeps </s>
  np.testing.assert_array_equal(tok.encode("a b c a", max_len=4), [0, 4, 5, 2])
  np.testing.assert_array_equal(tok.encode("", max_len=4), [0, 2, 1, 1])
  assert tok.decode(ids) == "<s> a c b <unk> </s>"
  with pytest.raises(ValueError, match="max_text_len=2 must be >= 3"):
    tok.encode("a", 2)


def test_trained_tokenizer_ids_follow_the_fairseq_convention():
  import sentencepiece as spm
  tok = content.Tokenizer.train(TEXTS, vocab_size=120)
  sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert len(tok) <= 120 and tok.mask_id == sp.get_piece_size() + 1 == len(tok) - 1
  for text in TEXTS:
    pieces = sp.encode(text)
    assert pieces and min(pieces) >= 3  # every character of the training texts has a piece: no <unk>
    ids = tok.encode(text, 40)
    n = len(pieces)
    assert ids[0] == tok.cls_id and ids[n + 1] == tok.sep_id and (ids[n + 2:] == tok.pad_id).all()
    np.testing.assert_array_equal(ids[1:n + 1], np.asarray(pieces) + 1)
    assert not np.isin(ids[1:n + 1], tok.special_ids).any()
    assert tok.decode(ids) == f"<s> {text} </s>"
    short = tok.encode(text, 5)
    np.testing.assert_array_equal(short, [tok.cls_id, *(np.asarray(pieces[:3]) + 1), tok.sep_id])
  assert tok.unk_id in tok.encode("Toy \u2603", 8)  # a character never seen in training


def test_default_tokenizer_is_deterministic_and_round_trips(tmp_path):
  first = content.Tokenizer.train(TEXTS, vocab_size=80)
  second = content.Tokenizer.train(list(TEXTS), vocab_size=80)
  assert first.model_proto == second.model_proto and first.fingerprint() == second.fingerprint()
  for text in TEXTS:
    np.testing.assert_array_equal(first.encode(text, 32), second.encode(text, 32))
  assert content.Tokenizer.train(TEXTS[:3], vocab_size=80).fingerprint() != first.fingerprint()
  first.save(str(tmp_path / "tok.spm"))
  loaded = content.Tokenizer.load(str(tmp_path / "tok.spm"))
  assert loaded.fingerprint() == first.fingerprint() and len(loaded) == len(first)
  for text in TEXTS:
    np.testing.assert_array_equal(loaded.encode(text, 32), first.encode(text, 32))
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp file left behind
  (tmp_path / "bad.spm").write_text("{\"vocab\": [\"x\"]}")
  with pytest.raises(DataError, match="bad.spm: not a sentencepiece model"):
    content.Tokenizer.load(str(tmp_path / "bad.spm"))
  with pytest.raises(DataError, match="config.pretrain.vocab_size=12: cannot train the tokenizer"):
    content.Tokenizer.train(TEXTS, vocab_size=12)  # fewer ids than the texts have characters


def test_configured_spm_is_used_with_the_fairseq_offset_and_kept_in_the_workdir(tmp_path):
  path = _write_table(tmp_path)
  sp = _train_xlmr_style_spm(TEXTS, tmp_path / "tiny.spm")
  config = ml_collections.ConfigDict({"vocab_size": 50, "image_size": 8, "max_text_len": 6})
  workdir = str(tmp_path / "run")
  tok, source = content.prepare_content(config, path, workdir, str(tmp_path / "tiny.spm"))
  assert len(tok) == sp.get_piece_size() + 2  # not the config's vocab_size: that sizes the trained default only
  genres = sp.piece_to_id("\u2581Genres")
  assert genres > 3 and sp.id_to_piece(genres) == "\u2581Genres"  # a whole piece of the model
  np.testing.assert_array_equal(tok.encode("Genres", 4), [0, genres + 1, 2, 1])
  tokens = content.load_all(source)["tokens"]
  np.testing.assert_array_equal(tokens[1], tok.encode(TEXTS[1], 6))
  saved = os.path.join(workdir, content.TOKENIZER_FILE)
  assert open(saved, "rb").read() == (tmp_path / "tiny.spm").read_bytes()
  # later runs on the workdir (resume, extraction) read the same model, with or without the key
  assert content.run_tokenizer(TEXTS, workdir, "", 50).fingerprint() == tok.fingerprint()
  assert content.run_tokenizer(TEXTS, workdir, str(tmp_path / "tiny.spm"), 50).fingerprint() == tok.fingerprint()
  _train_xlmr_style_spm(TEXTS[:2], tmp_path / "other.spm", vocab_size=40)
  with pytest.raises(DataError, match="other.spm is not the tokenizer this workdir was prepared with"):
    content.run_tokenizer(TEXTS, workdir, str(tmp_path / "other.spm"), 50)


def test_default_tokenizer_is_trained_once_per_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  tok = content.run_tokenizer(TEXTS, workdir, "", 80)
  assert tok.fingerprint() == content.Tokenizer.train(TEXTS, 80).fingerprint()
  # other texts or size later: the workdir's model stays (extraction must see the ids training saw)
  assert content.run_tokenizer(TEXTS[:2], workdir, "", 60).fingerprint() == tok.fingerprint()


def test_missing_or_unreadable_spm_names_the_key_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match=r"^config.data.tokenizer=.*nope.spm: sentencepiece tokenizer file not found$"):
    content.run_tokenizer(TEXTS, str(workdir), str(tmp_path / "nope.spm"), 80)
  (tmp_path / "broken.spm").write_bytes(b"\x00\x01 not a model")
  with pytest.raises(DataError, match=r"^config.data.tokenizer=.*broken.spm: not a sentencepiece model"):
    content.run_tokenizer(TEXTS, str(workdir), str(tmp_path / "broken.spm"), 80)
  with pytest.raises(DataError, match=r"^config.data.tokenizer=.*: cannot read"):
    content.run_tokenizer(TEXTS, str(workdir), str(tmp_path), 80)  # a directory
  assert not workdir.exists() or not os.listdir(workdir)


def test_workdir_of_the_word_level_tokenizer_is_refused(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{\"type\": \"word\", \"vocab\": []}")
  with pytest.raises(DataError, match="word-level tokenizer of an earlier version"):
    content.run_tokenizer(TEXTS, str(tmp_path), "", 80)


def test_builder_round_trip(tmp_path, monkeypatch):
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  path = _write_table(tmp_path)
  table = content.read_items(path)
  tok = content.Tokenizer.train(table.texts, vocab_size=100)
  source = content.item_content_source(table, tok, image_size=16, max_text_len=12, data_dir=str(tmp_path / "tfds"))
  assert len(source) == 5
  arrays = content.load_all(source, batch=2)
  np.testing.assert_array_equal(arrays["item_id"], np.arange(5))
  assert arrays["image"].shape == (5, 16, 16, 3) and arrays["image"].dtype == np.uint8
  assert arrays["tokens"].shape == (5, 12) and arrays["tokens"].dtype == np.int32
  for i in range(5):
    np.testing.assert_array_equal(arrays["image"][i], content.load_image(table.image_paths[i], 16))
    np.testing.assert_array_equal(arrays["tokens"][i], tok.encode(table.texts[i], 12))
  record = source[3]
  assert int(record["item_id"]) == 3
  # a second open reuses the prepared files (same fingerprint dir), a different size gets its own
  again = content.item_content_source(table, tok, image_size=16, max_text_len=12, data_dir=str(tmp_path / "tfds"))
  assert len(again) == 5
  assert len(os.listdir(tmp_path / "tfds")) == 1
  content.item_content_source(table, tok, image_size=8, max_text_len=12, data_dir=str(tmp_path / "tfds"))
  assert len(os.listdir(tmp_path / "tfds")) == 2
  assert not os.listdir(system_tmp), "building left files in the system temp dir"
