"""Stage 1 at BEiT-3 base size from the released weights (an accelerator run), then stage 2 with the paper's settings.

  pip install -r requirements-convert.txt
  python -m alignrec_jax.convert_beit3 --checkpoint=beit3_base_patch16_224.pth --tokenizer=beit3.spm \
      --out=/tmp/beit3_base --max_text_len=128
  python -m alignrec_jax.main --config=configs/beit3_base.py:ml100k_posters --workdir=/tmp/beit3_ml100k \
      --config.pretrain.init_from=/tmp/beit3_base

The argument after the colon picks the data: `ml100k_posters` (the default; its posters and titles) or one of the
paper's Amazon sets `baby`, `sports`, `elec` with the raw content table data/<name>/items.tsv (itemID, text, image
path) beside <name>.inter. Stage 1: MMEnc = BEiT-3 base (12 layers, 768, 12 heads), 224 px images in 16 px patches,
128 text tokens, ICA = MLM + pixel-regression MIM only (ITC and the [CLS] bag-of-words term, this project's
extensions, stay off), AdamW lr 5e-5 for 1,000 steps of batch 64 from the converted weights. Stage 2 trains AlignRec
on the extracted visual-[CLS] features with the paper's settings (configs/amazon.py).
`--config.pretrain.steps=0` extracts the released encoder's own features ("BEiT-3 without ICA").
"""

from configs import amazon
from configs import ml100k_posters


def get_config(data: str = "ml100k_posters"):
  if data == "ml100k_posters":
    config = ml100k_posters.get_config()
  elif data in amazon.DATASETS:
    config = amazon.get_config(data)
    config.stage = "all"
    config.data.image_feat = ""  # the features come from stage 1
  else:
    raise ValueError(f"configs/beit3_base.py:{data}: the data must be ml100k_posters, {', '.join(amazon.DATASETS)}")
  config.optim.lr = amazon.PAPER_LR  # stage 2: the paper's settings, base.py's defaults but for this

  pre = config.pretrain
  pre.size = "base"
  pre.image_size = 224
  pre.patch_size = 16
  pre.max_text_len = 128
  pre.vocab_size = 64010        # BEiT-3's sentencepiece vocabulary
  pre.cls_bow_weight = 0.0      # ml100k_posters' extension off: the paper's ICA
  pre.steps = 1000
  pre.lr = 5e-5
  pre.warmup_steps = 100
  pre.checkpoint_every = 250
  pre.log_every = 50
  pre.extract_batch_size = 64
  return config
