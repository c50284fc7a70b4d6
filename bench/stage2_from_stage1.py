"""Does stage 2 gain from ICA pre-training? AlignRec on pre-trained vs random-init MMEnc features vs ID-only LightGCN.

  python bench/stage1_quality.py --config=configs/ml100k_posters.py --workdir=/tmp/stage1_quality   # stage 1 twice
  python bench/stage2_from_stage1.py --config=configs/ml100k_posters.py --stage1=/tmp/stage1_quality \
      --workdir=/tmp/stage2_from_stage1 --seeds=3

Three arms under one protocol (the config's stage-2 settings, data, splits, sampler, evaluation; seeds config.seed,
config.seed + 1, ...), each an `alignrec_jax.compare` run in <workdir>/<arm>/:
  pretrained        AlignRec on the feature table of <stage1>/pretrained (ICA pre-training, config.pretrain.steps)
  random_init       AlignRec on the feature table of <stage1>/random (the same encoder at its initialisation)
  lightgcn_id_only  LightGCN with the same settings and no features
Finished runs are reused and interrupted ones resume from their checkpoints, so the command can be re-run until it
completes. Prints the merged table (test metrics at the best valid epoch, mean ± sample std over seeds) and ends
with ONE JSON line: {arm: {"test_recall@20_mean", "test_recall@20_std", "test_recall@20_values"}, ...}.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

# compare's own flags (--config, --workdir, --seeds, and --config.* overrides) serve here too; --models is not used
from alignrec_jax import compare  # noqa: E402
from alignrec_jax.data import mmrec  # noqa: E402
from alignrec_jax.data import atomic  # noqa: E402

compare.define_flags()
_STAGE1 = flags.DEFINE_string("stage1", None, "bench/stage1_quality.py workdir (holds pretrained/ and random/)")
flags.mark_flags_as_required(["stage1"])


def arms(stage1: str) -> list:
  """(arm name, model, stage-1 workdir or "" for no features)."""
  return [("pretrained", "alignrec", os.path.join(stage1, "pretrained")),
          ("random_init", "alignrec", os.path.join(stage1, "random")),
          ("lightgcn_id_only", "lightgcn", "")]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS["models"].present:
    raise app.UsageError("--models is not used here: the arms are fixed (see the module docstring)")
  stage1, workdir = os.path.expanduser(_STAGE1.value), os.path.expanduser(flags.FLAGS.workdir)
  for _, _, source in arms(stage1):
    if source and not os.path.isdir(source):
      raise FileNotFoundError(f"--stage1={stage1}: {source} is missing; run bench/stage1_quality.py first")
  merged = {"dataset": flags.FLAGS.config.data.name, "metrics": list(compare.TABLE_METRICS), "models": {}}
  for arm, model, source in arms(stage1):
    config = flags.FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
      config.stage = "train"
      config.data = mmrec.interactions_only(config.data)  # the arm's features come from stage 1 or not at all
      config.data.features_from = source
    result = compare.compare(config, [model], flags.FLAGS.seeds, os.path.join(workdir, arm))
    merged["models"][arm] = result["models"][model]
  table = compare.markdown_table(merged)
  atomic.write_text(os.path.join(workdir, "stage2_from_stage1.md"),
                    f"# {merged['dataset']}: stage 2 on stage-1 features, test at the best valid epoch\n\n{table}")
  print("\n" + table)
  summary = {arm: {f"test_recall@20_{k}": entry["test"]["recall@20"][k] for k in ("mean", "std", "values")}
             for arm, entry in merged["models"].items()}
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
