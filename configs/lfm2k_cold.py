"""lfm2k with 20% of its items held out as cold-start items, scored by the neighbour rule (model.cold_start).

  python -m alignrec_jax.main --config=configs/lfm2k_cold.py --workdir=/tmp/lfm2k_cold
  python -m alignrec_jax.main --config=configs/lfm2k_cold.py --workdir=/tmp/lfm2k_cold_ind --config.data.cold_inductive=True

configs/lfm2k.py's stage 2 unchanged, with data.cold_items=0.2 (split_seed 0: 142 valid_cold and 143 test_cold
items, where a random order has Recall@20 = 0.14) and model.cold_start='neighbours': an item without train
interactions is scored with the cosine-weighted mean of the vectors of its knn_k most similar trained items by the
MiniLM features (alignrec_jax/models/new_items.py). Training and model selection (warm valid Recall@20) are the
paper's, so the warm metrics are those of the same run with model.cold_start='own'.

Expected at the selected epoch, mean over seeds 999/1/2 (docs/experiments.md, 2026-12-07): cold test Recall@20
0.757 (0.754 with --config.data.cold_inductive=True); with the paper's own vectors of the cold items 0.385
(inductive: 0.140, chance level); warm test Recall@20 0.464 (inductive 0.460). Seed 999 alone: cold test 0.7555, warm
test 0.4650, best epoch 291.
"""

from configs import lfm2k


def get_config():
  config = lfm2k.get_config()
  config.data.cold_items = 0.2
  config.model.cold_start = "neighbours"
  return config
