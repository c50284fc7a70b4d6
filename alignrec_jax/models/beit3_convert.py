"""A torchscale/unilm BEiT-3 state dict (numpy arrays by torch key) -> the `beit3` parameters of MMEnc.

Key mapping (torch name -> flax path): the optional "beit3." prefix goes; `layers.<i>` becomes `layers_<i>`; a
Linear's `weight` [out, in] becomes `kernel` [in, out]; the patch convolution's `weight` [d, 3, p, p] becomes
`kernel` [p, p, 3, d]; a LayerNorm's `weight` becomes `scale`; an Embedding's `weight` becomes `embedding`; `bias`,
`cls_token` and `mask_token` keep their names. Every other name is the same in both (models/mmenc.py).

Shapes that may change on the way:
- the vision position table (`encoder.embed_positions.A.weight`, rows: 2 unused + [CLS] + grid x grid patches) is
  resized for another image size: its 2 + 1 leading rows are kept, the patch rows are interpolated bicubically
  over the grid exactly as torch's `F.interpolate(mode="bicubic", align_corners=False)` does (which is what
  unilm's beit3 does when it fine-tunes at another resolution);
- the text position table (`encoder.embed_positions.B.weight`, 1,024 rows in the released models) is truncated to
  `max_text_len + 2` rows.

Keys outside `beit3.` that are known pre-training or fine-tuning heads are dropped and listed; any other key, any
`beit3.` key without a slot in the model, any slot without a key and any shape that does not fit is an error that
names the key. Nothing here needs torch.
"""

import math
import re
from typing import Any

import numpy as np

# heads of unilm's pre-training and fine-tuning wrappers around `beit3`; the encoder features do not use them
KNOWN_HEAD_PREFIXES = ("mlm_head.", "mim_head.", "lm_head.", "head.", "heads.", "vision_head.", "language_head.",
                       "fc_norm.", "pooler.", "logit_scale", "itc_head.", "vqkd", "teacher.")
_PREFIX = "beit3."
_VISION_POS = "encoder.embed_positions.A.weight"
_TEXT_POS = "encoder.embed_positions.B.weight"
_N_EXTRA = 3  # the vision table's rows before the patches: fairseq's 2 unused rows + [CLS]


class ConversionError(ValueError):
  """A state dict that does not fit the model; the message names the key."""


