"""MMEnc: BEiT-3 (torchscale's `BEiT3`) over an item's image and text, with the stage-1 pre-training heads
(stage 1, docs/method.md §2).

`BEiT3` computes exactly what torchscale's `torchscale.model.BEiT3.BEiT3` computes with the configuration unilm's
beit3 uses (`EncoderConfig(multiway=True, subln=True, normalize_before=True, layernorm_embedding=False,
normalize_output=True, no_output_layer=True)`), and its parameter tree has the same names, so that a released
checkpoint loads key for key (alignrec_jax/convert_beit3.py):

  text_embed                     token embedding [vocab, d]
  vision_embed/proj              patch embedding (a strided convolution), vision_embed/cls_token, /mask_token
  encoder/embed_positions/A, /B  position tables of the vision and the text part. As in fairseq, position k of a
                                 part reads row k + 2 of its table (rows 0 and 1 are never read); the vision part
                                 ([CLS] then the patches) has 1 + P + 2 rows, the text part max_text_len + 2
                                 (1,024 in the released models; the converter truncates it)
  encoder/layers_i               pre-LN blocks: self_attn_layer_norm, self_attn (q/k/v_proj, inner_attn_ln,
                                 out_proj), final_layer_norm, ffn (fc1, GELU, ffn_layernorm, fc2)
  encoder/layer_norm             the final LayerNorm

"Multiway": every LayerNorm and linear map of a block and the final LayerNorm exist twice, A for the vision
positions and B for the language positions. The sequence is [visual CLS, P patches, text tokens]; the first
1 + P positions go through the A copies and the rest through the B copies, while the attention is one softmax over
the whole sequence. An image alone uses only A, a text alone only B (the BEiT-3 way of encoding one modality).
Sub-LN (Magneto): a LayerNorm before the attention output projection and one between the GELU and the second FFN
matrix. LayerNorm epsilon 1e-5 and the exact (erf) GELU, as torch. Padded text positions are zeroed after the
embeddings and never attended to.

The released BEiT-3 models have no vision-language FFN; `vl_ffn_layers > 0` is an opt-in (not BEiT-3 as released)
that adds a third FFN expert `ffn/VL` to the top blocks, used by every position of a joint image-text input.

`MMEnc` adds what stage 1 trains (losses/ica.py): the MLM head (LayerNorm, then logits from the text embedding
matrix plus a bias), the MIM head (LayerNorm + linear map to the patch's pixel targets) and, optionally, the [CLS]
bag-of-words head (this project's extension). The item feature is the final hidden state at the visual [CLS]
position of the joint input. Masking is an input: `patch_mask` replaces masked patches by the mask token (torchscale's
`vision_masked_position`); masked text arrives as [MASK] token ids. Dropout keys come through the "dropout" RNG
collection; dropout sits where torchscale's `dropout` does (after the embeddings, the attention and the FFN).

Compute dtype (`dtype`, config.pretrain.compute_dtype): the linear maps, the patch convolution, the attention
products and the vocabulary projections take their inputs and the float32 parameters cast to `dtype` (bfloat16:
the accelerators' fast products); the LayerNorms, the softmax (from float32 scores), the residual stream, the
logits and the item feature stay float32, as torch's autocast does. float32 computes exactly what it did before.
"""

import contextlib
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignrec_jax.data.content import normalize_images  # noqa: F401  (mmenc.normalize_images: the input)
from alignrec_jax.errors import ConfigError

# layers, hidden, heads, FFN width. tiny = the shapes of the committed torchscale fixture (tests/fixtures); small =
# a CPU size with more capacity (configs/ml100k_posters.py); base and large = the released BEiT-3 models.
SIZES = {
    "tiny": dict(layers=2, hidden=64, heads=4, mlp=256),
    "small": dict(layers=4, hidden=128, heads=4, mlp=512),
    "base": dict(layers=12, hidden=768, heads=12, mlp=3072),
    "large": dict(layers=24, hidden=1024, heads=16, mlp=4096),
}

LN_EPS = 1e-5  # torch's LayerNorm default, which BEiT-3 uses (flax's default is 1e-6)
_init = nn.initializers.truncated_normal(0.02)

# config.pretrain.compute_dtype -> the dtype of the encoder's matrix products (parameters stay float32)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.pretrain.matmul_precision: what jax.default_matmul_precision takes for the model's float32 products
MATMUL_PRECISIONS = ("highest", "default")


