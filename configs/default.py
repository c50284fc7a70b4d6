"""The embedded default data: a generated dataset, the whole two-stage pipeline in a few minutes on 2 CPU cores.

  python -m alignrec_jax.main --config=configs/default.py --workdir=/tmp/alignrec_default

The data (users, items with a small rendered image and a short text sharing latent topics, and interactions drawn
from user-topic affinity) is generated on first use into data.root (seconds; nothing is downloaded), with a cheap
content feature in base.py's image_feat.npy slot (what stage=train alone trains on). Stage 1 pre-trains a small
MMEnc on the images and texts, extracts one feature per item, and stage 2 trains AlignRec on those features.
"""

import os

from configs import base


def get_config():
  config = base.get_base_config()
  config.stage = "all"
  config.data.name = "default"
  config.data.synthetic = True
  config.data.root = os.path.join("~", ".cache", "alignrec_jax", "synthetic")

  config.train.batch_size = 1024
  config.train.epochs = 200
  config.train.stopping_step = 20

  # small (4 x 128): at tiny (2 x 64, the oracle fixture's shape) the [CLS] features of this data collapse to a few
  # directions and stage 2 ends far lower (docs/experiments.md)
  config.pretrain.size = "small"
  config.pretrain.steps = 300
  return config
