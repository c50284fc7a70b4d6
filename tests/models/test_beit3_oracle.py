"""The oracle: torchscale's BEiT3 outputs (committed fixture, tests/fixtures/make_beit3_fixture.py) reproduced by
MMEnc after the project's conversion, to 1e-5 at every non-pad position; the converter's key and shape handling.

Runs without torch (the fixture's state dict ships as .npz); the .pth reader and the bicubic resize are compared
with torch itself only where torch is importable.
"""

import os

import jax
import numpy as np
import pytest

from alignrec_jax import convert_beit3
from alignrec_jax.models import beit3_convert
from alignrec_jax.models import mmenc
from alignrec_jax.train import init_from

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
STATE = os.path.join(FIXTURES, "beit3_tiny.npz")
IO = os.path.join(FIXTURES, "beit3_tiny_io.npz")
CASES = ("joint", "masked", "image", "text")


def _state():
  return convert_beit3.read_state_dict(STATE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The fixture converted (text table truncated to 16 positions), written and read back as init_from does."""
  params, meta = convert_beit3.convert_state_dict(_state(), max_text_len=16)
  out = str(tmp_path_factory.mktemp("beit3") / "tiny")
  init_from.save(out, params, meta)
  model = mmenc.MMEnc(vocab_size=100, pad_id=1, image_size=32, patch_size=8, max_text_len=16,
                      **mmenc.SIZES["tiny"])
  fresh = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 16), np.int32))["params"]
  loaded, meta = init_from.load(out, model)
  return model, init_from.apply(fresh, loaded), meta


@pytest.mark.parametrize("case", CASES)
def test_converted_mmenc_matches_torchscale_beit3(converted, case):
  model, params, meta = converted
  assert (meta["layers"], meta["hidden"], meta["heads"], meta["vocab_size"]) == (2, 64, 4, 100)
  io = np.load(IO)
  images = io[f"{case}/visual_tokens"] if f"{case}/visual_tokens" in io else None
  tokens = io[f"{case}/textual_tokens"].astype(np.int32) if f"{case}/textual_tokens" in io else None
  masked = io[f"{case}/vision_masked_position"] if f"{case}/vision_masked_position" in io else None
  want = io[f"{case}/out"]
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.apply({"params": params}, images, tokens, masked, method=model.encode))
  assert got.shape == want.shape
  keep = np.ones(want.shape[:2], bool)
  if tokens is not None:  # padded text positions carry no defined output
    pad = io[f"{case}/text_padding_position"]
    np.testing.assert_array_equal(pad, tokens == 1)  # the fixture's padding is exactly the <pad> id
    keep[:, want.shape[1] - pad.shape[1]:] = ~pad
  assert np.abs(want[keep]).max() > 1.0  # the fixture is not trivially small
  assert np.abs(got - want)[keep].max() <= 1e-5


def test_unknown_keys_are_errors_and_known_heads_are_dropped():
  state = _state()
  _, meta = convert_beit3.convert_state_dict(dict(state, **{"mim_head.weight": np.zeros(3)}), max_text_len=8)
  assert meta["dropped_keys"] == ["mim_head.weight"]
  with pytest.raises(beit3_convert.ConversionError, match="unexpected key 'decoder.weight'"):
    convert_beit3.convert_state_dict(dict(state, **{"decoder.weight": np.zeros(3)}))
  with pytest.raises(beit3_convert.ConversionError, match=r"unexpected key beit3\.encoder\.layers\.0\.ffn\.C"):
    convert_beit3.convert_state_dict(dict(state, **{"beit3.encoder.layers.0.ffn.C.fc1.weight": np.zeros(3)}))
  partial = {k: v for k, v in state.items() if k != "beit3.encoder.layers.1.self_attn.inner_attn_ln.B.bias"}
  with pytest.raises(beit3_convert.ConversionError, match="missing key for encoder/layers_1/self_attn/inner_attn_ln/B"):
    convert_beit3.convert_state_dict(partial)
  bad = dict(state, **{"beit3.encoder.layers.0.ffn.A.fc2.bias": np.zeros(7, np.float32)})
  with pytest.raises(beit3_convert.ConversionError, match=r"beit3\.encoder\.layers\.0\.ffn\.A\.fc2\.bias: shape"):
    convert_beit3.convert_state_dict(bad)
  with pytest.raises(ValueError, match="exceeds the checkpoint's 1022 text positions"):
    convert_beit3.convert_state_dict(state, max_text_len=2000)
  with pytest.raises(ValueError, match="--heads=5 does not divide"):
    convert_beit3.convert_state_dict(state, heads=5)


def test_new_image_size_interpolates_only_the_patch_rows():
  state = _state()
  params, meta = convert_beit3.convert_state_dict(state, image_size=48, max_text_len=8)
  table = params["encoder"]["embed_positions"]["A"]["embedding"]
  source = state["beit3.encoder.embed_positions.A.weight"]
  assert table.shape == (3 + 36, 64) and meta["interpolated"] == (4, 6)
  np.testing.assert_array_equal(table[:3], source[:3])  # 2 unused rows + [CLS] are kept
  assert params["encoder"]["embed_positions"]["B"]["embedding"].shape == (10, 64)
  np.testing.assert_array_equal(params["encoder"]["embed_positions"]["B"]["embedding"],
                                state["beit3.encoder.embed_positions.B.weight"][:10])


def test_bicubic_resize_keeps_constants_and_is_torch_cubic_convolution():
  rng = np.random.default_rng(0)
  np.testing.assert_allclose(beit3_convert.resize_grid(np.ones((16, 3)), 7), np.ones((49, 3)), atol=1e-12)
  x = rng.normal(size=(25, 2))
  np.testing.assert_array_equal(beit3_convert.resize_grid(x, 5), x)
  # 2 -> 4 by hand: output 0 samples source position -0.25 (t = 0.75 from index -1, clamped to 0)
  m = beit3_convert.bicubic_matrix(2, 4)
  a = -0.75
  w = [((a * s - 5 * a) * s + 8 * a) * s - 4 * a for s in (1.75,)] + \
      [((a + 2) * s - (a + 3)) * s * s + 1 for s in (0.75, 0.25)] + [((a * s - 5 * a) * s + 8 * a) * s - 4 * a
                                                                      for s in (1.25,)]
  np.testing.assert_allclose(m[0], [w[0] + w[1] + w[2], w[3]], atol=1e-12)


def test_bicubic_resize_matches_torch():
  torch = pytest.importorskip("torch", reason="torch is not installed (optional: requirements-convert.txt)")
  rng = np.random.default_rng(0)
  for g_in, g_out in ((14, 24), (4, 6), (24, 14), (5, 3)):
    x = rng.normal(size=(g_in * g_in, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.reshape(1, g_in, g_in, 8)).permute(0, 3, 1, 2),
                                          size=(g_out, g_out), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(g_out * g_out, 8).numpy()
    np.testing.assert_allclose(beit3_convert.resize_grid(x, g_out), ref, atol=1e-5)


def test_pth_reader_gives_the_npz_state_dict(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed (optional: requirements-convert.txt)")
  state = _state()
  path = str(tmp_path / "beit3.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  read = convert_beit3.read_state_dict(path)
  assert sorted(read) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(read[k], v)


def test_a_unilm_training_checkpoint_reads_and_other_pickled_objects_say_what_to_do(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed (optional: requirements-convert.txt)")
  import argparse  # pylint: disable=g-import-not-at-top
  state = {"a.weight": torch.ones(2, 3), "b": torch.arange(3)}
  path = str(tmp_path / "unilm.pth")  # as unilm's save_model writes it: the run's arguments beside the weights
  torch.save({"model": state, "args": argparse.Namespace(lr=1e-3, model="beit3_base"), "epoch": 3}, path)
  assert sorted(convert_beit3.read_state_dict(path)) == ["a.weight", "b"]
  torch.save({"model": state, "other": _Opaque()}, path)
  with pytest.raises(ValueError, match=r"unilm.pth: it pickles objects besides tensors.*save its state dict alone"):
    convert_beit3.read_state_dict(path)


class _Opaque:
  pass


def test_a_junk_npz_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_bytes(b"junk")
  with pytest.raises(ValueError, match=r"--checkpoint=.*junk.npz: not a readable .npz of arrays"):
    convert_beit3.read_state_dict(str(path))


def test_cli_converts_and_bad_keys_are_one_line_errors_that_write_nothing(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(FIXTURES))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, **dict(_state(), **{"decoder.weight": np.zeros(3, np.float32)}))
  run = lambda *args: subprocess.run([sys.executable, "-m", "alignrec_jax.convert_beit3", *args], cwd=repo,
                                     capture_output=True, text=True, timeout=600)
  proc = run(f"--checkpoint={bad}", f"--out={tmp_path / 'bad_out'}", "--no_tokenizer")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unexpected key 'decoder.weight'")
  assert not os.path.exists(tmp_path / "bad_out") and os.listdir(tmp_path) == ["bad.npz"]
  proc = run(f"--checkpoint={STATE}", f"--out={tmp_path / 'tiny'}", "--image_size=48", "--max_text_len=12",
             "--no_tokenizer")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "vision positions interpolated bicubically 4x4 -> 6x6" in proc.stdout
  assert init_from.read_meta(str(tmp_path / "tiny"))["image_size"] == 48


def test_converted_weights_keep_their_tokenizer_and_refuse_another(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from alignrec_jax.data import content  # pylint: disable=g-import-not-at-top
  from alignrec_jax.data.mmrec import DataError  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(FIXTURES))
  run = lambda *args: subprocess.run([sys.executable, "-m", "alignrec_jax.convert_beit3", *args], cwd=repo,
                                     capture_output=True, text=True, timeout=600)
  neither = run(f"--checkpoint={STATE}", f"--out={tmp_path / 'neither'}")
  assert neither.returncode == 1 and "give --tokenizer=FILE.spm" in neither.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "neither")
  own, other = (content.Tokenizer.from_pieces([f"\u2581{w}" for w in words]) for words in
                (("red", "blue", "item"), ("green", "round", "item", "small")))
  own.save(str(tmp_path / "own.spm"))
  other.save(str(tmp_path / "other.spm"))
  out = tmp_path / "converted"
  proc = run(f"--checkpoint={STATE}", f"--out={out}", "--max_text_len=12", f"--tokenizer={tmp_path / 'own.spm'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert init_from.read_meta(str(out))["tokenizer"] == own.fingerprint()
  config = ml_collections.ConfigDict({"data": {"tokenizer": ""}, "pretrain": {"init_from": str(out)}})
  # by default pre-training reads the weights' text embedding with their own tokenizer
  assert content.Tokenizer.load(init_from.tokenizer_path(config)).fingerprint() == own.fingerprint()
  config.data.tokenizer = str(tmp_path / "own.spm")
  assert init_from.tokenizer_path(config) == str(tmp_path / "own.spm")
  config.data.tokenizer = str(tmp_path / "other.spm")
  with pytest.raises(DataError, match="is not the tokenizer the weights of config.pretrain.init_from"):
    init_from.tokenizer_path(config)
  bare = tmp_path / "bare"
  assert run(f"--checkpoint={STATE}", f"--out={bare}", "--no_tokenizer").returncode == 0
  assert init_from.read_meta(str(bare))["tokenizer"] is None
  config.pretrain.init_from = str(bare)
  assert init_from.tokenizer_path(config) == str(tmp_path / "other.spm")  # no tokenizer of their own: as configured


def test_bfloat16_features_agree_with_float32_ones(converted):
  """The compute dtype's cost on the fixture's (torchscale-initialised) encoder: cosine > 0.999 at every item."""
  model, params, _ = converted
  io = np.load(IO)
  low = model.clone(dtype=jax.numpy.bfloat16)
  for case in ("joint", "masked"):
    args = (io[f"{case}/visual_tokens"], io[f"{case}/textual_tokens"].astype(np.int32),
            io[f"{case}/vision_masked_position"] if case == "masked" else None)
    with jax.default_matmul_precision("highest"):
      want = np.asarray(model.apply({"params": params}, *args, method=model.features))
    got = np.asarray(low.apply({"params": params}, *args, method=low.features))
    assert got.dtype == np.float32
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() > 0.999 and np.abs(got - want).max() > 1e-4  # agrees, but is computed otherwise