def _cubic_weights(t: float, a: float = -0.75) -> list:
  """torch's cubic convolution weights (a = -0.75) of the 4 neighbours at fractional offset `t`."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` float64 matrix of torch's 1-D bicubic resize (align_corners=False, borders clamped)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as torch
    base = math.floor(src)
    for k, w in enumerate(_cubic_weights(src - base)):
      m[i, min(max(base - 1 + k, 0), n_in - 1)] += w
  return m


def resize_grid(table: np.ndarray, grid_out: int) -> np.ndarray:
  """`[g*g, d]` rows of a row-major g x g grid -> `[grid_out**2, d]`, bicubic as torch (separable, float64)."""
  n, d = table.shape
  g = int(round(math.sqrt(n)))
  if g * g != n:
    raise ConversionError(f"{_PREFIX}{_VISION_POS}: {n} patch rows are not a square grid")
  if g == grid_out:
    return table
  m = bicubic_matrix(g, grid_out)
  x = table.astype(np.float64).reshape(g, g, d)
  x = np.einsum("ih,hwd->iwd", m, x)
  x = np.einsum("jw,iwd->ijd", m, x)
  return x.reshape(grid_out * grid_out, d).astype(table.dtype)


def split_heads_and_encoder(state: dict) -> tuple[dict, list]:
  """(encoder state without the "beit3." prefix, dropped head keys); an unknown outer key is an error."""
  has_prefix = any(k.startswith(_PREFIX) for k in state)
  encoder, dropped = {}, []
  for key, value in state.items():
    if has_prefix and not key.startswith(_PREFIX):
      if key.startswith(KNOWN_HEAD_PREFIXES):
        dropped.append(key)
        continue
      raise ConversionError(f"unexpected key {key!r}: neither part of beit3 nor a known pre-training head")
    encoder[key[len(_PREFIX):] if has_prefix else key] = np.asarray(value)
  return encoder, sorted(dropped)


def infer_dims(encoder: dict) -> dict:
  """Architecture read off the shapes: vocab, hidden, layers, mlp, patch_size, image_size, text_positions."""
  try:
    vocab, hidden = encoder["text_embed.weight"].shape
    patch = encoder["vision_embed.proj.weight"].shape[-1]
    mlp = encoder["encoder.layers.0.ffn.A.fc1.weight"].shape[0]
    n_vision = encoder[_VISION_POS].shape[0]
    text_rows = encoder[_TEXT_POS].shape[0]
  except KeyError as e:
    raise ConversionError(f"missing key {_PREFIX}{e.args[0]}: not a BEiT-3 state dict") from None
  layers = 1 + max(int(m.group(1)) for k in encoder for m in [re.match(r"encoder\.layers\.(\d+)\.", k)] if m)
  grid = int(round(math.sqrt(n_vision - _N_EXTRA)))
  return dict(vocab_size=int(vocab), hidden=int(hidden), layers=layers, mlp=int(mlp), patch_size=int(patch),
              image_size=int(grid * patch), max_text_len=int(text_rows - 2))


def _flax_path(key: str, leaves: dict) -> tuple:
  parts = key.split(".")
  out = []
  i = 0
  while i < len(parts):
    if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"layers_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  if out[-1] == "weight":
    for name in ("kernel", "scale", "embedding"):
      if tuple(out[:-1]) + (name,) in leaves:
        return tuple(out[:-1]) + (name,)
  return tuple(out)


def _to_flax(value: np.ndarray, path: tuple) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def _flatten(tree: Any, prefix: tuple = ()) -> dict:
  if hasattr(tree, "items"):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def convert(encoder: dict, target_shapes: Any) -> tuple[dict, dict]:
  """Encoder state (torch keys, no prefix) -> (params tree shaped as `target_shapes`, report).

  `target_shapes`: the `beit3` subtree of the model's parameters (arrays or ShapeDtypeStructs); the vision position
  table is resized and the text table truncated to their shapes. Report: {"interpolated": (g_in, g_out) or None,
  "text_rows": (n_in, n_out)}.
  """
  leaves = {p: tuple(v.shape) for p, v in _flatten(target_shapes).items()}
  flat, unexpected, report = {}, [], {"interpolated": None, "text_rows": None}
  for key, value in encoder.items():
    path = _flax_path(key, leaves)
    if path not in leaves:
      unexpected.append(key)
      continue
    value = _to_flax(np.asarray(value, np.float32), path)
    want = leaves[path]
    if key == _VISION_POS and value.shape != want:
      g_in = int(round(math.sqrt(value.shape[0] - _N_EXTRA)))
      g_out = int(round(math.sqrt(want[0] - _N_EXTRA)))
      value = np.concatenate([value[:_N_EXTRA], resize_grid(value[_N_EXTRA:], g_out)])
      report["interpolated"] = (g_in, g_out)
    if key == _TEXT_POS and value.shape != want:
      if value.shape[0] < want[0]:
        raise ConversionError(f"{_PREFIX}{key}: {value.shape[0]} rows hold {value.shape[0] - 2} text positions, "
                              f"fewer than the {want[0] - 2} asked for")
      report["text_rows"] = (value.shape[0], want[0])
      value = value[:want[0]]
    if value.shape != want:
      raise ConversionError(f"{_PREFIX}{key}: shape {tuple(value.shape)} does not fit {'/'.join(path)} {want}")
    flat[path] = value
  if unexpected:
    raise ConversionError(f"unexpected key {_PREFIX}{unexpected[0]} (no slot in the model; "
                          f"{len(unexpected)} unexpected in all: {', '.join(unexpected[:8])})")
  missing = sorted(set(leaves) - set(flat))
  if missing:
    names = ["/".join(p) for p in missing]
    raise ConversionError(f"missing key for {names[0]} ({len(missing)} missing in all: {', '.join(names[:8])})")
  return _unflatten(flat), report
