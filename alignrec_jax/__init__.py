"""alignrec_jax: AlignRec (Liu et al., CIKM 2024) in JAX/Flax.

Where things live:
  data/        MMRec-format loading (mmrec.py), raw item content (content.py), the embedded synthetic set
               (synthetic.py), BPR sampling (sampler.py)
  models/      the three AlignRec modules: mmenc.py (MMEnc), aggregator.py, fuser.py; alignrec.py composes them
  losses/      one file per alignment: ica.py (stage 1), cca.py and uia.py (stage 2)
  graph.py     graph construction and the one propagation function (segment_sum)
  train/       pretrain.py (stage 1), recommend.py (stage 2), state.py (checkpoints), parallel.py (pmap)
  eval/        ranking.py (MMRec-exact full ranking), probes.py (the paper's intermediate evaluations)
  export.py    a trained run's vectors and top-k lists (the export stage) and `load_run`; recommend.py its CLI
"""

import os

__version__ = "0.1.0"

# XLA:CPU's YNNPACK fusion (jaxlib 0.10) merges a matmul with the reduction that consumes it into one kernel that
# runs 4-6x slower than the plain matmul (sum((X Xᵀ)²) at 2,048 x 4,096: 1.35 s vs 0.39 s on 2 cores), and the
# similarity-preserving loss and InfoNCE are exactly that pattern. Turning the fusion off must happen before JAX
# starts its backend, hence here; a user who sets the flag in XLA_FLAGS keeps their own value.
_NO_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_YNN_FUSION}".strip()


def __getattr__(name):
  """`alignrec_jax.load_run`, imported on first use (importing the package stays free of JAX)."""
  if name == "load_run":
    from alignrec_jax.export import load_run  # pylint: disable=g-import-not-at-top
    return load_run
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
