"""Converts a released BEiT-3 checkpoint (unilm's beit3_{base,large}_patch16_224.pth) into MMEnc's encoder weights.

  pip install -r requirements-convert.txt        # adds the CPU torch wheel that reading a .pth needs
  python -m alignrec_jax.convert_beit3 --checkpoint=beit3_base_patch16_224.pth --tokenizer=beit3.spm \\
      --out=/tmp/beit3_base [--image_size=224] [--max_text_len=128] [--heads=12]

then `--config.pretrain.init_from=/tmp/beit3_base` starts ICA from it (train/init_from.py), with the tokenizer
kept beside the weights (--tokenizer; weights that belong to no tokenizer, as the random test fixture, take
--no_tokenizer instead: one of the two is required).

The checkpoint may be a torch `.pth` (a state dict, or a dict holding it under "model" or "module") or a plain `.npz`
of the same state dict (keys as torch names them; this path needs no torch). The architecture is read off the
shapes; the number of attention heads is not in them, so it comes from the size preset with the same layers /
hidden / FFN width (`base`, `large`, `tiny`) or from --heads. --image_size resizes the vision position table
bicubically (as unilm does for fine-tuning at another resolution); --max_text_len truncates the text position table
(1,024 rows in the released models). Keys of known pre-training heads are dropped and listed; any other unknown,
missing or misshaped key is a one-line error naming it, and nothing is written.
"""

import argparse
import os
import re
import sys
import zipfile

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from alignrec_jax.data import content
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.models import beit3_convert
from alignrec_jax.models import mmenc
from alignrec_jax.train import init_from


