"""AlignRec stage 2 on Amazon Baby (19,445 users, 7,050 items, 160,792 interactions), with the paper's settings.

  python -m alignrec_jax.main --config=configs/baby.py --workdir=/tmp/alignrec_baby

Data (MMRec layout, relative to the directory the command runs in; override with --config.data.root=DIR):
  data/baby/baby.inter    MMRec's 5-core interactions with the x_label split (MMRec toolbox data release)
  data/beit3_128token_add_title_brand_to_text/baby_beit3_128token_add_title_brand_to_text/image_feat.npy
                                AlignRec's released fused features (AlignRec repository, data/README.md)
The loader stops with instructions if a file is absent. To train on MMRec's own 4096-d image features instead,
pass --config.data.image_feat=image_feat.npy (AlignRec on MMRec files uses the image features only).

Settings (docs/method.md §7): d 64, 2 user-item layers, 1 item-item layer, k 10, batch 2048, reg 1e-4,
ui_cosine 0.1, τ 0.2, stopping 30 on valid Recall@20; lr 5e-4, cl 0.01, sim 0.1 is the reference's one commented-in
grid point (its full grid is lr x cl_loss x sim_weight, 175 runs). The paper's own numbers for this dataset were
not available when this was written, so there is no target to print here.
"""

from configs import base


def get_config():
  return base.get_amazon_paper_config("baby")
