"""Config of the tiny synthetic dataset that tests.train.test_stage2.py writes (data.root is set per test)."""

from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "tiny"
  config.data.image_feat = "feat.npy"
  config.model.embedding_size = 8
  config.model.knn_k = 3
  config.train.batch_size = 64
  config.train.epochs = 4
  config.train.stopping_step = 100
  config.optim.lr = 0.01
  config.eval.batch_users = 64
  config.eval.topk = (5, 10, 20)  # 40 items
  return config
