"""ICA losses on hand-made inputs, and the masks as pure functions of their keys."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from alignrec_jax.losses import ica
from alignrec_jax.models import mmenc

# the tokenizer's ids for a vocabulary of 20 (data/content.py): <s> 0, <pad> 1, </s> 2, <unk> 3, pieces, <mask> 19
MASK_ID = 19
SPECIAL_IDS = (0, 1, 2, 3, MASK_ID)

def test_mlm_loss_counts_only_masked_positions():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  targets = jnp.asarray([[0, 1, 2]])
  mask = jnp.asarray([[True, False, True]])
  loss, acc = ica.mlm_loss(logits, targets, mask)
  np.testing.assert_allclose(loss, (-math.log(0.5) - math.log(1 / 3)) / 2, rtol=1e-5)
  assert 0.0 <= float(acc) <= 1.0 and float(acc) >= 0.5  # position 0 is right, position 2 is a tie
  loss, _ = ica.mlm_loss(logits, targets, jnp.zeros_like(mask))
  assert float(loss) == 0.0


def test_mim_loss_and_normalised_targets():
  pred = jnp.asarray([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])
  target = jnp.asarray([[[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
  mask = jnp.asarray([[True, True, False]])
  # patch 0: (1 + 0) / 2 = 0.5; patch 1: (0 + 4) / 2 = 2; patch 2 ignored
  np.testing.assert_allclose(ica.mim_loss(pred, target, mask), 1.25, rtol=1e-6)
  images = np.zeros((1, 4, 4, 3), np.uint8)
  images[0, :2, :2] = 10
  images[0, :2, :2, 0] = 200      # top-left patch has contrast
  images[0, 2:, 2:] = 255         # bottom-right patch is flat
  patches = ica.patchify(jnp.asarray(images), 2)
  assert patches.shape == (1, 4, 12)
  np.testing.assert_array_equal(patches[0, 3], np.full(12, 255))
  np.testing.assert_array_equal(patches[0, 0].reshape(2, 2, 3), images[0, :2, :2])
  t = ica.normalized_pixel_targets(jnp.asarray(images), 2)
  np.testing.assert_allclose(t[0, 0].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(t[0, 0].std(), 1.0, atol=1e-3)
  np.testing.assert_allclose(t[0, 3], 0.0, atol=1e-6)  # flat patch: no NaN


def test_itc_loss_prefers_matching_pairs():
  emb = jnp.eye(4)
  good = ica.itc_loss(emb, emb, 0.1)
  bad = ica.itc_loss(emb, emb[::-1], 0.1)
  assert float(good) < 0.01 < float(bad)


def test_block_mask_is_exact_blocky_and_keyed():
  m = ica.block_mask(jax.random.key(0), 8, 26)
  assert m.shape == (64,) and int(m.sum()) == 26
  np.testing.assert_array_equal(m, ica.block_mask(jax.random.key(0), 8, 26))
  assert not np.array_equal(m, ica.block_mask(jax.random.key(1), 8, 26))
  # blocks: most masked patches have a masked 4-neighbour (random scattering would give far fewer)
  grid = np.asarray(m).reshape(8, 8)
  padded = np.pad(grid, 1)
  neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
  assert (grid & neighbours).sum() >= 0.8 * grid.sum()
  batch = ica.image_masks(jax.random.key(3), 5, 4, 0.4)
  assert batch.shape == (5, 16) and (np.asarray(batch.sum(1)) == 6).all()
  assert (np.asarray(ica.image_masks(jax.random.key(3), 2, 2, 0.01).sum(1)) == 1).all()


def test_text_masks_skip_specials_and_mask_at_least_one():
  # fairseq ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 19; pieces 4..18
  tokens = jnp.asarray([[0, 7, 8, 9, 10, 2, 1, 1], [0, 7, 3, 2, 1, 1, 1, 1], [0, 3, 2, 1, 1, 1, 1, 1]])
  m = np.asarray(ica.text_masks(jax.random.key(0), tokens, 0.5, SPECIAL_IDS))
  assert m[0].sum() == 2 and m[0, 1:5].sum() == 2
  assert m[1].sum() == 1 and m[1, 1]  # <unk> is no piece to predict
  assert m[2].sum() == 0  # nothing to mask in a text without pieces
  assert not (m & np.isin(np.asarray(tokens), SPECIAL_IDS)).any()
  np.testing.assert_array_equal(m, ica.text_masks(jax.random.key(0), tokens, 0.5, SPECIAL_IDS))
  # the old word-level ids (specials 0/1/2 only) would mask the <unk> of the last text
  assert np.asarray(ica.text_masks(jax.random.key(0), tokens, 0.5, (0, 1, 2)))[2, 1]


def test_ica_loss_runs_and_has_gradients():
  model = mmenc.MMEnc(vocab_size=20, pad_id=1, image_size=8, patch_size=4, max_text_len=6, layers=2, hidden=16,
                      heads=2, mlp=32, vl_ffn_layers=1)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)),
           "tokens": jnp.asarray([[0, 5, 6, 7, 2, 1]] * 4, jnp.int32)}
  params = model.init(jax.random.key(0), mmenc.normalize_images(batch["image"]), batch["tokens"])["params"]
  fn = lambda p: ica.ica_loss(model, p, batch, jax.random.key(1), text_mask_ratio=0.5, image_mask_ratio=0.5,
                              itc_weight=0.5, mask_id=MASK_ID, special_ids=SPECIAL_IDS)
  (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params)
  np.testing.assert_allclose(loss, metrics["mlm"] + metrics["mim"] + 0.5 * metrics["itc"], rtol=1e-5)
  assert float(metrics["mlm"]) > 0 and float(metrics["mim"]) > 0 and float(metrics["itc"]) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  encoder = grads["beit3"]["encoder"]
  for expert in ("A", "B", "VL"):  # A, B via ITC's single-modality passes, VL via the joint masked input
    assert float(jnp.abs(encoder["layers_1"]["ffn"][expert]["fc1"]["kernel"]).sum()) > 0


def test_bow_loss_is_the_cross_entropy_against_the_word_distribution():
  vocab = 6
  logits = jnp.log(jnp.asarray([[0.05, 0.05, 0.05, 0.05, 0.6, 0.2],
                                [1 / 6] * 6,
                                [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]))
  # specials 0..3 never count; text 0 holds piece 4 twice and piece 5 once; text 1 piece 5 and <unk>, text 2 no piece
  tokens = jnp.asarray([[0, 4, 5, 4, 2, 1], [0, 5, 3, 2, 1, 1], [0, 3, 2, 1, 1, 1]])
  loss = ica.bow_loss(logits, tokens, special_ids=(0, 1, 2, 3))
  text0 = -(2 * math.log(0.6) + math.log(0.2)) / 3
  text1 = math.log(vocab)
  np.testing.assert_allclose(loss, (text0 + text1) / 2, rtol=1e-5)  # the empty text is left out, not counted as 0


def test_cls_bow_term_trains_the_visual_cls_and_leaves_the_encoder_init_alone():
  kw = dict(vocab_size=20, pad_id=1, image_size=8, patch_size=4, max_text_len=6, layers=2, hidden=16, heads=2,
            mlp=32)
  model, with_head = mmenc.MMEnc(**kw), mmenc.MMEnc(**kw, cls_bow_head=True)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)),
           "tokens": jnp.asarray([[0, 5, 6, 7, 2, 1], [0, 8, 9, 2, 1, 1]] * 2, jnp.int32)}
  x = mmenc.normalize_images(batch["image"])
  plain = model.init(jax.random.key(0), x, batch["tokens"])["params"]
  params = with_head.init(jax.random.key(0), x, batch["tokens"])["params"]
  assert set(params) - set(plain) == {"bow_dense", "bow_ln", "bow_bias"}
  # the random-init baseline of bench/stage1_quality.py must not depend on whether the head exists
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), plain,
                                          {k: params[k] for k in plain})))
  fn = lambda p, w: ica.ica_loss(with_head, p, batch, jax.random.key(1), text_mask_ratio=0.5, image_mask_ratio=0.5,
                                 cls_bow_weight=w, mask_id=MASK_ID, special_ids=SPECIAL_IDS)
  (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params, 2.0)
  np.testing.assert_allclose(loss, metrics["mlm"] + metrics["mim"] + 2.0 * metrics["bow"], rtol=1e-5)
  assert float(metrics["bow"]) > 0
  assert float(jnp.abs(grads["bow_dense"]["kernel"]).sum()) > 0
  # weight 0: the head gets no gradient and the metric reads 0
  (_, metrics0), grads0 = jax.value_and_grad(fn, has_aux=True)(params, 0.0)
  assert float(metrics0["bow"]) == 0.0 and float(jnp.abs(grads0["bow_dense"]["kernel"]).sum()) == 0.0


def test_max_text_masked_bounds_the_count_text_masks_draws_for_any_text():
  for length in range(0, 41):
    n_words = jnp.arange(length + 1)
    for ratio in (0.0, 0.15, 0.3, 0.5, 0.7, 1.0):
      counts = np.asarray(ica._n_text_masked(jnp, n_words, ratio))  # pylint: disable=protected-access
      assert ica.max_text_masked(length, ratio) == counts.max() <= length
  assert ica.max_text_masked(128, 0.5) == 64 and ica.max_text_masked(33, 0.5) == 16  # half to even, as jnp.round


def test_masked_positions_lists_each_rows_masked_positions_then_padding():
  mask = jnp.asarray([[False, True, False, True, True], [False, False, False, False, False],
                      [True, False, False, False, False]])
  positions, counted = ica.masked_positions(mask, 3)
  np.testing.assert_array_equal(positions, [[1, 3, 4], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(counted, [[True, True, True], [False, False, False], [True, False, False]])


def _full_head_loss(model, params, batch, key, text_mask_ratio, image_mask_ratio):
  """The ICA loss (MLM + MIM, no dropout) with the MLM head over every text position: the reference."""
  k_img, k_txt, _ = jax.random.split(key, 3)
  images, tokens = batch["image"], batch["tokens"]
  patch_mask = ica.image_masks(k_img, tokens.shape[0], model.grid, image_mask_ratio)
  word_mask = ica.text_masks(k_txt, tokens, text_mask_ratio, SPECIAL_IDS)
  out = model.apply({"params": params}, mmenc.normalize_images(images), jnp.where(word_mask, MASK_ID, tokens),
                    patch_mask)
  assert out["mlm_logits"].shape[:2] == tokens.shape
  mlm, acc = ica.mlm_loss(out["mlm_logits"], tokens, word_mask)
  mim = ica.mim_loss(out["mim_pred"], ica.normalized_pixel_targets(images, model.patch_size), patch_mask)
  return mlm + mim, {"mlm": mlm, "mlm_acc": acc, "mim": mim}


def test_the_mlm_head_on_the_masked_positions_only_gives_the_full_heads_loss_and_gradients():
  model = mmenc.MMEnc(vocab_size=40, pad_id=1, image_size=8, patch_size=4, max_text_len=8, layers=2, hidden=16,
                      heads=2, mlp=32)
  rng = np.random.default_rng(0)
  tokens = np.full((4, 8), 1, np.int32)
  for i, n in enumerate((6, 3, 1, 0)):  # texts of 6, 3, 1 and no pieces between <s> and </s>
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = 0, rng.integers(4, 19, n), 2
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)), "tokens": jnp.asarray(tokens)}
  params = model.init(jax.random.key(0), mmenc.normalize_images(batch["image"]), batch["tokens"])["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # not at init
  for ratio in (0.5, 1.0):
    gathered = lambda p: ica.ica_loss(model, p, batch, jax.random.key(1), text_mask_ratio=ratio, image_mask_ratio=0.5,
                                      mask_id=MASK_ID, special_ids=SPECIAL_IDS, deterministic=True)
    (loss, metrics), grads = jax.value_and_grad(gathered, has_aux=True)(params)
    (want, want_metrics), want_grads = jax.value_and_grad(
        lambda p: _full_head_loss(model, p, batch, jax.random.key(1), ratio, 0.5), has_aux=True)(params)
    assert float(metrics["mlm"]) > 0
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    for k in want_metrics:
      np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads, want_grads)
    assert float(jnp.abs(grads["mlm_bias"]).sum()) > 0