def matmul_precision(precision: Optional[str]):
  """`jax.default_matmul_precision(precision)`, or no change for None (JAX's own default). A product takes the
  precision in force when it is traced and its gradient's products inherit it, so tracing the forward pass inside
  this context fixes the precision of the whole step."""
  return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def _layer_norm(name: str) -> nn.LayerNorm:
  # float32 statistics and output whatever the compute dtype: the residual stream and the heads' inputs stay float32
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)


def _dense(features: int, name: str, dtype: Any = jnp.float32) -> nn.Dense:
  return nn.Dense(features, kernel_init=_init, dtype=dtype, name=name)


def multiway(a, b, x: jax.Array, split: int, initializing: bool = False) -> jax.Array:
  """torchscale's MultiwayNetwork: `a` on the first `split` positions of `x` [B, T, ...], `b` on the rest."""
  t = x.shape[1]
  if initializing and split in (0, t):  # one parameter tree for every input kind: create both experts
    a(x[:, :1]), b(x[:, :1])
  if split >= t:
    return a(x)
  if split <= 0:
    return b(x)
  return jnp.concatenate([a(x[:, :split]), b(x[:, split:])], axis=1)


class MultiwayLayerNorm(nn.Module):
  """LayerNorm copies A (vision) and B (language)."""

  @nn.compact
  def __call__(self, x, split: int):
    return multiway(_layer_norm("A"), _layer_norm("B"), x, split, self.is_initializing())


class MultiwayDense(nn.Module):
  """Linear-map copies A (vision) and B (language)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, split: int):
    return multiway(_dense(self.features, "A", self.dtype), _dense(self.features, "B", self.dtype), x, split,
                    self.is_initializing())


class FeedForwardNetwork(nn.Module):
  """fc1 -> exact GELU -> sub-LN (ffn_layernorm) -> fc2 -> dropout."""
  hidden: int
  mlp: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = _dense(self.mlp, "fc1", self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    x = _layer_norm("ffn_layernorm")(x)
    x = _dense(self.hidden, "fc2", self.dtype)(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class MultiwayFFN(nn.Module):
  """FFN experts A (vision) and B (language); `VL` (opt-in, not in the released models) for joint inputs. Each maps
  back to the input's width."""
  mlp: int
  dropout: float
  vl_ffn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, split: int, deterministic: bool):
    make = lambda name: FeedForwardNetwork(x.shape[-1], self.mlp, self.dropout, self.dtype, name=name)
    a, b = make("A"), make("B")
    joint = 0 < split < x.shape[1]
    if self.vl_ffn:
      vl = make("VL")
      if self.is_initializing() and not joint:
        vl(x[:, :1], True)
      if joint:
        if self.is_initializing():
          a(x[:, :1], True), b(x[:, :1], True)
        return vl(x, deterministic)
    return multiway(lambda z: a(z, deterministic), lambda z: b(z, deterministic), x, split, self.is_initializing())


