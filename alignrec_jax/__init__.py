"""alignrec_jax: AlignRec (Liu et al., CIKM 2024) in JAX/Flax.

Where things live:
  data/        MMRec-format loading (mmrec.py), raw item content (content.py), the embedded synthetic set
               (synthetic.py), BPR sampling (sampler.py)
  models/      the three AlignRec modules: mmenc.py (MMEnc), aggregator.py, fuser.py; alignrec.py composes them
  losses/      one file per alignment: ica.py (stage 1), cca.py and uia.py (stage 2)
  graph.py     graph construction and the one propagation function (segment_sum)
  train/       loop.py (the one training loop), pretrain.py (stage 1), stage2.py (stage 2), state.py
               (checkpoints), parallel.py (pmap)
  eval/        ranking.py (MMRec-exact full ranking), evaluators.py (config.evals), probes.py (the paper's
               intermediate evaluations)
  export.py    a trained run's vectors and top-k lists (the export stage) and `load_run`; recommend.py its CLI
docs/architecture.md shows how data flows through both stages. Importing the package sets nothing: the entry points
set the process's XLA flags (train/distributed.configure_xla).
"""

__version__ = "0.1.0"


def __getattr__(name):
  """`alignrec_jax.load_run`, imported on first use (importing the package stays free of JAX)."""
  if name == "load_run":
    from alignrec_jax.export import load_run  # pylint: disable=g-import-not-at-top
    return load_run
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
