"""Config of the tiny stage-1 items (tests/train/test_pretrain.py writes them; data.root is set per test)."""

from configs import base


def get_config():
  config = base.get_base_config()
  config.stage = "pretrain"
  pre = config.pretrain
  pre.size, pre.image_size, pre.patch_size, pre.max_text_len = "tiny", 8, 4, 8
  pre.batch_size, pre.steps, pre.warmup_steps, pre.lr = 4, 4, 2, 1e-3
  pre.checkpoint_every, pre.log_every, pre.extract_batch_size = 2, 1, 3
  pre.dropout = 0.1  # the dropout keys must also be the same whatever the process layout
  return config