class MultiheadAttention(nn.Module):
  """Self-attention with multiway q/k/v/out projections, one softmax over the sequence, sub-LN before out_proj."""
  hidden: int
  heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, padding: jax.Array, split: int, deterministic: bool):
    """x: [B, T, d]; padding: [B, T] bool, True = a padded key (never attended to)."""
    b, t, d = x.shape
    head_dim = d // self.heads
    split_heads = lambda z: z.reshape(b, t, self.heads, head_dim)
    q = split_heads(MultiwayDense(d, self.dtype, name="q_proj")(x, split)) * head_dim ** -0.5
    k = split_heads(MultiwayDense(d, self.dtype, name="k_proj")(x, split))
    v = split_heads(MultiwayDense(d, self.dtype, name="v_proj")(x, split))
    # float32 scores (accumulated in float32 from bfloat16 q, k) for a float32 softmax
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(padding[:, None, None, :], jnp.finfo(logits.dtype).min, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    attn = MultiwayLayerNorm(name="inner_attn_ln")(attn, split)
    return MultiwayDense(d, self.dtype, name="out_proj")(attn, split)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + FFN(LN(x)), every LayerNorm and projection multiway."""
  hidden: int
  heads: int
  mlp: int
  dropout: float
  vl_ffn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, padding, split: int, deterministic: bool):
    h = MultiwayLayerNorm(name="self_attn_layer_norm")(x, split)
    h = MultiheadAttention(self.hidden, self.heads, self.dropout, self.dtype, name="self_attn")(h, padding, split,
                                                                                             deterministic)
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)  # float32 + compute dtype: float32
    h = MultiwayLayerNorm(name="final_layer_norm")(x, split)
    ffn = MultiwayFFN(self.mlp, self.dropout, self.vl_ffn, self.dtype, name="ffn")
    return x + ffn(h, split, deterministic)


class PositionTable(nn.Module):
  """A fairseq position table: position k reads row k + 2."""
  rows: int
  hidden: int

  @nn.compact
  def __call__(self, length: int):
    table = self.param("embedding", _init, (self.rows, self.hidden))
    if length + 2 > self.rows:
      raise ValueError(f"{length} positions need {length + 2} rows, the position table {self.name} has {self.rows}")
    return table[2:length + 2]


class MultiwayPositions(nn.Module):
  """torchscale's MutliwayEmbedding of the position tables: A numbers the vision part, B the text part."""
  rows_a: int
  rows_b: int
  hidden: int

  @nn.compact
  def __call__(self, length: int, split: int):
    """`[length, d]` position embeddings of a sequence whose first `split` positions are the vision part."""
    pos_a, pos_b = PositionTable(self.rows_a, self.hidden, name="A"), PositionTable(self.rows_b, self.hidden, name="B")
    if self.is_initializing():
      pos_a(1), pos_b(1)
    parts = ([pos_a(split)] if split > 0 else []) + ([pos_b(length - split)] if split < length else [])
    return jnp.concatenate(parts, axis=0)


class Encoder(nn.Module):
  """torchscale's Encoder with multiway position tables and a multiway final LayerNorm."""
  n_image_positions: int  # 1 + P
  max_text_len: int
  layers: int
  hidden: int
  heads: int
  mlp: int
  dropout: float
  vl_ffn_layers: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, padding, split: int, deterministic: bool):
    """x: [B, T, d] token embeddings (vision part first); padding [B, T] bool; split = number of vision positions."""
    t = x.shape[1]
    x = x + MultiwayPositions(self.n_image_positions + 2, self.max_text_len + 2, self.hidden,
                              name="embed_positions")(t, split)[None]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = x * (1.0 - padding[..., None].astype(x.dtype))
    for i in range(self.layers):
      x = EncoderLayer(self.hidden, self.heads, self.mlp, self.dropout, vl_ffn=i >= self.layers - self.vl_ffn_layers,
                       dtype=self.dtype, name=f"layers_{i}")(x, padding, split, deterministic)
    return MultiwayLayerNorm(name="layer_norm")(x, split)


class VisionEmbedding(nn.Module):
  """Patch embedding (strided convolution), the mask token for masked patches, the prepended [CLS] token."""
  patch_size: int
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, masked_position=None):
    b = images.shape[0]
    x = nn.Conv(self.hidden, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                padding="VALID", kernel_init=_init, dtype=self.dtype, name="proj")(images)
    x = x.reshape(b, -1, self.hidden)  # patches in row-major order, as torch's flatten(2)
    mask_token = self.param("mask_token", _init, (1, 1, self.hidden))
    cls_token = self.param("cls_token", _init, (1, 1, self.hidden))
    if masked_position is not None:
      w = masked_position[..., None].astype(x.dtype)
      x = x * (1 - w) + mask_token.astype(x.dtype) * w
    return jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, self.hidden)), x], axis=1)


class BEiT3(nn.Module):
  """torchscale's BEiT3: vision and/or text in, final hidden states `[B, T, d]` out."""
  vocab_size: int
  image_size: int
  patch_size: int
  max_text_len: int
  layers: int
  hidden: int
  heads: int
  mlp: int
  dropout: float = 0.0
  vl_ffn_layers: int = 0
  dtype: Any = jnp.float32  # of the matrix products; LayerNorms, softmax and the output are float32

  @property
  def n_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, text_tokens=None, images=None, text_padding=None, vision_masked_position=None,
               deterministic: bool = True) -> jax.Array:
    """text_tokens [B, L] int; images [B, H, W, 3] normalised; text_padding [B, L] bool (True = pad);
    vision_masked_position [B, P] bool (True = replaced by the mask token). Either input may be None."""
    if text_tokens is None and images is None:
      raise ValueError("BEiT3 needs an image, a text or both")
    text_embed = nn.Embed(self.vocab_size, self.hidden, embedding_init=_init, name="text_embed")
    vision_embed = VisionEmbedding(self.patch_size, self.hidden, self.dtype, name="vision_embed")
    parts, padding = [], []
    if images is not None:
      v = vision_embed(images, vision_masked_position)
      parts.append(v)
      padding.append(jnp.zeros(v.shape[:2], bool))
    elif self.is_initializing():
      vision_embed(jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32))
    if text_tokens is not None:
      parts.append(text_embed(text_tokens))
      padding.append(jnp.zeros(text_tokens.shape, bool) if text_padding is None else text_padding.astype(bool))
    elif self.is_initializing():
      text_embed(jnp.zeros((1, 1), jnp.int32))
    split = parts[0].shape[1] if images is not None else 0
    x = jnp.concatenate(parts, axis=1)
    encoder = Encoder(1 + self.n_patches, self.max_text_len, self.layers, self.hidden, self.heads, self.mlp,
                      self.dropout, self.vl_ffn_layers, self.dtype, name="encoder")
    return encoder(x, jnp.concatenate(padding, axis=1), split, deterministic)


