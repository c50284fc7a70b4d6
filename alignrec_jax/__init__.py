"""alignrec_jax: AlignRec (Liu et al., CIKM 2024) in JAX/Flax.

Where things live:
  data/        MMRec-format loading (mmrec.py), raw item content (content.py), the embedded synthetic set
               (synthetic.py), BPR sampling (sampler.py)
  models/      the three AlignRec modules: mmenc.py (MMEnc), aggregator.py, fuser.py; alignrec.py composes them
  losses/      one file per alignment: ica.py (stage 1), cca.py and uia.py (stage 2)
  graph.py     graph construction and the one propagation function (segment_sum)
  train/       pretrain.py (stage 1), recommend.py (stage 2), state.py (checkpoints), parallel.py (pmap)
  eval/        ranking.py (MMRec-exact full ranking), probes.py (the paper's intermediate evaluations)
"""

__version__ = "0.1.0"
