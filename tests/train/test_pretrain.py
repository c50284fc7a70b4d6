"""Stage-1 loop: pre-training runs and resumes exactly after a crash, extraction writes the bridge, bridge errors."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from alignrec_jax.data.mmrec import DataError
from alignrec_jax.train import bridge
from alignrec_jax.train import pretrain as pretrain_lib
from tests.train import tiny_pretrain_config

N_ITEMS = 8
WORDS = ["red", "blue", "green", "round", "square", "small", "large", "bright"]


def _items(root):
  os.makedirs(root / "images", exist_ok=True)
  rng = np.random.default_rng(0)
  rows = ["itemID\ttext\timage"]
  for i in range(N_ITEMS):
    colour = np.array([255 * (i % 2), 255 * (i // 2 % 2), 255 * (i // 4 % 2)], np.uint8)
    pixels = np.clip(colour + rng.integers(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    rows.append(f"{i}\t{WORDS[i]} {WORDS[(i + 3) % 8]} item, number {i}\timages/{i}.png")
  (root / "items.tsv").write_text("\n".join(rows) + "\n")


def _config(root, steps=6):
  """The tiny stage-1 config (dropout on: the resumed run must also reproduce the dropout keys) on these items."""
  config = tiny_pretrain_config.get_config()
  config.data.root = str(root)
  config.pretrain.steps = steps
  config.train.num_devices = 2
  return config


def _params(config, workdir):
  from alignrec_jax.data import content
  tok = content.Tokenizer.load(os.path.join(workdir, content.TOKENIZER_FILE))
  return pretrain_lib.load_pretrained(config, workdir, tok)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("items")
  _items(root)
  workdir = str(root / "straight")
  config = _config(root)
  summary = pretrain_lib.pretrain(config, workdir)
  return root, config, workdir, summary


def test_pretrain_logs_and_checkpoints(straight_run):
  _, config, workdir, summary = straight_run
  assert summary["first"]["step"] == 1 and summary["last"]["step"] == 6
  for key in ("loss", "mlm", "mim", "mlm_acc", "items_per_s"):
    assert np.isfinite(summary["last"][key])
  assert sorted(n for n in os.listdir(os.path.join(workdir, "pretrain")) if n.isdigit()) == ["4", "6"]
  assert os.path.isfile(os.path.join(workdir, "tokenizer.spm"))
  assert os.path.isfile(os.path.join(workdir, "pretrain_history.json"))
  # a rerun of a finished run does nothing
  again = pretrain_lib.pretrain(config, workdir)
  assert again["last"] == summary["last"]


def test_a_resume_with_another_stage1_setting_is_refused(straight_run):
  from alignrec_jax.train import workdir as workdir_lib
  _, config, workdir, _ = straight_run
  changed = config.copy_and_resolve_references()
  changed.pretrain.lr = 5e-3
  changed.optim.lr = 0.5  # a stage-2 key: pre-training never reads it
  with pytest.raises(workdir_lib.WorkdirError, match=r"other settings \(pretrain.lr: 0.001 -> 0.005\)"):
    pretrain_lib.pretrain(changed, workdir)


def test_a_damaged_latest_step_is_moved_aside_and_the_previous_one_resumed(straight_run, tmp_path, caplog):
  import shutil
  _, config, straight, _ = straight_run
  workdir = tmp_path / "copy"
  shutil.copytree(straight, workdir)
  data = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "pretrain" / "6" / "state") for f in fs
          if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
  path = max(data, key=os.path.getsize)
  blob = bytearray(open(path, "rb").read())
  blob[len(blob) // 2] ^= 0xFF
  open(path, "wb").write(bytes(blob))
  summary = pretrain_lib.pretrain(config, str(workdir))  # steps 5 and 6 again, from step 4
  assert "pre-training checkpoint 6 in" in caplog.text and "falling back to the previous checkpoint" in caplog.text
  assert os.listdir(workdir / "damaged_checkpoints") and summary["last"]["step"] == 6
  _, resumed, _ = _params(config, str(workdir))
  _, reference, _ = _params(config, straight)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, reference)


def test_crash_then_resume_matches_the_uninterrupted_run(straight_run, monkeypatch):
  root, config, straight, _ = straight_run
  workdir = str(root / "resumed")
  real = pretrain_lib.batch_indices

  def crash_at_step_3(seed, step, n, b):
    if step == 3:
      raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
    return real(seed, step, n, b)

  monkeypatch.setattr(pretrain_lib, "batch_indices", crash_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    pretrain_lib.pretrain(config, workdir)
  assert sorted(n for n in os.listdir(os.path.join(workdir, "pretrain")) if n.isdigit()) == ["2"]
  monkeypatch.setattr(pretrain_lib, "batch_indices", real)
  summary = pretrain_lib.pretrain(config, workdir)
  assert summary["last"]["step"] == 6
  _, resumed, step = _params(config, workdir)
  _, reference, _ = _params(config, straight)
  assert step == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, reference)


def test_extract_writes_the_bridge_once(straight_run):
  _, config, workdir, _ = straight_run
  info = pretrain_lib.extract(config, workdir)
  assert info["n_items"] == N_ITEMS and info["dim"] == 64 and info["pretrain_step"] == 6
  full = bridge.load_feature_table(workdir, N_ITEMS)
  assert full.shape == (N_ITEMS, 64) and full.dtype == np.float32
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "image_feat.npy")), full)
  masked_image = bridge.load_feature_table(workdir, N_ITEMS, "mask_image")
  masked_text = np.load(os.path.join(workdir, "image_feat_mask_text.npy"))
  assert np.abs(masked_image - full).max() > 1e-4 and np.abs(masked_text - full).max() > 1e-4
  # features equal a direct forward pass of the checkpoint
  model, params, _ = _params(config, workdir)
  from alignrec_jax.data import content
  tok = content.Tokenizer.load(os.path.join(workdir, content.TOKENIZER_FILE))
  table = content.read_items(pretrain_lib.items_path(config))
  image = content.load_image(table.image_paths[5], 8)[None]
  tokens = tok.encode(table.texts[5], 8)[None]
  from alignrec_jax.models import mmenc
  direct = model.apply({"params": params}, mmenc.normalize_images(image), tokens, method=model.features)
  np.testing.assert_allclose(direct[0], full[5], rtol=1e-4, atol=1e-4)
  # a second call skips the work
  stamp = os.path.getmtime(os.path.join(workdir, "image_feat.npy"))
  pretrain_lib.extract(config, workdir)
  assert os.path.getmtime(os.path.join(workdir, "image_feat.npy")) == stamp


def test_random_init_checkpoint_with_zero_steps(straight_run):
  root, _, _, _ = straight_run
  config = _config(root, steps=0)
  workdir = str(root / "random")
  pretrain_lib.pretrain(config, workdir)
  model, params, step = _params(config, workdir)
  assert step == 0
  reference = jax.device_get(pretrain_lib.init_params(model, jax.random.key(config.seed)))
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_configured_spm_sizes_the_encoder_and_stays_with_the_checkpoint(straight_run):
  import sentencepiece as spm
  from alignrec_jax.data import content
  root, _, _, _ = straight_run
  texts = [line.split("\t")[1] for line in (root / "items.tsv").read_text().splitlines()[1:]]
  with open(root / "tiny.spm", "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=f, model_type="bpe", vocab_size=40,
                                   hard_vocab_limit=False, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
  n_pieces = spm.SentencePieceProcessor(model_file=str(root / "tiny.spm")).get_piece_size()
  config = _config(root, steps=0)
  config.data.tokenizer = str(root / "tiny.spm")
  workdir = str(root / "spm")
  pretrain_lib.pretrain(config, workdir)
  assert (root / "spm" / content.TOKENIZER_FILE).read_bytes() == (root / "tiny.spm").read_bytes()
  model, _, _ = _params(config, workdir)
  assert model.vocab_size == n_pieces + 2  # + <pad> and <mask>
  config.data.tokenizer = ""  # extraction reads the workdir's copy
  assert pretrain_lib.extract(config, workdir)["n_items"] == N_ITEMS


def test_bridge_errors(tmp_path):
  tables = {"full": np.ones((5, 3), np.float32), "mask_image": np.zeros((5, 3)), "mask_text": np.zeros((5, 3))}
  with pytest.raises(DataError, match="no stage-1 feature checkpoint in .*features.*stage=extract"):
    bridge.load_feature_table(str(tmp_path), 5)
  bridge.save_feature_table(str(tmp_path), tables)
  np.testing.assert_array_equal(bridge.load_feature_table(str(tmp_path), 5), tables["full"])
  assert bridge.has_feature_table(str(tmp_path), 5)
  with pytest.raises(DataError, match=r"has shape \(5, 3\), but the dataset has 7 items"):
    bridge.load_feature_table(str(tmp_path), 7)
  with pytest.raises(ValueError, match="features_variant='other'"):
    bridge.load_feature_table(str(tmp_path), 5, "other")
  # an interrupted save leaves only orbax's temporary directory behind
  features = os.path.join(str(tmp_path), "features")
  os.rename(os.path.join(features, "0"), os.path.join(features, "0.orbax-checkpoint-tmp-1234"))
  with pytest.raises(DataError, match="is incomplete"):
    bridge.load_feature_table(str(tmp_path), 5)
  assert not bridge.has_feature_table(str(tmp_path), 5)
  with pytest.raises(ValueError, match="NaN"):
    bridge.save_feature_table(str(tmp_path), {"full": np.full((5, 3), np.nan)})
  bridge.save_feature_table(str(tmp_path), {"full": np.ones((5, 3))})  # replaces the broken one
  with pytest.raises(DataError, match="has no 'mask_text' table"):
    bridge.load_feature_table(str(tmp_path), 5, "mask_text")


def _beit3_meta(model) -> dict:
  return dict(vocab_size=model.vocab_size, hidden=model.hidden, layers=model.layers, heads=model.heads, mlp=model.mlp,
              patch_size=model.patch_size, image_size=model.image_size, max_text_len=model.max_text_len + 4)


def _fresh_encoder(root, tmp_path):
  """(steps=0 config, its workdir, model, params): a randomly initialised encoder saved without any ICA step."""
  config = _config(root, steps=0)
  plain = str(tmp_path / "plain")
  pretrain_lib.pretrain(config, plain)
  model, fresh, _ = _params(config, plain)
  return config, plain, model, fresh


def test_init_from_loads_the_encoder_and_leaves_the_heads_fresh(straight_run, tmp_path):
  from alignrec_jax.train import init_from
  config, plain, model, fresh = _fresh_encoder(straight_run[0], tmp_path)
  # "converted" weights: the fresh encoder shifted, with a longer text table that loading truncates
  rng = np.random.default_rng(0)
  weights = jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32), fresh["beit3"])
  table = weights["encoder"]["embed_positions"]["B"]["embedding"]
  weights["encoder"]["embed_positions"]["B"]["embedding"] = np.concatenate([table, np.ones((4, table.shape[1]),
                                                                                          np.float32)])
  init_from.save(str(tmp_path / "converted"), weights, _beit3_meta(model))
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "converted")
  loaded_dir = str(tmp_path / "loaded")
  pretrain_lib.pretrain(config, loaded_dir)  # steps = 0: the loaded encoder itself, no ICA
  _, params, step = _params(config, loaded_dir)
  assert step == 0
  weights["encoder"]["embed_positions"]["B"]["embedding"] = table
  jax.tree.map(np.testing.assert_array_equal, params["beit3"], weights)
  for head in ("mim_proj", "mim_ln", "mlm_ln", "mlm_bias"):  # the heads keep their fresh initialisation
    jax.tree.map(np.testing.assert_array_equal, params[head], fresh[head])
  # and the extracted features are those of the loaded encoder
  info = pretrain_lib.extract(config, loaded_dir)
  assert info["pretrain_step"] == 0
  pretrain_lib.extract(config, plain)
  loaded_features = bridge.load_feature_table(loaded_dir, N_ITEMS)
  assert np.abs(loaded_features - bridge.load_feature_table(plain, N_ITEMS)).max() > 1e-3
  # a checkpoint of another architecture is a one-line error naming the field
  wrong = _beit3_meta(model)
  wrong["layers"] += 1
  init_from.save(str(tmp_path / "wrong"), jax.tree.map(np.asarray, fresh["beit3"]), wrong)
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "wrong")
  with pytest.raises(DataError, match=f"has layers={wrong['layers']}, the model {model.layers}"):
    pretrain_lib.pretrain(config, str(tmp_path / "wrong_run"))
  assert not os.path.exists(tmp_path / "wrong_run")  # refused by the config checks: nothing written, nothing built
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "converted")
    config.pretrain.max_text_len = model.max_text_len + 5  # the converted table holds max_text_len + 4 positions
  with pytest.raises(DataError, match=f"holds {model.max_text_len + 4} text positions, config.pretrain."
                                      f"max_text_len={model.max_text_len + 5} needs more"):
    pretrain_lib.pretrain(config, str(tmp_path / "long_run"))
  assert not os.path.exists(tmp_path / "long_run")
  with config.unlocked():
    config.pretrain.max_text_len = model.max_text_len
  # a text embedding with fewer rows than the tokenizer has ids cannot hold its tokens (more rows are fine: BEiT-3's
  # 64,010 rows hold beit3.spm's 64,002 ids)
  small = _beit3_meta(model)
  small["vocab_size"] -= 1
  init_from.save(str(tmp_path / "small"), jax.tree.map(np.asarray, fresh["beit3"]), small)
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "small")
  with pytest.raises(DataError, match=f"text embedding has {small['vocab_size']} rows, the tokenizer "
                                      f"{model.vocab_size} ids"):
    pretrain_lib.pretrain(config, str(tmp_path / "small_run"))
  # found after the tokenizer and the dataset were built: the failed run takes them away again, so the corrected
  # command starts clean in the same workdir
  assert not os.path.exists(tmp_path / "small_run")
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "converted")
  pretrain_lib.pretrain(config, str(tmp_path / "small_run"))
  assert _params(config, str(tmp_path / "small_run"))[2] == 0


def test_init_from_a_checkpoint_with_more_embedding_rows_than_tokenizer_ids_loads_them_all(straight_run, tmp_path):
  from alignrec_jax.train import init_from
  config, _, model, fresh = _fresh_encoder(straight_run[0], tmp_path)
  weights = jax.tree.map(np.asarray, fresh["beit3"])
  embedding = weights["text_embed"]["embedding"]
  weights["text_embed"]["embedding"] = np.concatenate([embedding, np.full((3, embedding.shape[1]), 7, np.float32)])
  meta = _beit3_meta(model)
  meta["vocab_size"] += 3
  init_from.save(str(tmp_path / "wider"), weights, meta)
  with config.unlocked():
    config.pretrain.init_from = str(tmp_path / "wider")
  pretrain_lib.pretrain(config, str(tmp_path / "wider_run"))
  _, params, _ = _params(config, str(tmp_path / "wider_run"))
  np.testing.assert_array_equal(params["beit3"]["text_embed"]["embedding"], weights["text_embed"]["embedding"])


def test_weight_decay_skips_biases_norms_positions_and_tokens(straight_run):
  _, config, workdir, _ = straight_run
  _, params, _ = _params(config, workdir)
  mask = pretrain_lib.weight_decay_mask(params)
  b3 = mask["beit3"]
  assert b3["text_embed"]["embedding"] and b3["vision_embed"]["proj"]["kernel"]
  assert b3["encoder"]["layers_0"]["self_attn"]["q_proj"]["A"]["kernel"] and mask["mim_proj"]["kernel"]
  assert not b3["vision_embed"]["proj"]["bias"] and not b3["vision_embed"]["cls_token"]
  assert not b3["vision_embed"]["mask_token"] and not b3["encoder"]["embed_positions"]["A"]["embedding"]
  assert not b3["encoder"]["embed_positions"]["B"]["embedding"] and not mask["mlm_bias"]
  assert not b3["encoder"]["layers_0"]["ffn"]["B"]["ffn_layernorm"]["scale"]


def test_a_resume_with_another_compute_dtype_or_matmul_precision_is_refused(straight_run):
  from alignrec_jax.train import workdir as workdir_lib
  _, config, workdir, _ = straight_run
  for key, old, new in (("compute_dtype", "float32", "bfloat16"), ("matmul_precision", "highest", "default")):
    changed = config.copy_and_resolve_references()
    changed.pretrain[key] = new
    with pytest.raises(workdir_lib.WorkdirError, match=rf"other settings \(pretrain.{key}: '{old}' -> '{new}'\)"):
      pretrain_lib.pretrain(changed, workdir)


def test_bfloat16_training_steps_have_finite_losses_and_keep_float32_state():
  from alignrec_jax.losses import ica
  from alignrec_jax.models import mmenc
  from alignrec_jax.train import parallel
  config = tiny_pretrain_config.get_config()
  pre = config.pretrain
  pre.compute_dtype = "bfloat16"
  model = mmenc.make_mmenc(pre, 30, 1)
  params = pretrain_lib.init_params(model, jax.random.key(0))
  tx = pretrain_lib.make_optimizer(pre, 10)
  kwargs = dict(text_mask_ratio=pre.text_mask_ratio, image_mask_ratio=pre.image_mask_ratio,
                mim_target=ica.MIM_TARGETS[pre.mim_target], mask_id=29, special_ids=(0, 1, 2, 3, 29))
  devices = jax.local_devices()[:1]
  step = parallel.pmap_train_step(pretrain_lib.ica_share(model, kwargs, 1), tx, devices)
  state = parallel.put_replicated((params, tx.init(params)), devices)
  rng = np.random.default_rng(0)
  tokens = np.concatenate([np.zeros((4, 1)), rng.integers(4, 29, (4, 6)), np.full((4, 1), 2)], 1).astype(np.int32)
  batch = {"image": rng.integers(0, 256, (1, 4, 8, 8, 3), dtype=np.uint8), "tokens": tokens[None]}
  losses = []
  for i in range(3):
    batch["key"] = pretrain_lib.device_keys(jax.random.key(1), i, 1)
    new_params, opt_state, metrics = step(*state, None, batch)
    state = (new_params, opt_state)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and all(np.isfinite(float(metrics[k])) for k in ("mlm", "mim"))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state) if np.issubdtype(leaf.dtype, np.floating))
  assert np.abs(np.asarray(state[0]["mim_proj"]["kernel"]) - np.asarray(params["mim_proj"]["kernel"])).max() > 0


def test_extraction_records_its_arithmetic_and_extracts_again_in_another(straight_run, tmp_path):
  import json
  import shutil
  root, config, straight, _ = straight_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight, workdir)
  info = pretrain_lib.extract(config, workdir)
  assert (info["compute_dtype"], info["matmul_precision"]) == ("float32", "highest")
  full = bridge.load_feature_table(workdir, N_ITEMS)
  low = config.copy_and_resolve_references()
  low.pretrain.compute_dtype = "bfloat16"
  info = pretrain_lib.extract(low, workdir)  # the float32 table does not stand for a bfloat16 one
  assert info["compute_dtype"] == "bfloat16"
  with open(os.path.join(workdir, "features_meta.json"), encoding="utf-8") as f:
    assert json.load(f)["compute_dtype"] == "bfloat16"
  table = bridge.load_feature_table(workdir, N_ITEMS)
  cosine = (table * full).sum(-1) / np.linalg.norm(table, axis=-1) / np.linalg.norm(full, axis=-1)
  assert cosine.min() > 0.999 and np.abs(table - full).max() > 1e-5
  # new items are encoded as the table was: in bfloat16 (the stored run config says float32)
  features, _ = pretrain_lib.encode_items(workdir, pretrain_lib.items_path(config))
  np.testing.assert_allclose(features, table, rtol=1e-5, atol=1e-5)
