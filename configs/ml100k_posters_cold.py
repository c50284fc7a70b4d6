"""ml100k_posters with 20% of its items held out as cold-start items, scored by the neighbour rule.

  python -m alignrec_jax.main --config=configs/ml100k_posters_cold.py --workdir=/tmp/ml100k_cold

configs/ml100k_posters.py (stage 1 ICA, then stage 2 on the extracted table) with data.cold_items=0.2 and
model.cold_start='neighbours' (alignrec_jax/models/new_items.py): an item without train interactions is scored with
the cosine-weighted mean of the vectors of its knn_k most similar trained items by the stage-1 feature. Stage 1
sees every item's content, never a cold item's interactions. Reuse a finished stage-1 workdir with
--config.data.features_from=W --config.stage=train.

Expected at the selected epoch, mean over split seeds 0/1/2 with training seed 999 (docs/experiments.md,
2026-12-07): cold test Recall@20 0.290 (0.300 with --config.data.cold_inductive=True), cold valid 0.269; with the
paper's own vectors of the cold items 0.251 and 0.198; warm test Recall@20 0.187. Split 0 alone: cold test 0.3511,
warm test 0.1892, best epoch 95. Chance on a cold split is 0.156.
"""

from configs import ml100k_posters


def get_config():
  config = ml100k_posters.get_config()
  config.data.cold_items = 0.2
  config.model.cold_start = "neighbours"
  return config
