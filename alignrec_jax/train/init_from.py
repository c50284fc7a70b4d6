"""Converted BEiT-3 weights on disk (written by `python -m alignrec_jax.convert_beit3`, read by
`--config.pretrain.init_from=DIR`).

DIR is a checkpoint of the package's one checkpointer (train/state.py, step 0):
  state:  the `beit3` subtree of MMEnc's parameters (models/mmenc.py), numpy float32
  meta:   JSON: format, the architecture (vocab_size, hidden, layers, heads, mlp, patch_size, image_size,
          max_text_len), the source file and what the conversion did (dropped head keys, interpolation, truncation)
Pre-training starts from these encoder weights; the heads MMEnc adds (MLM LayerNorm and bias, the MIM head, the
optional [CLS] bag-of-words head) keep their fresh initialisation, and the MLM logits come from the loaded text
embedding (tied head).
"""

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignrec_jax.data import atomic
from alignrec_jax.data import content
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.models import mmenc
from alignrec_jax.train import state as state_lib

FORMAT = "alignrec_jax/beit3/2"  # 1: written before the checkpointer was shared (convert again)
ARCH_KEYS = ("vocab_size", "hidden", "layers", "heads", "mlp", "patch_size", "image_size", "max_text_len")


def _checkpointer(directory: str, create: bool = False) -> state_lib.Checkpointer:
  return state_lib.Checkpointer(directory, label="converted BEiT-3 checkpoint", create=create)


def beit3_shapes(meta: dict) -> Any:
  """ShapeDtypeStructs of the `beit3` parameters of the architecture that `meta` describes."""
  model = mmenc.BEiT3(**{k: meta[k] for k in ARCH_KEYS})
  images = jnp.zeros((1, meta["image_size"], meta["image_size"], 3), jnp.float32)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, images))["params"]


def save(out: str, params: Any, meta: dict, tokenizer: Optional[content.Tokenizer] = None) -> None:
  """Writes `params` (the beit3 tree) and `meta` as DIR `out`, all at once: a failure leaves no `out` behind.
  `tokenizer`: the one the weights were trained with (BEiT-3's beit3.spm), kept as `out/tokenizer.spm` and named
  by its fingerprint in the meta (`tokenizer`; None: weights that belong to no tokenizer, such as a random fixture)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory")
  meta = dict(meta, format=FORMAT, tokenizer=tokenizer.fingerprint() if tokenizer is not None else None)
  with atomic.atomic_dir(out) as tmp:
    with _checkpointer(tmp, create=True) as ckpt:
      ckpt.save(0, jax.tree.map(lambda x: np.asarray(x, np.float32), params), meta)
    if tokenizer is not None:
      tokenizer.save(os.path.join(tmp, content.TOKENIZER_FILE))


def tokenizer_path(config) -> str:
  """The stage-1 tokenizer file of `config`: `data.tokenizer`, or with `pretrain.init_from` the tokenizer the
  converted weights were trained with (their `tokenizer.spm`). A `data.tokenizer` other than that one is a DataError:
  the text embedding's rows would be read with ids that mean other pieces."""
  configured = config.data.tokenizer
  if not config.pretrain.init_from:
    return configured
  directory = os.path.expanduser(config.pretrain.init_from)
  recorded = read_meta(directory).get("tokenizer")
  if not recorded:  # converted with --no_tokenizer (or before tokenizers were recorded)
    return configured
  bundled = os.path.join(directory, content.TOKENIZER_FILE)
  if not configured:
    return bundled
  if content.Tokenizer.load(os.path.expanduser(configured), key="config.data.tokenizer").fingerprint() != recorded:
    raise DataError(f"config.data.tokenizer={configured} is not the tokenizer the weights of "
                    f"config.pretrain.init_from={config.pretrain.init_from} were trained with ({bundled}): drop "
                    "--config.data.tokenizer to use theirs")
  return configured


