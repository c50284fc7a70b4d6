"""ICA pre-training objective of stage 1 (docs/method.md §2): mask-then-predict on image-text pairs.

- MLM: cross-entropy of the original token at every masked text position (about 50% of an item's text tokens, at
  least one, as BEiT-3 does for image-text pairs). A "word" here is any text token that is not one of the
  tokenizer's special ids (`<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`): a sentencepiece piece.
- MIM: regression of the masked patches' targets (default: each patch's pixels normalised by the patch's own mean
  and variance, as MAE/SimMIM) on BEiT-style block-wise masked patches (about 40%). The target is pluggable: any
  `(images [B, H, W, 3], patch_size) -> [B, P, k]` function, with a matching head width.
- ITC (optional, weight 0 by default; this project's extension, not in the paper): symmetric InfoNCE between the
  separately encoded image and text [CLS] states (BEiT-3's single-modality encodings: image alone, text alone).
- [CLS] bag of words (optional, weight 0 by default; this project's extension, not in the paper): from the visual
  [CLS] state of the same masked input, predict every word of the item's text (cross-entropy against the text's word
  distribution). MLM and MIM are solved at the token and patch positions and leave the [CLS] state, which is the item
  feature, nearly untrained; this term makes it a bottleneck that must summarise the whole item (the
  RetroMAE/Condenser idea, with a bag-of-words decoder as DupMAE uses), still mask-then-predict: half of the words it
  must name are masked at the input.

Everything here is a pure function; masks are drawn from explicit RNG keys.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignrec_jax.data.content import normalize_images
from alignrec_jax.losses import cca
from alignrec_jax.models import mmenc


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, P, patch_size * patch_size * C]`, patches in row-major order (as the patch embedding)."""
  b, h, w, c = images.shape
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch_size * patch_size * c)


def normalized_pixel_targets(images: jax.Array, patch_size: int) -> jax.Array:
  """MIM target: each patch's pixels (uint8 or float) standardised by the patch's mean/variance, `[B, P, p*p*C]`."""
  patches = patchify(images.astype(jnp.float32) / 255.0, patch_size)
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + 1e-6)


def raw_pixel_targets(images: jax.Array, patch_size: int) -> jax.Array:
  """MIM target without per-patch normalisation: pixels in [0, 1], `[B, P, p*p*C]`."""
  return patchify(images.astype(jnp.float32) / 255.0, patch_size)


MIM_TARGETS: dict[str, Callable] = {"pixels": normalized_pixel_targets, "raw_pixels": raw_pixel_targets}


def mlm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy over masked positions.

  Args: logits `[B, L, V]`; targets `[B, L]` int (original ids); mask `[B, L]` bool (True = predicted).
  Returns: (loss, accuracy) scalars; both 0 when nothing is masked.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weight = mask.astype(jnp.float32)
  n = jnp.maximum(weight.sum(), 1.0)
  acc = ((logits.argmax(-1) == targets) * weight).sum() / n
  return (ce * weight).sum() / n, acc