def read_state_dict(path: str) -> dict:
  """{torch key: float32/int numpy array} from a `.pth` (needs torch, imported here only) or an `.npz`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint={path}: no such file")
  if path.endswith(".npz"):
    try:
      with np.load(path) as data:
        return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy's sentence names no file
      raise ValueError(f"--checkpoint={path}: not a readable .npz of arrays ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: requirements-convert.txt)
  except ImportError:
    raise ImportError(f"--checkpoint={path}: reading a .pth needs torch: pip install -r requirements-convert.txt "
                      "(or pass the state dict as a .npz)") from None
  try:
    # unilm's training checkpoints also pickle the run's arguments (an argparse.Namespace of plain values): allowed
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a damaged or non-tensor pickle
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0] if str(e) else "")  # torch's bold escapes
    if "weights only" in text.lower() or "weights_only" in text.lower():
      raise ValueError(f"--checkpoint={path}: it pickles objects besides tensors, which are not loaded unchecked: if "
                       "you trust the file, save its state dict alone (python -c \"import torch; torch.save(torch.load("
                       "'IN.pth', weights_only=False)['model'], 'OUT.pth')\") and convert that") from None
    raise ValueError(f"--checkpoint={path}: not a readable torch state dict ({type(e).__name__}: {text})") from None
  for key in ("model", "module", "state_dict"):
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
      checkpoint = checkpoint[key]
      break
  if not isinstance(checkpoint, dict):
    raise ValueError(f"--checkpoint={path}: holds a {type(checkpoint).__name__}, not a state dict")
  out = {}
  for key, value in checkpoint.items():
    if not torch.is_tensor(value):
      raise ValueError(f"--checkpoint={path}: {key!r} is a {type(value).__name__}, not a tensor")
    out[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
  return out


def heads_for(dims: dict, heads: int = 0) -> int:
  """--heads, or the heads of the size preset with these layers / hidden / FFN width."""
  if heads:
    if dims["hidden"] % heads:
      raise ValueError(f"--heads={heads} does not divide the hidden size {dims['hidden']}")
    return heads
  for name, size in mmenc.SIZES.items():
    if (size["layers"], size["hidden"], size["mlp"]) == (dims["layers"], dims["hidden"], dims["mlp"]):
      logging.info("convert: the shapes are MMEnc-%s: %d heads", name, size["heads"])
      return size["heads"]
  raise ValueError(f"layers={dims['layers']}, hidden={dims['hidden']}, FFN {dims['mlp']} match no size preset "
                   f"({sorted(mmenc.SIZES)}): pass --heads")


def convert_state_dict(state: dict, image_size: int = 0, max_text_len: int = 0, heads: int = 0) -> tuple:
  """(beit3 params, meta) for a state dict; 0 = keep the checkpoint's image size / text length."""
  encoder, dropped = beit3_convert.split_heads_and_encoder(state)
  dims = beit3_convert.infer_dims(encoder)
  source = {"image_size": dims["image_size"], "max_text_len": dims["max_text_len"]}
  dims["heads"] = heads_for(dims, heads)
  if image_size:
    if image_size % dims["patch_size"]:
      raise ValueError(f"--image_size={image_size} is not a multiple of the patch size {dims['patch_size']}")
    dims["image_size"] = image_size
  if max_text_len:
    if max_text_len > source["max_text_len"]:
      raise ValueError(f"--max_text_len={max_text_len} exceeds the checkpoint's {source['max_text_len']} text "
                       "positions")
    dims["max_text_len"] = max_text_len
  params, report = beit3_convert.convert(encoder, init_from.beit3_shapes(dims))
  meta = dict(dims, dropped_keys=dropped, source_image_size=source["image_size"],
              source_max_text_len=source["max_text_len"], interpolated=report["interpolated"])
  return params, meta


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "BEiT-3 state dict: .pth (needs torch) or .npz.")
  flags.DEFINE_string("out", None, "New directory for the converted orbax checkpoint.")
  flags.DEFINE_integer("image_size", 0, "Target image size in pixels (0 = the checkpoint's); the vision position "
                       "table is interpolated bicubically.")
  flags.DEFINE_integer("max_text_len", 0, "Target text length (0 = the checkpoint's); the text position table is "
                       "truncated.")
  flags.DEFINE_integer("heads", 0, "Attention heads (0 = from the size preset that matches the shapes).")
  flags.DEFINE_string("tokenizer", None, "The sentencepiece model the weights were trained with (beit3.spm for the "
                      "released BEiT-3): kept with them, so that pre-training reads their text embedding with it.")
  flags.DEFINE_bool("no_tokenizer", False, "Weights that belong to no tokenizer (a random test fixture): pre-training "
                    "then uses data.tokenizer or one trained on the item texts.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.tokenizer) == FLAGS.no_tokenizer:
    sys.exit("error: give --tokenizer=FILE.spm (the sentencepiece model the weights were trained with: beit3.spm "
             "for the released BEiT-3) or, for weights that belong to no tokenizer, --no_tokenizer")
  try:
    tokenizer = content.Tokenizer.load(FLAGS.tokenizer, key="--tokenizer") if FLAGS.tokenizer else None
    state = read_state_dict(FLAGS.checkpoint)
    params, meta = convert_state_dict(state, FLAGS.image_size, FLAGS.max_text_len, FLAGS.heads)
    if tokenizer is not None and len(tokenizer) > meta["vocab_size"]:
      raise ValueError(f"--tokenizer={FLAGS.tokenizer} has {len(tokenizer)} ids, the weights' text embedding "
                       f"{meta['vocab_size']} rows: not the tokenizer they were trained with")
    meta["source"] = os.path.abspath(FLAGS.checkpoint)
    init_from.save(FLAGS.out, params, meta, tokenizer)
  except (FileNotFoundError, FileExistsError, ImportError, ValueError, DataError) as e:
    sys.exit(f"error: {e}")
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  print(f"converted {FLAGS.checkpoint}: {meta['layers']} layers, hidden {meta['hidden']}, {meta['heads']} heads, "
        f"vocab {meta['vocab_size']}, {n} parameters -> {os.path.abspath(FLAGS.out)}")
  print(f"  image {meta['source_image_size']} px -> {meta['image_size']} px"
        + (" (vision positions interpolated bicubically {0[0]}x{0[0]} -> {0[1]}x{0[1]})".format(meta["interpolated"])
           if meta["interpolated"] else "")
        + f"; text positions {meta['source_max_text_len']} -> {meta['max_text_len']}")
  print(f"  missing keys: none; unexpected keys: none; dropped pre-training head keys: "
        f"{', '.join(meta['dropped_keys']) or 'none'}")
  print(f"  tokenizer: {FLAGS.tokenizer} (kept as {os.path.join(os.path.abspath(FLAGS.out), content.TOKENIZER_FILE)})"
        if FLAGS.tokenizer else "  tokenizer: none (--no_tokenizer)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
