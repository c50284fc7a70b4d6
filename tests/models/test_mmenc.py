"""MMEnc = BEiT-3: parameter names, sub-LN FFN against a float64 reference, multiway routing, padding, patch masking,
single-modality encoding, the opt-in VL-FFN, dropout keys, heads. (tests/models/test_beit3_oracle.py compares the
whole encoder with torchscale's outputs.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignrec_jax.models import mmenc
from configs import base as base_config

PAD = 1  # BEiT-3's <pad>; token 0 is <s> and must not be taken for padding


def _model(**kw):
  args = dict(vocab_size=50, pad_id=PAD, image_size=16, patch_size=4, max_text_len=8, layers=2, hidden=32, heads=4,
              mlp=64)
  args.update(kw)
  return mmenc.MMEnc(**args)


def _inputs(b=3, seed=0):
  rng = np.random.default_rng(seed)
  images = mmenc.normalize_images(jnp.asarray(rng.integers(0, 256, (b, 16, 16, 3), dtype=np.uint8)))
  tokens = np.full((b, 8), PAD, np.int32)
  tokens[:, 0] = 0
  tokens[:, 1:5] = rng.integers(5, 50, (b, 4))
  tokens[:, 5] = 2
  return images, jnp.asarray(tokens)


def _init(model, images, tokens):
  return model.init(jax.random.key(0), images, tokens)["params"]


def _perturb(params, path, delta=0.5):
  """A copy of `params` with the leaf at `path` (a '/'-joined string) shifted by `delta` (scalar or array)."""
  keys = path.split("/")

  def go(node, i):
    node = dict(node)
    node[keys[i]] = node[keys[i]] + delta if i == len(keys) - 1 else go(node[keys[i]], i + 1)
    return node
  return go(params, 0)


def test_parameter_tree_has_torchscale_names_and_shapes():
  model = _model()
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  enc = params["beit3"]["encoder"]
  layer = enc["layers_0"]
  assert set(layer) == {"self_attn_layer_norm", "self_attn", "final_layer_norm", "ffn"}
  assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "inner_attn_ln"}
  for part in ("q_proj", "k_proj", "v_proj", "out_proj", "inner_attn_ln"):
    assert set(layer["self_attn"][part]) == {"A", "B"}
  assert set(layer["ffn"]) == {"A", "B"}  # no vision-language FFN unless asked for
  assert set(layer["ffn"]["A"]) == {"fc1", "ffn_layernorm", "fc2"}
  assert set(enc["layer_norm"]) == {"A", "B"}
  # fairseq layout: 2 unused rows, then [CLS] + 16 patches; 2 unused rows, then max_text_len text positions
  assert enc["embed_positions"]["A"]["embedding"].shape == (2 + 1 + 16, 32)
  assert enc["embed_positions"]["B"]["embedding"].shape == (2 + 8, 32)
  assert set(params["beit3"]["vision_embed"]) == {"proj", "cls_token", "mask_token"}
  assert params["beit3"]["text_embed"]["embedding"].shape == (50, 32)
  out = model.apply({"params": params}, images, tokens)
  assert out["cls"].shape == (3, 32) and out["text_cls"].shape == (3, 32)
  assert out["mlm_logits"].shape == (3, 8, 50) and out["mim_pred"].shape == (3, 16, 4 * 4 * 3)
  assert model.apply({"params": params}, images, tokens, method=model.features).shape == (3, 32)


def test_ffn_is_fc1_erf_gelu_sub_layernorm_fc2_in_float64():
  ffn = mmenc.FeedForwardNetwork(hidden=4, mlp=6, dropout=0.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)) * 3, jnp.float32)
  params = ffn.init(jax.random.key(0), x, True)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ffn.apply({"params": params}, x, True))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact GELU, not the tanh approximation
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / np.sqrt(var + 1e-5) * p["ffn_layernorm"]["scale"] + p["ffn_layernorm"]["bias"]  # torch's eps
  want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_multiway_copies_route_vision_positions_to_a_and_text_positions_to_b():
  model = _model()
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  run = lambda p, i, t: np.asarray(model.apply({"params": p}, i, t, method=model.encode))
  joint, image, text = run(params, images, tokens), run(params, images, None), run(params, None, tokens)
  assert joint.shape == (3, 17 + 8, 32) and image.shape == (3, 17, 32) and text.shape == (3, 8, 32)
  # the final LayerNorm's B copy acts on the text positions only
  moved = _perturb(params, "beit3/encoder/layer_norm/B/bias")
  np.testing.assert_allclose(run(moved, images, tokens)[:, :17], joint[:, :17], atol=1e-6)
  np.testing.assert_allclose(run(moved, images, tokens)[:, 17:], joint[:, 17:] + 0.5, atol=1e-5)
  np.testing.assert_allclose(run(moved, images, None), image, atol=1e-6)  # an image alone uses A only
  # the B copy of a block's query projection moves the text-only encoding, never the image-only one
  noise = jnp.asarray(np.random.default_rng(1).normal(size=(32, 32)), jnp.float32)
  moved = _perturb(params, "beit3/encoder/layers_0/self_attn/q_proj/B/kernel", noise)
  np.testing.assert_allclose(run(moved, images, None), image, atol=1e-6)
  assert np.abs(run(moved, None, tokens) - text).max() > 1e-3
  moved = _perturb(params, "beit3/encoder/layers_0/ffn/A/fc1/bias", noise[0, :1] * jnp.ones(64))
  np.testing.assert_allclose(run(moved, None, tokens), text, atol=1e-6)
  # one softmax over the joint sequence: the text reaches the visual [CLS]
  assert np.abs(run(params, images, tokens.at[:, 2].set(7))[:, 0] - joint[:, 0]).max() > 1e-4


def test_padding_uses_the_tokenizer_pad_id_and_is_never_attended_to():
  model = _model()
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  feats = lambda p, t: np.asarray(model.apply({"params": p}, images, t, method=model.features))
  base = feats(params, tokens)
  # text positions 6, 7 hold <pad>: their position rows (2 + 6, 2 + 7 of the text table) change nothing
  table = params["beit3"]["encoder"]["embed_positions"]["B"]["embedding"]
  moved = jax.tree.map(lambda x: x, params)
  moved["beit3"]["encoder"]["embed_positions"]["B"]["embedding"] = table.at[8:].add(3.0)
  np.testing.assert_allclose(feats(moved, tokens), base, atol=1e-5)
  moved["beit3"]["encoder"]["embed_positions"]["B"]["embedding"] = table.at[2 + 3].add(3.0)  # a word's row does
  assert np.abs(feats(moved, tokens) - base).max() > 1e-4
  # rows 0 and 1 are never read (fairseq's offset of 2)
  moved["beit3"]["encoder"]["embed_positions"]["B"]["embedding"] = table.at[:2].add(3.0)
  np.testing.assert_allclose(feats(moved, tokens), base, atol=1e-6)
  # <s> = 0 is a token, not padding: a model told pad_id=0 computes something else
  assert np.abs(np.asarray(_model(pad_id=0).apply({"params": params}, images, tokens, method=model.features))
                - base).max() > 1e-4
  # a shorter text is allowed (positions 2.. of the table), a longer one is an error
  assert model.apply({"params": params}, images, tokens[:, :6], method=model.features).shape == (3, 32)
  with pytest.raises(ValueError, match="max_text_len=8"):
    model.apply({"params": params}, images, jnp.concatenate([tokens, tokens], 1), method=model.features)


def test_patch_mask_replaces_masked_patches_by_the_mask_token():
  model = _model(layers=1)
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  mask = jnp.zeros((3, 16), bool).at[:, :4].set(True)
  out = model.apply({"params": params}, images, tokens, mask)
  changed = images.at[:, :4, :, :].add(1.0)  # image rows 0..3 = the first row of 4x4 patches
  np.testing.assert_allclose(model.apply({"params": params}, changed, tokens, mask)["cls"], out["cls"], atol=1e-5)
  unmasked = model.apply({"params": params}, changed, tokens)
  assert np.abs(np.asarray(unmasked["cls"] - model.apply({"params": params}, images, tokens)["cls"])).max() > 1e-4
  moved = _perturb(params, "beit3/vision_embed/mask_token", np.random.default_rng(1).normal(size=(1, 1, 32)))
  assert np.abs(np.asarray(model.apply({"params": moved}, images, tokens, mask)["cls"] - out["cls"])).max() > 1e-4


def test_separate_mode_encodes_each_modality_alone():
  model = _model()
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  sep = lambda i, t: model.apply({"params": params}, i, t, joint=False)
  base = sep(images, tokens)
  np.testing.assert_allclose(sep(images, tokens.at[:, 2].set(7))["cls"], base["cls"], atol=1e-6)
  assert np.abs(np.asarray(sep(images, tokens.at[:, 2].set(7))["text_cls"] - base["text_cls"])).max() > 1e-4
  np.testing.assert_allclose(sep(images * 0.5, tokens)["text_cls"], base["text_cls"], atol=1e-6)
  text_only = model.apply({"params": params}, None, tokens, method=model.encode)
  np.testing.assert_allclose(base["text_cls"], text_only[:, 0], atol=1e-6)


def test_vl_ffn_is_opt_in_and_serves_joint_inputs_only():
  model = _model(vl_ffn_layers=1)
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  assert "VL" in params["beit3"]["encoder"]["layers_1"]["ffn"]
  assert "VL" not in params["beit3"]["encoder"]["layers_0"]["ffn"]
  run = lambda p, i, t: np.asarray(model.apply({"params": p}, i, t, method=model.encode))
  moved = _perturb(params, "beit3/encoder/layers_1/ffn/VL/fc2/bias", np.random.default_rng(1).normal(size=32))
  assert np.abs(run(moved, images, tokens) - run(params, images, tokens)).max() > 1e-4
  np.testing.assert_allclose(run(moved, images, None), run(params, images, None), atol=1e-6)
  with pytest.raises(ValueError, match="vl_ffn_layers=3"):
    _init(_model(vl_ffn_layers=3), images, tokens)


def test_dropout_is_driven_by_the_key():
  model = _model(dropout=0.3)
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  run = lambda k: model.apply({"params": params}, images, tokens, deterministic=False, rngs={"dropout": k})["cls"]
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert np.abs(np.asarray(run(jax.random.key(1)) - run(jax.random.key(2)))).max() > 1e-4


def test_tied_and_untied_mlm_head_and_config_sizes():
  images, tokens = _inputs()
  model = _model()
  params = _init(model, images, tokens)
  out = model.apply({"params": params}, images, tokens)
  text_h = model.apply({"params": params}, images, tokens, method=model.encode)[:, 17:]
  ln = mmenc.nn.LayerNorm(epsilon=1e-5).apply({"params": params["mlm_ln"]}, text_h)
  np.testing.assert_allclose(out["mlm_logits"], ln @ params["beit3"]["text_embed"]["embedding"].T
                             + params["mlm_bias"], rtol=1e-4, atol=1e-4)
  untied = _init(_model(tie_mlm_head=False), images, tokens)
  assert "mlm_proj" in untied and "mlm_bias" not in untied
  cfg = base_config.get_base_config().pretrain
  cfg.update(size="base", image_size=224, patch_size=16, max_text_len=128, dropout=0.0)
  base = mmenc.make_mmenc(cfg, vocab_size=64010, pad_id=1)
  assert (base.layers, base.hidden, base.heads, base.mlp, base.n_patches) == (12, 768, 12, 3072, 196)
  cfg.size = "large"
  assert (lambda m: (m.layers, m.hidden, m.heads, m.mlp))(mmenc.make_mmenc(cfg, 64010, 1)) == (24, 1024, 16, 4096)
  with pytest.raises(ValueError, match="config.pretrain.size='huge'"):
    cfg.size = "huge"
    mmenc.make_mmenc(cfg, 1000, 1)


def test_cls_bow_head_reads_the_visual_cls_only():
  model = _model(cls_bow_head=True)
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  out = model.apply({"params": params}, images, tokens)
  assert out["bow_logits"].shape == (3, 50)
  assert "bow_logits" not in _model().apply({"params": {k: v for k, v in params.items() if not k.startswith("bow")}},
                                            images, tokens)
  head = lambda p, h: p["bow_bias"] + mmenc.nn.LayerNorm(epsilon=1e-5).apply({"params": p["bow_ln"]}, mmenc.nn.gelu(
      h @ p["bow_dense"]["kernel"] + p["bow_dense"]["bias"])) @ p["beit3"]["text_embed"]["embedding"].T
  np.testing.assert_allclose(out["bow_logits"], head(params, out["cls"]), rtol=1e-4, atol=1e-5)
  cfg = base_config.get_base_config().pretrain
  cfg.update(size="tiny", image_size=16, patch_size=4, max_text_len=8, dropout=0.0, cls_bow_weight=0.5)
  assert mmenc.make_mmenc(cfg, 50, PAD).cls_bow_head


def test_mlm_positions_give_the_full_heads_logits_at_those_positions():
  model = _model()
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  full = model.apply({"params": params}, images, tokens)["mlm_logits"]
  positions = jnp.asarray([[1, 3], [4, 0], [2, 2]], jnp.int32)
  got = model.apply({"params": params}, images, tokens, mlm_positions=positions)["mlm_logits"]
  assert got.shape == (3, 2, 50) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, jnp.take_along_axis(full, positions[..., None], axis=1), rtol=1e-6, atol=1e-6)


def _products(fn, *args):
  """The lines of the lowered `fn` that are matrix products (dot_general or convolution)."""
  text = jax.jit(fn).lower(*args).as_text()
  return [line for line in text.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


def test_matmul_precision_reaches_every_product_forward_and_backward():
  images, tokens = _inputs()
  params = _init(_model(), images, tokens)
  for precision, name in (("highest", "HIGHEST"), ("default", "DEFAULT")):
    model = _model(matmul_precision=precision, cls_bow_head=False)
    loss = lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(model.apply({"params": p}, images, tokens)))
    lines = _products(jax.grad(loss), params)
    assert len(lines) > 20 and all(name in line for line in lines)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  images, tokens = _inputs()
  model = _model(dtype=jnp.bfloat16)
  params = _init(model, images, tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  np.testing.assert_equal(jax.tree.map(np.shape, params), jax.tree.map(np.shape, _init(_model(), images, tokens)))
  out = model.apply({"params": params}, images, tokens)
  assert all(v.dtype == jnp.float32 for v in (out["cls"], out["text_cls"], out["mlm_logits"]))
  assert model.apply({"params": params}, images, tokens, method=model.features).dtype == jnp.float32
  forward = lambda p: model.apply({"params": p}, images, tokens, method=model.features)
  assert all("bf16" in line for line in _products(forward, params))  # every product of the encoder
  assert not any("bf16" in line for line in _products(lambda p: _model().apply({"params": p}, images, tokens,
                                                                                method=model.features), params))
  cfg = base_config.get_base_config().pretrain
  cfg.compute_dtype = "float16"
  with pytest.raises(ValueError, match="config.pretrain.compute_dtype='float16'"):
    mmenc.make_mmenc(cfg, 50, PAD)
  cfg.update(compute_dtype="bfloat16", matmul_precision="default")
  made = mmenc.make_mmenc(cfg, 50, PAD)
  assert (made.dtype, made.matmul_precision) == (jnp.bfloat16, "default")
