"""Base configuration shared by every dataset config.

Not run by itself: each dataset config calls `get_base_config()` and states only what differs. Every key that
exists here can be overridden from the command line (`--config.optim.lr=5e-4`); a key that does not exist is an error.
"""

import os

import ml_collections

from alignrec_jax import models  # configs sit above the package, with the entry points


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # pretrain (stage 1, ICA) | extract (stage-1 features) | train (stage 2, CCA + UIA) | all | probe
  config.stage = "train"
  config.seed = 999

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.name = ""                # dataset name: <root>/<name>.inter
  data.root = ""                # folder holding the MMRec-format files
  data.inter_file = ""          # defaults to <name>.inter
  data.user_field = "userID"
  data.item_field = "itemID"
  data.split_field = "x_label"
  data.image_feat = "image_feat.npy"   # file name under root ("" = none); AlignRec's fused features use this slot
  data.text_feat = ""                  # MMRec's text_feat.npy slot ("" = none; AlignRec ignores text)
  data.features_from = ""       # a stage-1 workdir: take the feature table from its orbax checkpoint instead
  data.features_variant = "full"  # which stage-1 table: full | mask_image | mask_text
  data.filter_cold_start = True  # drop valid/test rows of users without train rows (MMRec)
  data.drop_duplicates = False  # True: drop repeated rows and train/valid/test overlaps (counted) instead of failing
  # evaluation protocols on top of the file's split (data/protocols.py); the defaults leave the data as it is
  data.cold_items = 0.0         # fraction of the items held out of training as cold-start items (valid_cold/test_cold)
  data.cold_inductive = False   # True: the cold items stay out of the kNN graphs too, attached as new items at eval
  data.train_fraction = 1.0     # fraction of each user's train interactions kept (sparse users; at least one)
  data.split_seed = 0           # seeds both protocols: every model and training seed sees the same split
  data.synthetic = False        # generate the embedded default dataset into root
  data.items_file = "items.tsv"  # raw content table (stage 1)
  data.tokenizer = ""           # stage-1 sentencepiece model (.spm, e.g. BEiT-3's beit3.spm); "" = trained on the texts

  # ---------------------------------------------------------------- stage-2 model (AlignRec, docs/method.md §5)
  config.model = model = ml_collections.ConfigDict()
  model.name = "alignrec"
  model.embedding_size = 64
  model.n_ui_layers = 2         # LightGCN layers on the user-item graph
  model.n_ii_layers = 1         # propagation steps on the item-item kNN graph
  model.knn_k = 10
  model.use_ln = False          # LayerNorm on the raw feature table before the projection
  model.freeze_features = False  # reference: the feature table is trainable
  model.sim_target = "current"  # 'current' (reference: fine-tuned table) | 'frozen' (initial table)
  model.side_emb_div = 0.0      # Fuser: h = h_id + h_mm / div (0 = plain sum, the reference default)
  # how items without train interactions (cold-start, new) are scored, for every content model: 'own' = the model's
  # own vectors (the paper); 'neighbours' = the cosine-weighted mean of the vectors of their knn_k most similar
  # trained items by the features (models/new_items.py). Items added to a trained run always take 'neighbours'.
  model.cold_start = "own"
  model.propagation = "gather"  # gather (padded neighbour lists) | segment_sum | autodiff; bench/propagation.py
  # every other registered model's own hyper-parameters live under config.model.<name> (e.g.
  # --config.model.freedom.dropout=0.9); their defaults stand beside each model (its default_config())
  model.update(models.default_configs())

  # ---------------------------------------------------------------- stage-2 losses
  config.loss = loss = ml_collections.ConfigDict()
  loss.reg_weight = 1e-4        # lambda: L2 on final batch embeddings / train.batch_size
  loss.cl_weight = 0.01         # alpha: CCA InfoNCE ('cl_loss' in the reference)
  loss.sim_weight = 0.1         # beta: similarity-preserving loss
  loss.ui_cosine_weight = 0.1   # UIA cosine term
  loss.temperature = 0.2        # InfoNCE temperature (hard-coded in the reference)

  # ---------------------------------------------------------------- stage-2 optimisation
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 1e-3
  optim.lr_decay = 0.96         # lr_e = lr * decay ** (epoch / decay_every), stepped per epoch
  optim.lr_decay_every = 50

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 2048       # global batch, split across devices
  train.epochs = 1000
  train.stopping_step = 30      # stop after this many epochs without a better valid metric
  train.eval_every = 1
  train.num_devices = 0         # 0 = all local devices
  train.log_every_steps = 0     # 0 = one progress line per epoch
  train.keep_checkpoints = 1    # latest checkpoints kept besides the best
  train.divergence_factor = 1e3  # stop when an epoch's mean loss exceeds this multiple of the first step's (0 = off)
  train.divergence_growth = 2.0  # ... or exceeds the first step's and this multiple of the lowest epoch mean (0 = off)

  # ---------------------------------------------------------------- evaluation (MMRec protocol, docs/method.md §8)
  config.eval = ev = ml_collections.ConfigDict()
  ev.topk = (5, 10, 20, 50)
  ev.metrics = ("recall", "ndcg", "precision", "map")
  ev.valid_metric = "recall@20"
  ev.select_on = "valid"        # the evaluator whose valid_metric drives early stopping: valid | valid_cold
  ev.batch_users = 4096
  ev.popularity_groups = ()     # e.g. (0.2,) = head 20% / tail 80% of items by train popularity
  # what is evaluated after every epoch (eval/evaluators.py); eval.select_on drives early stopping, the others are
  # reported at its best epoch; with data.cold_items, valid_cold and test_cold are added unless named here
  config.evals = ml_collections.ConfigDict()
  config.evals.valid = dict(kind="ranking", split="valid")
  config.evals.test = dict(kind="ranking", split="test")

  # ---------------------------------------------------------------- export (a trained run's recommendations)
  config.export = export = ml_collections.ConfigDict()
  export.k = 50                 # top-k list length per user in export/topk.tsv
  export.users = "all"          # whose lists: valid | test | all (every user id)
  export.item_table = ""        # tab-separated itemID -> text table under data.root ("" = data.items_file if present)
  export.item_text = "text"     # its column that names an item (recommend CLI, Run.item_text)

  # ---------------------------------------------------------------- stage 1 (MMEnc + ICA), docs/method.md §2
  config.pretrain = pre = ml_collections.ConfigDict()
  pre.size = "tiny"             # tiny | small (CPU) | base | large (BEiT-3's; models/mmenc.py)
  pre.image_size = 32
  pre.patch_size = 8
  pre.max_text_len = 32
  pre.vocab_size = 2000         # upper bound on the ids of the tokenizer trained when data.tokenizer is ""
  pre.text_mask_ratio = 0.5
  pre.image_mask_ratio = 0.4
  pre.mlm_weight = 1.0
  pre.mim_weight = 1.0
  # ITC and the [CLS] bag of words are this project's extensions, not the paper's ICA (MLM + MIM only); a
  # paper-faithful run keeps both at 0
  pre.itc_weight = 0.0          # extension: image-text contrastive term
  pre.itc_temperature = 0.07    # InfoNCE temperature of the optional ITC term
  pre.cls_bow_weight = 0.0      # extension: the item's words predicted from the visual [CLS] state (losses/ica.py)
  pre.tie_mlm_head = True       # MLM logits from the token embedding matrix (False: a separate projection)
  pre.mim_target = "pixels"     # pixels (per-patch normalised, MAE-style) | raw_pixels
  pre.batch_size = 64
  pre.steps = 500
  pre.lr = 1e-3
  pre.warmup_steps = 50
  pre.weight_decay = 0.05
  pre.dropout = 0.0
  pre.vl_ffn_layers = 0         # top blocks with a vision-language FFN (not in the released BEiT-3 models)
  # dtype of the encoder's matrix products in training and extraction: float32 | bfloat16 (parameters, optimiser
  # state, LayerNorms, softmax and the losses stay float32); a resume must keep it
  pre.compute_dtype = "float32"
  # precision of float32 matrix products (training and extraction): highest | default. On GPU (TF32) and TPU (bf16
  # passes) JAX's default float32 product is of reduced precision; on CPU both are full float32
  pre.matmul_precision = "highest"
  pre.init_from = ""            # a converted BEiT-3 checkpoint (python -m alignrec_jax.convert_beit3) to start from
  pre.checkpoint_every = 100
  pre.log_every = 20
  pre.extract_batch_size = 128

  # ---------------------------------------------------------------- probe (intermediate evaluations)
  config.probe = probe = ml_collections.ConfigDict()
  probe.features = ()           # .npy files, stage-1 workdirs or random:<d>, each optionally 'name=spec' (probes.py)
  probe.classes = ("zero_shot", "item_cf")  # + "mask_modality" (trains stage 2 per table and variant, config.train)
  probe.mask_ratio = 0.5
  probe.mask_items = ""         # reuse another probe run's mask_items.npy ("" = draw from config.seed, save in workdir)
  probe.item_cf_k = 10
  probe.item_cf_shrink = 10.0
  return config



def shared_data_root(name: str) -> str:
  """<repository>/../shared/data/<name>: where the project's real data sets live beside the repository."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.normpath(os.path.join(repo, os.pardir, "shared", "data", name))