class MMEnc(nn.Module):
  """BEiT-3 (`beit3`) with the stage-1 pre-training heads.

  Attributes: sizes as in `SIZES`; `vocab_size` and `pad_id` of the tokenizer (text positions holding `pad_id` are
  padding); `tie_mlm_head`: MLM logits use the text embedding matrix (plus a bias) instead of a separate
  projection; `cls_bow_head`: a bag-of-words head on the visual [CLS] state (one dense layer, logits from the text
  embedding matrix), the decoder of the [CLS] bottleneck term of the ICA loss (losses/ica.py; this project's
  extension, not in the paper); `dtype`: of the matrix products (config.pretrain.compute_dtype; parameters,
  LayerNorms, softmax and the outputs stay float32); `matmul_precision`: `jax.default_matmul_precision` over every
  method (config.pretrain.matmul_precision; None = JAX's default).
  """
  vocab_size: int
  pad_id: int
  image_size: int = 32
  patch_size: int = 8
  max_text_len: int = 32
  layers: int = 2
  hidden: int = 64
  heads: int = 4
  mlp: int = 256
  vl_ffn_layers: int = 0
  dropout: float = 0.0
  tie_mlm_head: bool = True
  cls_bow_head: bool = False
  dtype: Any = jnp.float32
  matmul_precision: Optional[str] = None

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def n_patches(self) -> int:
    return self.grid * self.grid

  def setup(self):
    if self.image_size % self.patch_size:
      raise ConfigError(f"config.pretrain.image_size={self.image_size} must be a multiple of patch_size="
                        f"{self.patch_size}")
    if not 0 <= self.vl_ffn_layers <= self.layers:
      raise ConfigError(f"config.pretrain.vl_ffn_layers={self.vl_ffn_layers} must lie in [0, layers={self.layers}]")
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
    self.beit3 = BEiT3(self.vocab_size, self.image_size, self.patch_size, self.max_text_len, self.layers,
                       self.hidden, self.heads, self.mlp, self.dropout, self.vl_ffn_layers, self.dtype,
                       name="beit3")
    self.mlm_ln = _layer_norm("mlm_ln")
    if self.tie_mlm_head:
      self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
    else:
      self.mlm_proj = nn.Dense(self.vocab_size, kernel_init=_init, dtype=self.dtype, name="mlm_proj",
                               dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32))
    self.mim_ln = _layer_norm("mim_ln")
    self.mim_proj = _dense(self.patch_size * self.patch_size * 3, "mim_proj", self.dtype)
    if self.cls_bow_head:  # created last: flax derives each parameter's init key from its name, so the encoder's
      # initialisation (and the random-init baseline) is the same with or without this head
      self.bow_dense = _dense(self.hidden, "bow_dense", self.dtype)
      self.bow_ln = _layer_norm("bow_ln")
      self.bow_bias = self.param("bow_bias", nn.initializers.zeros, (self.vocab_size,))

  def _check_tokens(self, tokens):
    if tokens.shape[1] > self.max_text_len:
      raise ValueError(f"tokens have length {tokens.shape[1]}, the encoder was built for max_text_len="
                       f"{self.max_text_len}")

  def encode(self, images: Optional[jax.Array], tokens: Optional[jax.Array], patch_mask: Optional[jax.Array] = None,
             deterministic: bool = True) -> jax.Array:
    """Final hidden states `[B, (1 + P if images) + (L if tokens), d]` of BEiT-3.

    Args:
      images: `[B, H, W, 3]` float32, normalised (see `normalize_images`), or None (text only).
      tokens: `[B, L]` int32 token ids, padding = `pad_id`, or None (image only).
      patch_mask: `[B, P]` bool, True = replace that patch by the mask token.
    """
    padding = None
    if tokens is not None:
      self._check_tokens(tokens)
      padding = tokens == self.pad_id
    with matmul_precision(self.matmul_precision):
      return self.beit3(tokens, images, padding, patch_mask, deterministic=deterministic)

  def _text_embedding(self) -> jax.Array:
    return self.beit3.variables["params"]["text_embed"]["embedding"]

  def _vocab_logits(self, h: jax.Array) -> jax.Array:
    """`h @ text_embedding.T` in the compute dtype, accumulated into float32 logits."""
    return jnp.matmul(h.astype(self.dtype), self._text_embedding().astype(self.dtype).T,
                      preferred_element_type=jnp.float32)

  def _mlm_logits(self, text_h):
    text_h = self.mlm_ln(text_h)
    if self.tie_mlm_head:
      return self._vocab_logits(text_h) + self.mlm_bias
    return self.mlm_proj(text_h)

  def __call__(self, images, tokens, patch_mask=None, joint: bool = True, deterministic: bool = True,
               mlm_positions: Optional[jax.Array] = None) -> dict:
    """Features and pre-training head outputs.

    `joint=True`: one image-text sequence. `joint=False`: the image alone and the text alone (BEiT-3's
    single-modality encoding, vision experts only / language experts only), used by the optional ITC term.
    `mlm_positions`: `[B, K]` int text positions; the MLM head then runs on those positions only (the vocabulary
    projection is the largest product of the step, and the loss reads only the masked positions).
    Returns:
      {"cls": [B, d] visual-[CLS] state, "text_cls": [B, d] hidden state at the text's first position,
       "mlm_logits": [B, L, vocab] ([B, K, vocab] at `mlm_positions` when given), "mim_pred": [B, P,
       patch_size**2 * 3]}, plus "bow_logits": [B, vocab] (the item's words predicted from the visual [CLS] state
      alone) when the model has `cls_bow_head`. Logits are float32.
    """
    n_image = 1 + self.n_patches
    if joint:
      h = self.encode(images, tokens, patch_mask, deterministic)
      image_h, text_h = h[:, :n_image], h[:, n_image:]
    else:
      image_h = self.encode(images, None, patch_mask, deterministic)
      text_h = self.encode(None, tokens, None, deterministic)
    mlm_h = text_h if mlm_positions is None else jnp.take_along_axis(text_h, mlm_positions[..., None], axis=1)
    with matmul_precision(self.matmul_precision):
      out = {"cls": image_h[:, 0], "text_cls": text_h[:, 0], "mlm_logits": self._mlm_logits(mlm_h),
             "mim_pred": self.mim_proj(self.mim_ln(image_h[:, 1:]))}
      if self.cls_bow_head:
        bow = self.bow_ln(nn.gelu(self.bow_dense(image_h[:, 0])))
        out["bow_logits"] = self._vocab_logits(bow) + self.bow_bias
    return out

  def features(self, images, tokens, patch_mask=None) -> jax.Array:
    """The item feature: final visual-[CLS] state of the joint input, `[B, d]` (no dropout)."""
    return self.encode(images, tokens, patch_mask, deterministic=True)[:, 0]


def make_mmenc(pretrain_config, vocab_size: int, pad_id: int) -> MMEnc:
  """The encoder that `config.pretrain` describes (size preset + image/patch/text lengths)."""
  pre = pretrain_config
  if pre.size not in SIZES:
    raise ConfigError(f"config.pretrain.size={pre.size!r} is not one of {sorted(SIZES)}")
  if pre.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.pretrain.compute_dtype={pre.compute_dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
  return MMEnc(vocab_size=vocab_size, pad_id=pad_id, image_size=pre.image_size, patch_size=pre.patch_size,
               max_text_len=pre.max_text_len, dropout=pre.dropout, vl_ffn_layers=pre.vl_ffn_layers,
               tie_mlm_head=pre.tie_mlm_head, cls_bow_head=pre.cls_bow_weight > 0,
               dtype=COMPUTE_DTYPES[pre.compute_dtype], matmul_precision=pre.matmul_precision, **SIZES[pre.size])
