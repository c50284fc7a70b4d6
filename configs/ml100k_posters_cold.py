"""ml100k_posters with 20% of its items held out as cold-start items, scored by the neighbour rule.

  python -m alignrec_jax.main --config=configs/ml100k_posters_cold.py --workdir=/tmp/ml100k_cold

configs/ml100k_posters.py (stage 1 ICA, then stage 2 on the extracted table) with data.cold_items=0.2 and
model.cold_start='neighbours' (alignrec_jax/models/new_items.py): an item without train interactions is scored with
the cosine-weighted mean of the vectors of its knn_k most similar trained items by the stage-1 feature. Stage 1
sees every item's content, never a cold item's interactions. Reuse a finished stage-1 workdir with
--config.data.features_from=W --config.stage=train.

Not yet measured with the neighbour rule (docs/results.md, "The neighbour rule on lfm2k", says so): the figures
for the paper's own vectors of the cold items are in docs/experiments.md (2026-12-03).
"""

from configs import ml100k_posters


def get_config():
  config = ml100k_posters.get_config()
  config.data.cold_items = 0.2
  config.model.cold_start = "neighbours"
  return config
