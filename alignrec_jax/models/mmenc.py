"""MMEnc: a BEiT-3-style Multiway Transformer over an item's image and text (stage 1, docs/method.md §2).

Input sequence of the joint image-text encoder, `T = 1 + P + L` positions:
  [visual CLS, P image patches, L text tokens (the text starts with its own [CLS] token id)]
Image positions get a patch embedding (a strided convolution) and the image's learned position embeddings, text
positions a token embedding and the text's learned position embeddings. Every block is pre-LayerNorm with one
multi-head self-attention shared by both modalities and a modality expert FFN: the vision FFN on image positions, the
language FFN on text positions; in the top `n_vl_layers` blocks of the joint input all positions go through a shared
vision-language FFN, as BEiT-3 does. With `joint=False` the two modalities are encoded separately (attention cannot
cross modalities and the modality experts are used in every block), the BEiT-3 way of encoding a single modality, used
by the optional image-text contrastive term.

Masking is an input: `patch_mask` replaces masked patches by a learned [MASK] patch embedding (masked image
modelling); masked text arrives as [MASK] token ids (masked language modelling). Dropout keys come through the
"dropout" RNG collection. The item feature is the final hidden state at the visual [CLS] position.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# layers, hidden, heads, mlp, top layers with the vision-language FFN
SIZES = {
    "tiny": dict(layers=4, hidden=128, heads=4, mlp=512, n_vl_layers=1),
    "small": dict(layers=6, hidden=384, heads=6, mlp=1536, n_vl_layers=2),
    "base": dict(layers=12, hidden=768, heads=12, mlp=3072, n_vl_layers=3),
}

# ImageNet statistics: uint8 images are normalised with them before the patch embedding
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 normalised with the ImageNet mean/std."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)


class Mlp(nn.Module):
  hidden: int
  mlp: int
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.Dense(self.mlp, kernel_init=nn.initializers.xavier_uniform())(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(self.hidden, kernel_init=nn.initializers.xavier_uniform())(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class MultiwayBlock(nn.Module):
  """Pre-LN block: shared self-attention, then a modality expert FFN per position group."""
  hidden: int
  heads: int
  mlp: int
  dropout: float
  use_vl_ffn: bool  # this block is one of the top n_vl_layers

  @nn.compact
  def __call__(self, x, mask, n_image: int, joint: bool, deterministic: bool):
    """x: [B, T, d]; mask: [B, 1, T, T] bool attention mask; the first `n_image` positions are the image's."""
    h = nn.LayerNorm(name="ln_attn")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                        kernel_init=nn.initializers.xavier_uniform(), name="attn")(
                                            h, h, mask=mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    # every expert owns its LayerNorm, as in BEiT-3's MultiwayNetwork
    v_ffn = lambda z, det: Mlp(self.hidden, self.mlp, self.dropout, name="v_ffn")(nn.LayerNorm(name="ln_v")(z), det)
    l_ffn = lambda z, det: Mlp(self.hidden, self.mlp, self.dropout, name="l_ffn")(nn.LayerNorm(name="ln_l")(z), det)
    vl_ffn = lambda z, det: Mlp(self.hidden, self.mlp, self.dropout, name="vl_ffn")(nn.LayerNorm(name="ln_vl")(z),
                                                                                     det)
    if self.use_vl_ffn and joint:
      h = vl_ffn(x, deterministic)
      if self.is_initializing():  # one parameter tree serves both modes: create the unused experts too
        v_ffn(x[:, :1], True), l_ffn(x[:, :1], True)
    else:
      h = jnp.concatenate([v_ffn(x[:, :n_image], deterministic), l_ffn(x[:, n_image:], deterministic)], axis=1)
      if self.use_vl_ffn and self.is_initializing():
        vl_ffn(x[:, :1], True)
    return x + h


class MMEnc(nn.Module):
  """The multiway encoder with its pre-training heads.

  Attributes: sizes as in `SIZES`; `vocab_size` of the tokenizer; `tie_mlm_head`: MLM logits use the token
  embedding matrix (plus a bias) instead of a separate projection; `cls_bow_head`: a bag-of-words head on the
  visual [CLS] state (one dense layer, logits from the token embedding matrix), the decoder of the [CLS]
  bottleneck term of the ICA loss (losses/ica.py).
  """
  vocab_size: int
  image_size: int = 32
  patch_size: int = 8
  max_text_len: int = 32
  layers: int = 4
  hidden: int = 128
  heads: int = 4
  mlp: int = 512
  n_vl_layers: int = 1
  dropout: float = 0.0
  tie_mlm_head: bool = True
  cls_bow_head: bool = False
  pad_id: int = 0

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def n_patches(self) -> int:
    return self.grid * self.grid

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"config.pretrain.image_size={self.image_size} must be a multiple of patch_size="
                       f"{self.patch_size}")
    if not 0 <= self.n_vl_layers <= self.layers:
      raise ValueError(f"n_vl_layers={self.n_vl_layers} must lie in [0, layers={self.layers}]")
    init = nn.initializers.truncated_normal(0.02)
    self.patch_embed = nn.Conv(self.hidden, (self.patch_size, self.patch_size),
                               strides=(self.patch_size, self.patch_size), padding="VALID", name="patch_embed")
    self.token_embed = nn.Embed(self.vocab_size, self.hidden, embedding_init=init, name="token_embed")
    self.image_cls = self.param("image_cls", init, (1, 1, self.hidden))
    self.patch_mask_token = self.param("patch_mask_token", init, (1, 1, self.hidden))
    self.image_pos = self.param("image_pos", init, (1, 1 + self.n_patches, self.hidden))
    self.text_pos = self.param("text_pos", init, (1, self.max_text_len, self.hidden))
    self.blocks = [
        MultiwayBlock(self.hidden, self.heads, self.mlp, self.dropout,
                      use_vl_ffn=i >= self.layers - self.n_vl_layers, name=f"block_{i}")
        for i in range(self.layers)
    ]
    self.final_ln = nn.LayerNorm(name="final_ln")
    self.embed_dropout = nn.Dropout(self.dropout)
    self.mlm_ln = nn.LayerNorm(name="mlm_ln")
    if self.tie_mlm_head:
      self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
    else:
      self.mlm_proj = nn.Dense(self.vocab_size, name="mlm_proj")
    self.mim_ln = nn.LayerNorm(name="mim_ln")
    self.mim_proj = nn.Dense(self.patch_size * self.patch_size * 3, name="mim_proj")
    if self.cls_bow_head:  # created last: flax derives each parameter's init key from its name, so the encoder's
      # initialisation (and the random-init baseline) is the same with or without this head
      self.bow_dense = nn.Dense(self.hidden, name="bow_dense")
      self.bow_ln = nn.LayerNorm(name="bow_ln")
      self.bow_bias = self.param("bow_bias", nn.initializers.zeros, (self.vocab_size,))

  def encode(self, images: jax.Array, tokens: jax.Array, patch_mask: Optional[jax.Array] = None,
             joint: bool = True, deterministic: bool = True) -> jax.Array:
    """Final hidden states `[B, 1 + P + L, d]`.

    Args:
      images: `[B, H, W, 3]` float32, normalised (see `normalize_images`).
      tokens: `[B, L]` int32 token ids, [PAD] = `pad_id` (padding is never attended to).
      patch_mask: `[B, P]` bool, True = replace that patch by the [MASK] patch embedding.
      joint: one joint image-text sequence (True) or the two modalities encoded separately (False).
    """
    b, length = tokens.shape
    if length != self.max_text_len:
      raise ValueError(f"tokens have length {length}, the encoder was built for max_text_len={self.max_text_len}")
    patches = self.patch_embed(images).reshape(b, self.n_patches, self.hidden)
    if patch_mask is not None:
      patches = jnp.where(patch_mask[..., None], self.patch_mask_token.astype(patches.dtype), patches)
    image = jnp.concatenate([jnp.broadcast_to(self.image_cls, (b, 1, self.hidden)), patches], axis=1)
    image = image + self.image_pos
    text = self.token_embed(tokens) + self.text_pos
    x = self.embed_dropout(jnp.concatenate([image, text], axis=1), deterministic=deterministic)

    n_image = 1 + self.n_patches
    keys = jnp.concatenate([jnp.ones((b, n_image), bool), tokens != self.pad_id], axis=1)  # [B, T]
    mask = jnp.broadcast_to(keys[:, None, None, :], (b, 1, x.shape[1], x.shape[1]))
    if not joint:
      modality = jnp.arange(x.shape[1]) >= n_image
      mask = mask & (modality[:, None] == modality[None, :])[None, None]
    for block in self.blocks:
      x = block(x, mask, n_image, joint, deterministic)
    return self.final_ln(x)

  def __call__(self, images, tokens, patch_mask=None, joint: bool = True, deterministic: bool = True) -> dict:
    """Features and pre-training head outputs.

    Returns:
      {"cls": [B, d] visual-[CLS] feature, "text_cls": [B, d] hidden state at the text's first position,
       "mlm_logits": [B, L, vocab], "mim_pred": [B, P, patch_size**2 * 3]}, plus "bow_logits": [B, vocab] (the
      item's words predicted from the visual [CLS] state alone) when the model has `cls_bow_head`.
    """
    h = self.encode(images, tokens, patch_mask, joint, deterministic)
    n_image = 1 + self.n_patches
    text_h = self.mlm_ln(h[:, n_image:])
    if self.tie_mlm_head:
      logits = self.token_embed.attend(text_h) + self.mlm_bias
    else:
      logits = self.mlm_proj(text_h)
    out = {"cls": h[:, 0], "text_cls": h[:, n_image], "mlm_logits": logits,
           "mim_pred": self.mim_proj(self.mim_ln(h[:, 1:n_image]))}
    if self.cls_bow_head:
      bow = self.bow_ln(nn.gelu(self.bow_dense(h[:, 0])))
      out["bow_logits"] = self.token_embed.attend(bow) + self.bow_bias
    return out

  def features(self, images, tokens, patch_mask=None) -> jax.Array:
    """The item feature: final visual-[CLS] state of the joint input, `[B, d]` (no dropout)."""
    return self.encode(images, tokens, patch_mask, joint=True, deterministic=True)[:, 0]


def make_mmenc(pretrain_config, vocab_size: int, pad_id: int = 0) -> MMEnc:
  """The encoder that `config.pretrain` describes (size preset + image/patch/text lengths)."""
  if pretrain_config.size not in SIZES:
    raise ValueError(f"config.pretrain.size={pretrain_config.size!r} is not one of {sorted(SIZES)}")
  return MMEnc(vocab_size=vocab_size, image_size=pretrain_config.image_size, patch_size=pretrain_config.patch_size,
               max_text_len=pretrain_config.max_text_len, dropout=pretrain_config.dropout,
               tie_mlm_head=pretrain_config.get("tie_mlm_head", True),
               cls_bow_head=pretrain_config.get("cls_bow_weight", 0.0) > 0, pad_id=pad_id,
               **SIZES[pretrain_config.size])
