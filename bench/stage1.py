"""Stage-1 speed on this machine: ICA pre-training and extraction throughput of MMEnc-tiny, size of MMEnc-base.

  python bench/stage1.py                     # tiny at configs/base.py's stage-1 settings, base at 224 px
  python bench/stage1.py --base_steps=0      # skip the (slow on CPU) base step

Inputs are random images and token ids of the configured shapes (throughput does not depend on content). Pre-training
runs the real pmapped train step (`pretrain.make_train_step`) over `--devices` local devices (0 = all); extraction
runs `pretrain.extract_features` (three variants per item, counted as three encodings). For `base` (12 x 768, 224 px,
16 px patches) it reports the parameter count and the mean time of `--base_steps` train steps of batch
`--base_batch` after one compile step. Ends with one JSON line.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEPS = flags.DEFINE_integer("steps", 20, "timed tiny pre-training steps (after a compile step)")
_DEVICES = flags.DEFINE_integer("devices", 0, "local devices for pmap (0 = all)")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 2, "timed base train steps (0 = parameter count only)")
_BASE_BATCH = flags.DEFINE_integer("base_batch", 4, "global batch of the base step")
_VOCAB = flags.DEFINE_integer("vocab", 2000, "vocabulary size")


def _tokenizer(vocab):
  """A sentencepiece tokenizer of exactly `vocab` ids (pieces w0, w1, ... behind the fairseq special tokens)."""
  from alignrec_jax.data import content  # pylint: disable=g-import-not-at-top
  return content.Tokenizer.from_pieces([f"\u2581w{i}" for i in range(vocab - 5)])  # + <unk> <s> </s> <pad> <mask>


def _bench_train(config, vocab, steps, devices):
  """(items/s, s/step, n_params) of `steps` pmapped ICA train steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from alignrec_jax.models import mmenc  # pylint: disable=g-import-not-at-top
  from alignrec_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  pre = config.pretrain
  tokenizer = _tokenizer(vocab)
  model = mmenc.make_mmenc(pre, len(tokenizer), tokenizer.pad_id)
  tx = pretrain.make_optimizer(pre, 1000)
  params = pretrain.init_params(model, jax.random.key(0))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  if not steps:
    return None, None, n_params
  n_dev = len(devices)
  step_fn = pretrain.make_train_step(model, tx, pretrain._loss_kwargs(pre, tokenizer), devices)  # pylint: disable=protected-access
  state = jax_utils.replicate((params, tx.init(params)), devices)
  rng = np.random.default_rng(0)
  per = pre.batch_size // n_dev
  pieces = (tokenizer.unk_id + 1, tokenizer.mask_id)  # the ids of ordinary pieces
  tokens = rng.integers(*pieces, (n_dev, per, pre.max_text_len)).astype(np.int32)
  tokens[..., 0], tokens[..., -1] = tokenizer.cls_id, tokenizer.sep_id
  batch = {"image": rng.integers(0, 256, (n_dev, per, pre.image_size, pre.image_size, 3), dtype=np.uint8),
           "tokens": tokens}
  times = []
  for i in range(steps + 1):  # step 0 compiles
    start = time.perf_counter()
    *state, metrics = step_fn(*state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  per_step = float(np.mean(times[1:]))
  return pre.batch_size / per_step, per_step, n_params


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alignrec_jax.models import mmenc  # pylint: disable=g-import-not-at-top
  from alignrec_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top

  devices = jax.local_devices()[:_DEVICES.value or None]
  config = base.get_base_config()
  out = {"device": jax.devices()[0].device_kind, "n_devices": len(devices), "tiny_image_size": config.pretrain.image_size,
         "tiny_patch_size": config.pretrain.patch_size, "tiny_text_len": config.pretrain.max_text_len,
         "tiny_batch": config.pretrain.batch_size}
  items_s, step_s, n_params = _bench_train(config, _VOCAB.value, _STEPS.value, devices)
  out.update(tiny_params=n_params, tiny_pretrain_items_per_s=round(items_s, 1), tiny_pretrain_s_per_step=round(step_s, 4))

  # extraction: all three variants of 1024 items (the jitted batch compiles once on the first call)
  pre = config.pretrain
  tokenizer = _tokenizer(_VOCAB.value)
  model = mmenc.make_mmenc(pre, len(tokenizer), tokenizer.pad_id)
  params = pretrain.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  n = 1024
  images = rng.integers(0, 256, (n, pre.image_size, pre.image_size, 3), dtype=np.uint8)
  tokens = rng.integers(tokenizer.unk_id + 1, tokenizer.mask_id, (n, pre.max_text_len)).astype(np.int32)
  pretrain.extract_features(model, params, images[:pre.extract_batch_size], tokens[:pre.extract_batch_size], tokenizer,
                            pre.extract_batch_size)  # compile
  start = time.perf_counter()
  pretrain.extract_features(model, params, images, tokens, tokenizer, pre.extract_batch_size)
  elapsed = time.perf_counter() - start
  out.update(tiny_extract_items_per_s=round(n / elapsed, 1), tiny_extract_encodings_per_s=round(3 * n / elapsed, 1))

  big = base.get_base_config()
  big.pretrain.update(size="base", image_size=224, patch_size=16, max_text_len=32, batch_size=_BASE_BATCH.value)
  base_devices = devices[:1] if _BASE_BATCH.value % len(devices) else devices
  _, base_step_s, base_params = _bench_train(big, 64000, _BASE_STEPS.value, base_devices)
  out.update(base_params=base_params, base_vocab=64000, base_batch=_BASE_BATCH.value,
             base_s_per_step=None if base_step_s is None else round(base_step_s, 3))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
