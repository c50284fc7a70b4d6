"""items.tsv validation, the tokenizer, and the tensorflow-datasets builder round trip."""

import os
import tempfile

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
  tok = content.Tokenizer.build(table.texts, 50)
  with pytest.raises(DataError, match=r"line 4: cannot decode image"):
    content.item_content_source(table, tok, 8, 8, str(tmp_path / "tfds"))


def test_tokenizer_vocab_order_and_encoding():
  tok = content.Tokenizer.build(["b a a, c", "A b!"], vocab_size=100)
  # specials, then by count (a:3, b:2), ties alphabetical (!, ",", c all once)
  assert tok.vocab == content.SPECIAL_TOKENS + ("a", "b", "!", ",", "c")
  ids = tok.encode("A c zebra", max_len=7)
  assert ids.dtype == np.int32 and ids.shape == (7,)
  np.testing.assert_array_equal(ids, [tok.cls_id, 5, 9, tok.unk_id, tok.sep_id, 0, 0])
  assert tok.pad_id == 0
  # truncation keeps [CLS] and [SEP]
  np.testing.assert_array_equal(tok.encode("a b a b a", max_len=4), [tok.cls_id, 5, 6, tok.sep_id])
  capped = content.Tokenizer.build(["b a a, c", "A b!"], vocab_size=7)
  assert capped.vocab[5:] == ("a", "b")


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
  first = content.Tokenizer.build(TEXTS, vocab_size=30)
  second = content.Tokenizer.build(list(TEXTS), vocab_size=30)
  assert first.vocab == second.vocab and first.fingerprint() == second.fingerprint()
  first.save(str(tmp_path / "tok.json"))
  loaded = content.Tokenizer.load(str(tmp_path / "tok.json"))
  assert loaded.vocab == first.vocab
  for text in TEXTS:
    np.testing.assert_array_equal(loaded.encode(text, 16), first.encode(text, 16))
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp file left behind
  (tmp_path / "bad.json").write_text("{\"vocab\": [\"x\"]}")
  with pytest.raises(DataError, match="bad.json: not a tokenizer vocabulary"):
    content.Tokenizer.load(str(tmp_path / "bad.json"))


def test_builder_round_trip(tmp_path, monkeypatch):
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  path = _write_table(tmp_path)
  table = content.read_items(path)
  tok = content.Tokenizer.build(table.texts, vocab_size=40)
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
