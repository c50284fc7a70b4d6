"""AlignRec stage 2 on one of the paper's Amazon sets (Baby, Sports and Outdoors, Electronics), paper settings.

  python -m alignrec_jax.main --config=configs/amazon.py:baby --workdir=/tmp/alignrec_baby   # or :sports, :elec

Users / items / interactions: baby 19,445 / 7,050 / 160,792; sports 35,598 / 18,357 / 296,337; elec 192,403 /
63,001 / 1,689,188.

Data (MMRec layout, relative to the directory the command runs in; override with --config.data.root=DIR):
  data/<name>/<name>.inter    MMRec's 5-core interactions with the x_label split (MMRec toolbox data release)
  data/beit3_128token_add_title_brand_to_text/<name>_beit3_128token_add_title_brand_to_text/image_feat.npy
                              AlignRec's released fused features (AlignRec repository, data/README.md)
The loader stops with instructions if a file is absent. To train on MMRec's own 4096-d image features instead,
pass --config.data.image_feat=image_feat.npy (AlignRec on MMRec files uses the image features only).

Settings (docs/method.md §7; all but the lr are base.py's): d 64, 2 user-item layers, 1 item-item layer, k 10,
batch 2048, reg 1e-4, ui_cosine 0.1, τ 0.2, stopping 30 on valid Recall@20; lr 5e-4, cl 0.01, sim 0.1 is the
reference's one commented-in point of its lr x cl_loss x sim_weight grid. The paper's own numbers for these sets
were not available when this was written, so there is no target to print here.
"""

from configs import base

DATASETS = ("baby", "sports", "elec")
PAPER_LR = 5e-4  # the reference's commented-in grid point; its other stage-2 settings are base.py's defaults


def get_config(dataset: str = ""):
  if dataset not in DATASETS:
    raise ValueError(f"configs/amazon.py:{dataset or '<nothing>'}: name the data set after the colon, one of "
                     f"{', '.join(DATASETS)} (e.g. --config=configs/amazon.py:baby)")
  config = base.get_base_config()
  config.data.name = dataset
  config.data.root = f"data/{dataset}"
  feat = f"{dataset}_beit3_128token_add_title_brand_to_text"
  config.data.image_feat = f"../beit3_128token_add_title_brand_to_text/{feat}/image_feat.npy"
  config.optim.lr = PAPER_LR
  return config
