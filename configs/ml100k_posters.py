"""The whole AlignRec pipeline from raw content: MovieLens-100K with real posters and titles (issue 4).

  python -m alignrec_jax.main --config=configs/ml100k_posters.py --workdir=/tmp/ml100k_posters

Stage 1 pre-trains a tiny MMEnc (4 layers x 128, 32 px posters in 8 px patches, titles + genres up to 20 tokens)
with the ICA objective (MLM + block-masked normalised-pixel MIM) on the 1,279 items, extracts the visual-[CLS]
feature of every item (plus the image-masked and text-masked variants), and stage 2 trains AlignRec on the table
restored from the stage-1 orbax checkpoint. Each stage skips what the workdir already holds.

Measured here (2 shared CPU cores; see bench/stage1_quality.py and the stage-1 note of the closing notes):
  ICA (ITC on, 400 steps, batch 64, seed 999): MLM 7.61 -> 2.71 (masked-word accuracy 0.00 -> 0.51), MIM 2.11 -> 0.90,
  ITC 5.26 -> about 0.04; about 30-46 items/s once compiled, about 17 min for the 400 steps on the loaded machine (12 min without ITC).
  Zero-shot Recall@20 (bench/stage1_quality.py), pre-trained vs the same encoder at its random initialisation:
  test 0.0256 vs 0.0196, valid 0.0226 vs 0.0264: NOT a clear win (text-masked variant, i.e. image only: test 0.0309 vs 0.0149).
  Without ITC (--config.pretrain.itc_weight=0): test 0.0229 vs 0.0196, valid 0.0201 vs 0.0264.
  For scale: popularity reaches test Recall@20 0.0915, a bag of words of the item text 0.0495 zero-shot.

The data lives in ../shared/data/ml100k_posters beside the repository (override with --config.data.root=DIR).
"""

import os

from configs import base

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                     "ml100k_posters")


def get_config():
  config = base.get_base_config()
  config.stage = "all"
  config.seed = 999
  config.data.name = "ml100k_posters"
  config.data.root = os.path.normpath(_DATA)
  config.data.items_file = "items.tsv"
  config.data.image_feat = ""  # features come from stage 1 (data.features_from), not from a file
  config.data.text_feat = ""

  pre = config.pretrain
  pre.size = "tiny"
  pre.image_size = 32
  pre.patch_size = 8
  pre.max_text_len = 20       # "Title (year). Genres: ..." is at most 17 words + [CLS]/[SEP]
  pre.vocab_size = 4000
  pre.batch_size = 64
  pre.steps = 400
  pre.lr = 1e-3
  pre.warmup_steps = 40
  pre.itc_weight = 1.0        # ITC trains the [CLS] positions; without it the [CLS] feature is nearly constant
  pre.checkpoint_every = 100
  pre.log_every = 50
  pre.extract_batch_size = 128

  config.train.batch_size = 2048
  config.train.epochs = 1000
  config.train.stopping_step = 30
  return config
