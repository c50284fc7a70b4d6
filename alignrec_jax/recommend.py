"""Recommendations of a trained run, printed for a person to read.

  python -m alignrec_jax.recommend --workdir=/tmp/lfm2k --user=42 --k=10
  python -m alignrec_jax.recommend --workdir=/tmp/lfm2k --item=7 --k=10      # the items most like item 7
  python -m alignrec_jax.recommend --workdir=/tmp/lfm2k --add_items=new.npy --user=42 --k=10
  python -m alignrec_jax.recommend --workdir=/tmp/ml100k_posters --add_items=new_items.tsv --user=42 --k=10

--add_items adds new items, ids after the run's own, scored by the neighbour rule (alignrec_jax/models/new_items.py);
the list then ranks them with the rest. FILE is the rows of an [n, d] .npy feature file (the run's feature slot) or,
for a run whose features came from stage 1, a .tsv in the items.tsv layout (itemID, text, image), encoded by that
stage-1 encoder as its extraction encoded the run's own items.
Nothing in the workdir changes, unless --save writes the vectors and top-k lists with the new items into a new
folder <workdir>/export_added_<n_items>/ beside export/ (atomically; export/ stays as it is).

The list is ranked as evaluation ranks (the dot product of the best epoch's user and item vectors, the user's train
items left out unless --show_seen); each line gives the rank, the item id, the score and the item's text when the
data has an item table (config.export.item_table; lfm2k: the artist's name). The vectors come from the workdir's
export/ (the export stage) or, when there is none, from its best checkpoint. This is the command-line face of
`alignrec_jax.export.load_run` (not to be confused with alignrec_jax/train/stage2.py, the stage-2 trainer).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from alignrec_jax.data.mmrec import DataError
from alignrec_jax.train import distributed

_TEXT_WIDTH = 70  # characters of item text per line (items.tsv texts can be long)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A finished stage-2 run (python -m alignrec_jax.main ... --workdir=W).")
  flags.DEFINE_integer("user", None, "User id (MMRec userID) to recommend for.")
  flags.DEFINE_integer("item", None, "Item id (MMRec itemID): list the items whose vectors are most like its.")
  flags.DEFINE_integer("k", 10, "How many items to list.")
  flags.DEFINE_bool("show_seen", False, "Also rank the user's train items (evaluation leaves them out).")
  flags.DEFINE_string("add_items", None, "New items, added (ids after the run's own) before ranking: an [n, d] .npy of "
                      "their features in the run's feature slot, or a .tsv in the items.tsv layout for a run whose "
                      "features came from stage 1; the workdir is not changed.")
  flags.DEFINE_bool("save", False, "With --add_items: also write the run's vectors and top-k lists with the new items "
                    "into <workdir>/export_added_<n_items>/ beside export/ (atomically).")
  flags.mark_flag_as_required("workdir")


def _short(text) -> str:
  if text is None:
    return ""
  text = " ".join(str(text).split())
  return text if len(text) <= _TEXT_WIDTH else text[:_TEXT_WIDTH - 3] + "..."


def format_list(run, ids, scores, title: str) -> str:
  """A numbered table: rank, itemID, score and the item text when the run has an item table."""
  lines = [title, f"{'rank':>4}  {'itemID':>7}  {'score':>9}  item"]
  for rank, (item, score) in enumerate(zip(ids, scores), start=1):
    if item < 0:  # fewer unseen items than k
      break
    lines.append(f"{rank:>4}  {int(item):>7}  {float(score):>9.4f}  {_short(run.item_text(int(item)))}")
  return "\n".join(lines)


def _read_npy(path: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alignrec_jax import export  # pylint: disable=g-import-not-at-top
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise export.RunError(f"--add_items={path}: not a readable .npy array ({e})") from None


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if (FLAGS.user is None) == (FLAGS.item is None):
    sys.exit("error: give exactly one of --user=ID (recommendations) or --item=ID (similar items)")
  if FLAGS.save and not FLAGS.add_items:
    sys.exit("error: --save writes the run with the items of --add_items: give --add_items=FILE")
  logging.set_verbosity(logging.WARNING)
  from alignrec_jax import export  # pylint: disable=g-import-not-at-top  (JAX: keeps --help fast)
  try:
    run = export.load_run(FLAGS.workdir)
    if FLAGS.add_items:
      if FLAGS.add_items.endswith(".tsv"):
        new = run.add_items(items=FLAGS.add_items)
      else:
        new = run.add_items(features=_read_npy(FLAGS.add_items))
      print(f"added {len(new)} new items from {FLAGS.add_items} as item ids {new[0]}..{new[-1]}")
      if FLAGS.save:
        print(f"wrote {run.save_export()}")
    about = (f"{run.config.data.name}, model {run.config.model.name}, best epoch {run.best_epoch} "
             f"(valid {run.results.get('valid_metric', 'recall@20')} "
             f"{run.results['valid'].get(run.results.get('valid_metric', 'recall@20'), float('nan')):.4f})")
    if FLAGS.user is not None:
      ids, scores = run.recommend(FLAGS.user, k=FLAGS.k, exclude_seen=not FLAGS.show_seen)
      seen = len(run.train_items(FLAGS.user))
      note = f"{seen} train items included" if FLAGS.show_seen else f"its {seen} train items left out"
      print(format_list(run, ids, scores, f"Top {FLAGS.k} for user {FLAGS.user} ({note}); {about}"))
    else:
      ids, scores = run.similar_items(FLAGS.item, k=FLAGS.k)
      name = _short(run.item_text(FLAGS.item))
      print(format_list(run, ids, scores, f"{FLAGS.k} items most like item {FLAGS.item}"
                        + (f" ({name})" if name else "") + f" by cosine of the item vectors; {about}"))
  except (export.RunError, DataError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  distributed.configure_xla()  # before JAX starts its backend
  define_flags()
  app.run(main)
