"""MMEnc: output shapes, padding and patch masking, modality routing, determinism of dropout keys."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignrec_jax.models import mmenc


def _model(**kw):
  args = dict(vocab_size=50, image_size=16, patch_size=4, max_text_len=8, layers=3, hidden=32, heads=4, mlp=64,
              n_vl_layers=1)
  args.update(kw)
  return mmenc.MMEnc(**args)


def _inputs(b=3, seed=0):
  rng = np.random.default_rng(seed)
  images = mmenc.normalize_images(jnp.asarray(rng.integers(0, 256, (b, 16, 16, 3), dtype=np.uint8)))
  tokens = np.zeros((b, 8), np.int32)
  tokens[:, 0] = 1
  tokens[:, 1:5] = rng.integers(5, 50, (b, 4))
  tokens[:, 5] = 2
  return images, jnp.asarray(tokens)


def test_output_shapes_and_parameter_tree():
  model = _model()
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  out = model.apply({"params": params}, images, tokens)
  assert out["cls"].shape == (3, 32) and out["text_cls"].shape == (3, 32)
  assert out["mlm_logits"].shape == (3, 8, 50)
  assert out["mim_pred"].shape == (3, 16, 4 * 4 * 3)
  assert model.apply({"params": params}, images, tokens, method=model.features).shape == (3, 32)
  # modality experts below the top layer, and every expert in the top layer (both modes share one tree)
  assert {"v_ffn", "l_ffn"} <= set(params["block_0"]) and "vl_ffn" not in params["block_0"]
  assert {"v_ffn", "l_ffn", "vl_ffn"} <= set(params["block_2"])
  assert params["image_pos"].shape == (1, 17, 32) and params["text_pos"].shape == (1, 8, 32)
  # separate-modality mode runs on the same parameters
  sep = model.apply({"params": params}, images, tokens, joint=False)
  assert sep["cls"].shape == (3, 32)


def test_padding_is_ignored_and_text_reaches_the_visual_cls():
  model = _model()
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  feats = lambda t: model.apply({"params": params}, images, t, method=model.features)
  base = feats(tokens)
  # whatever enters at a [PAD] position changes nothing (padding keys are masked out)
  moved = dict(params, text_pos=params["text_pos"].at[:, 6:].add(3.0))
  np.testing.assert_allclose(model.apply({"params": moved}, images, tokens, method=model.features), base, atol=1e-5)
  moved = dict(params, text_pos=params["text_pos"].at[:, 3].add(3.0))  # a word position does matter
  assert np.abs(np.asarray(model.apply({"params": moved}, images, tokens, method=model.features) - base)).max() > 1e-4
  # a different word changes the joint visual [CLS] feature
  assert np.abs(np.asarray(feats(tokens.at[:, 2].set(7)) - base)).max() > 1e-4


def test_separate_mode_keeps_modalities_apart():
  model = _model()
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  sep = lambda i, t: model.apply({"params": params}, i, t, joint=False)
  base = sep(images, tokens)
  other_text = sep(images, tokens.at[:, 2].set(7))
  np.testing.assert_allclose(other_text["cls"], base["cls"], atol=1e-5)      # image [CLS] ignores the text
  assert np.abs(np.asarray(other_text["text_cls"] - base["text_cls"])).max() > 1e-4
  other_image = sep(images * 0.5, tokens)
  np.testing.assert_allclose(other_image["text_cls"], base["text_cls"], atol=1e-5)


def test_patch_mask_replaces_masked_patches_only():
  model = _model(layers=1, n_vl_layers=0)
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  mask = jnp.zeros((3, 16), bool).at[:, :4].set(True)
  out = model.apply({"params": params}, images, tokens, mask)
  # with the first 4 patches masked, their pixels no longer matter
  changed = images.at[:, :4, :, :].add(1.0)  # image rows 0..3 = the first row of 4x4 patches
  out2 = model.apply({"params": params}, changed, tokens, mask)
  np.testing.assert_allclose(out["cls"], out2["cls"], atol=1e-5)
  unmasked = model.apply({"params": params}, changed, tokens)
  assert np.abs(np.asarray(unmasked["cls"] - model.apply({"params": params}, images, tokens)["cls"])).max() > 1e-4


def test_dropout_is_driven_by_the_key():
  model = _model(dropout=0.3)
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  run = lambda k: model.apply({"params": params}, images, tokens, deterministic=False, rngs={"dropout": k})["cls"]
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert np.abs(np.asarray(run(jax.random.key(1)) - run(jax.random.key(2)))).max() > 1e-4


def test_untied_head_and_config_sizes():
  model = _model(tie_mlm_head=False)
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  assert "mlm_proj" in params and "mlm_bias" not in params
  cfg = ml_collections.ConfigDict(dict(size="base", image_size=224, patch_size=16, max_text_len=32, dropout=0.0))
  base = mmenc.make_mmenc(cfg, vocab_size=1000)
  assert (base.layers, base.hidden, base.heads, base.n_patches) == (12, 768, 12, 196)
  with pytest.raises(ValueError, match="config.pretrain.size='huge'"):
    cfg.size = "huge"
    mmenc.make_mmenc(cfg, 1000)


def test_cls_bow_head_reads_the_visual_cls_only():
  model = _model(cls_bow_head=True)
  images, tokens = _inputs()
  params = model.init(jax.random.key(0), images, tokens)["params"]
  out = model.apply({"params": params}, images, tokens)
  assert out["bow_logits"].shape == (3, 50)
  assert "bow_logits" not in _model().apply({"params": {k: v for k, v in params.items() if not k.startswith("bow")}},
                                            images, tokens)
  # the head is a function of the [CLS] state: same [CLS] state, same logits
  head = lambda p, h: p["bow_bias"] + mmenc.nn.LayerNorm().apply({"params": p["bow_ln"]}, mmenc.nn.gelu(
      h @ p["bow_dense"]["kernel"] + p["bow_dense"]["bias"])) @ p["token_embed"]["embedding"].T
  np.testing.assert_allclose(out["bow_logits"], head(params, out["cls"]), rtol=1e-4, atol=1e-5)
  cfg = ml_collections.ConfigDict(dict(size="tiny", image_size=16, patch_size=4, max_text_len=8, dropout=0.0,
                                       cls_bow_weight=0.5))
  assert mmenc.make_mmenc(cfg, 50).cls_bow_head