def mim_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error per masked patch (mean over the patch's values, then over masked patches).

  Args: pred, target `[B, P, k]`; mask `[B, P]` bool. Returns a scalar (0 when nothing is masked).
  """
  per_patch = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)
  weight = mask.astype(jnp.float32)
  return (per_patch * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def itc_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE between `[B, d]` image and text embeddings (matching rows are the positives)."""
  a, b = cca.normalize(image_emb, eps=1e-6), cca.normalize(text_emb, eps=1e-6)
  logits = a @ b.T / temperature
  labels = jnp.arange(a.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def word_positions(tokens: jax.Array, special_ids) -> jax.Array:
  """`[B, L]` bool: True where `tokens` holds a piece of the text, i.e. none of `special_ids` (the tokenizer's
  `special_ids`: `<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`)."""
  words = jnp.ones(tokens.shape, bool)
  for sid in special_ids:
    words &= tokens != sid
  return words


def bow_loss(logits: jax.Array, tokens: jax.Array, special_ids) -> jax.Array:
  """Cross-entropy of `[B, V]` logits against each text's word distribution (its non-special ids of `[B, L]`
  tokens, counted), averaged over the texts that have words."""
  words = word_positions(tokens, special_ids)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_p, tokens, axis=-1)  # [B, L]: log p of the word at each position
  n_words = words.sum(-1)
  per_text = -(picked * words).sum(-1) / jnp.maximum(n_words, 1)
  has_words = (n_words > 0).astype(jnp.float32)
  return (per_text * has_words).sum() / jnp.maximum(has_words.sum(), 1.0)


def _top_n_mask(key: jax.Array, eligible: jax.Array, prior: jax.Array, n: jax.Array) -> jax.Array:
  """Marks `n` eligible positions: first those with `prior`, then uniformly random others."""
  score = jax.random.uniform(key, eligible.shape) + 2.0 * prior
  score = jnp.where(eligible, score, -1.0)
  rank = jnp.argsort(jnp.argsort(-score))
  return (rank < n) & eligible


@functools.partial(jax.jit, static_argnames=("grid", "n_mask", "min_block", "max_tries"))
def block_mask(key: jax.Array, grid: int, n_mask: int, min_block: int = 4, max_tries: int = 0) -> jax.Array:
  """BEiT's block-wise masking of a `grid x grid` patch grid; `[grid * grid]` bool with exactly `n_mask` True.

  Rectangular blocks (area >= `min_block` patches, aspect ratio log-uniform in [0.3, 1/0.3]) are placed at random
  while the masked count stays within `n_mask`; the remainder, if any, is filled with random single patches so that
  every image has the same number of masked patches.
  """
  n_mask = min(n_mask, grid * grid)
  tries = max_tries or 10 * grid * grid
  rows = jnp.arange(grid)[:, None]
  cols = jnp.arange(grid)[None, :]
  log_ratio = math.log(0.3), math.log(1 / 0.3)

  def attempt(i, mask):
    k_area, k_ratio, k_top, k_left = jax.random.split(jax.random.fold_in(key, i), 4)
    remaining = n_mask - mask.sum()
    area = jax.random.uniform(k_area, minval=min_block, maxval=jnp.maximum(remaining, min_block) + 1e-3)
    ratio = jnp.exp(jax.random.uniform(k_ratio, minval=log_ratio[0], maxval=log_ratio[1]))
    h = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32).clip(1, grid)
    w = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32).clip(1, grid)
    top = jax.random.randint(k_top, (), 0, grid - h + 1)
    left = jax.random.randint(k_left, (), 0, grid - w + 1)
    block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    new = mask | block
    return jnp.where(new.sum() <= n_mask, new, mask)

  mask = jax.lax.fori_loop(0, tries, attempt, jnp.zeros((grid, grid), bool)).reshape(-1)
  fill_key = jax.random.fold_in(key, tries)
  return _top_n_mask(fill_key, jnp.ones_like(mask), mask, n_mask)


def image_masks(key: jax.Array, batch: int, grid: int, ratio: float) -> jax.Array:
  """`[batch, grid * grid]` bool block-wise masks, `round(ratio * grid**2)` patches each (at least one if ratio>0)."""
  n_mask = int(round(ratio * grid * grid))
  if ratio > 0:
    n_mask = max(n_mask, 1)
  return jax.vmap(lambda k: block_mask(k, grid, n_mask))(jax.random.split(key, batch))


def _n_text_masked(xnp, n_words, ratio: float):
  """How many of `n_words` words `text_masks` masks: round(ratio * n_words) in float32, at least one, none of none.
  `xnp` is jnp (in the step) or np (for the static bound): the same float32 arithmetic either way."""
  n = xnp.round(xnp.float32(ratio) * xnp.asarray(n_words).astype(xnp.float32))
  return xnp.where(xnp.asarray(n_words) > 0, xnp.maximum(n, 1), 0).astype(xnp.int32)