def read_meta(directory: str) -> dict:
  if not os.path.isdir(directory):
    raise DataError(f"config.pretrain.init_from={directory}: no such directory (write it with "
                    "python -m alignrec_jax.convert_beit3 --checkpoint=... --out=DIR)")
  with _checkpointer(directory) as ckpt:
    if ckpt.latest_step() is None:
      raise DataError(f"config.pretrain.init_from={directory}: not a converted BEiT-3 checkpoint (no orbax step)")
    meta = ckpt.meta(ckpt.latest_step())
  if meta.get("format") != FORMAT:
    raise DataError(f"config.pretrain.init_from={directory}: format {meta.get('format')!r}, expected {FORMAT!r} "
                    "(convert the weights again with python -m alignrec_jax.convert_beit3)")
  return meta


def check_architecture(directory: str, want: dict, max_text_len: int) -> dict:
  """The checkpoint's meta, after a DataError naming the field for any of `want`'s architecture values it does not
  have, or for fewer text positions than `max_text_len`. Reads the meta only: config checks call it before any data
  loads (with the config's shape; `load` again with the built model's, vocabulary included)."""
  meta = read_meta(directory)
  where = f"config.pretrain.init_from={directory}"
  hints = {"vocab_size": "the tokenizer's vocabulary (--config.data.tokenizer / pretrain.vocab_size)",
           "image_size": "config.pretrain.image_size (or convert again with --image_size)",
           "patch_size": "config.pretrain.patch_size"}
  for key, value in want.items():
    if meta[key] != value:
      raise DataError(f"{where}: the checkpoint has {key}={meta[key]}, the model {value} "
                      f"({hints.get(key, 'config.pretrain.size')})")
  if meta["max_text_len"] < max_text_len:
    raise DataError(f"{where}: the checkpoint holds {meta['max_text_len']} text positions, config.pretrain."
                    f"max_text_len={max_text_len} needs more")
  return meta


def load(directory: str, model: mmenc.MMEnc) -> tuple[Any, dict]:
  """(beit3 params fitted to `model`, meta) from a converted checkpoint; any architecture mismatch is a DataError
  that names the field. A longer text position table than the model's is truncated."""
  meta = check_architecture(directory, dict(vocab_size=model.vocab_size, hidden=model.hidden, layers=model.layers,
                                            heads=model.heads, mlp=model.mlp, patch_size=model.patch_size,
                                            image_size=model.image_size), model.max_text_len)
  with _checkpointer(directory) as ckpt:  # as saved: `apply` compares every shape with the model's
    try:
      params, _ = ckpt.restore(ckpt.latest_step())
    except state_lib.CheckpointError as e:
      raise DataError(f"config.pretrain.init_from={directory}: {e}") from None
  table = params["encoder"]["embed_positions"]["B"]["embedding"]
  params["encoder"]["embed_positions"]["B"]["embedding"] = table[:model.max_text_len + 2]
  return params, meta


def apply(params: Any, beit3_params: Any) -> Any:
  """MMEnc parameters with the `beit3` subtree taken from the loaded one. Only the opt-in vision-language FFN
  (`ffn/VL`, absent from the released models) keeps its fresh initialisation; shapes must agree."""
  loaded = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(beit3_params)}
  used = set()

  def take(path, old):
    key = jax.tree_util.keystr(path)
    if key not in loaded:
      if "'VL'" in key:
        return old
      raise DataError(f"init_from: the checkpoint has no weights for beit3{key}")
    new = loaded[key]
    if tuple(new.shape) != tuple(old.shape):
      raise DataError(f"init_from: beit3{key} has shape {tuple(new.shape)}, the model {tuple(old.shape)}")
    used.add(key)
    return jnp.asarray(new, old.dtype)
  out = dict(params)
  out["beit3"] = jax.tree_util.tree_map_with_path(take, params["beit3"])
  extra = sorted(set(loaded) - used)
  if extra:
    raise DataError(f"init_from: the checkpoint's beit3{extra[0]} has no slot in the model")
  return out