def text_masks(key: jax.Array, tokens: jax.Array, ratio: float, special_ids) -> jax.Array:
  """`[B, L]` bool: `round(ratio * n_words)` (at least one) random word positions of each text.

  Positions holding any of `special_ids` (`word_positions`) are never masked.
  """
  eligible = word_positions(tokens, special_ids)
  n = _n_text_masked(jnp, eligible.sum(axis=-1), ratio)
  keys = jax.random.split(key, tokens.shape[0])
  return jax.vmap(_top_n_mask)(keys, eligible, jnp.zeros(tokens.shape, bool), n)


def max_text_masked(length: int, ratio: float) -> int:
  """The most positions `text_masks` can mask in one text of `length` tokens, whatever the text: its count at
  n_words = length, since the count never falls as n_words grows and never exceeds n_words (ratio <= 1). A static
  size per item rather than one for the whole batch: a batch's total is not bounded by less than B times this."""
  return int(min(length, _n_text_masked(np, length, ratio)))


def masked_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The True positions of each row of a `[B, L]` mask, in order, padded to `size` (at least every row's count):
  (`[B, size]` int32 positions, padding slots at 0; `[B, size]` bool, False at the padding slots)."""
  positions = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(mask).astype(jnp.int32)
  return positions, jnp.arange(size)[None, :] < mask.sum(axis=-1, keepdims=True)


def ica_loss(model, params, batch: dict, key: jax.Array, *, text_mask_ratio: float, image_mask_ratio: float,
             mlm_weight: float = 1.0, mim_weight: float = 1.0, itc_weight: float = 0.0,
             itc_temperature: float = 0.07, cls_bow_weight: float = 0.0,
             mim_target: Callable = normalized_pixel_targets, mask_id: int, special_ids,
             deterministic: bool = False) -> tuple[jax.Array, dict]:
  """The ICA objective of one batch.

  Args:
    model: an `MMEnc`; params: its parameters.
    batch: {"image": uint8 [B, H, W, 3], "tokens": int32 [B, L]}.
    key: RNG key for the masks and dropout.
    mask_id, special_ids: the tokenizer's `mask_id` and `special_ids` (never masked, never a bag-of-words target).
  Returns:
    (loss, metrics) with metrics {"loss", "mlm", "mim", "mlm_acc", "itc", "bow"} scalars.
  """
  k_img, k_txt, k_drop = jax.random.split(key, 3)
  images, tokens = batch["image"], batch["tokens"]
  b = tokens.shape[0]
  patch_mask = image_masks(k_img, b, model.grid, image_mask_ratio)
  word_mask = text_masks(k_txt, tokens, text_mask_ratio, special_ids)
  masked_tokens = jnp.where(word_mask, mask_id, tokens)
  # the MLM head runs on the masked positions only, gathered to a static size (fixed shapes under jit); the
  # padding slots carry weight 0
  positions, counted = masked_positions(word_mask, max_text_masked(tokens.shape[1], text_mask_ratio))
  x = normalize_images(images)
  out = model.apply({"params": params}, x, masked_tokens, patch_mask, joint=True, deterministic=deterministic,
                    rngs={"dropout": k_drop}, mlm_positions=positions)
  mlm, acc = mlm_loss(out["mlm_logits"], jnp.take_along_axis(tokens, positions, axis=1), counted)
  mim = mim_loss(out["mim_pred"], mim_target(images, model.patch_size), patch_mask)
  loss = mlm_weight * mlm + mim_weight * mim
  bow = jnp.zeros(())
  if cls_bow_weight:
    bow = bow_loss(out["bow_logits"], tokens, special_ids)
    loss = loss + cls_bow_weight * bow
  itc = jnp.zeros(())
  if itc_weight:
    sep = model.apply({"params": params}, x, tokens, None, joint=False, deterministic=deterministic,
                      rngs={"dropout": jax.random.fold_in(k_drop, 1)})
    with mmenc.matmul_precision(model.matmul_precision):  # the model's precision for its similarity product too
      itc = itc_loss(sep["cls"], sep["text_cls"], itc_temperature)
    loss = loss + itc_weight * itc
  return loss, {"loss": loss, "mlm": mlm, "mim": mim, "mlm_acc": acc, "itc": itc, "bow": bow}
