"""Command-line entry point.

  python -m alignrec_jax.main --config=configs/default.py --workdir=/tmp/alignrec
  python -m alignrec_jax.main --config=configs/lfm2k.py --workdir=/tmp/lfm2k --config.optim.lr=5e-4

`config.stage` picks the work:
  pretrain  stage 1: ICA pre-training of MMEnc on the items' images and texts
  extract   stage 1: run MMEnc over every item, write the feature table into the workdir
  train     stage 2: CCA + UIA training of the recommender, early stopping, test at the best valid epoch
  all       pretrain, extract, then train on the extracted features (each step skips work already done)
  probe     the paper's intermediate evaluations of one or more feature tables
  export    a finished stage-2 run's best epoch: user/item vectors, top-k lists, manifest in <workdir>/export/

An unknown `--config.*` key is an error, and every config value is checked before any data loads (train/checks.py).
Results go to `<workdir>/results.json`; rerunning the same command in the same workdir resumes from the newest intact
checkpoint. A workdir belongs to one run (train/workdir.py): it is locked while a stage runs, and a resume with other
settings (except `train.epochs`) is refused. Every error is one line on stderr and exit code 1; `--verbose` shows
the traceback. SIGTERM or SIGINT during training stops after the current step with a checkpoint, one line on stderr
and exit code 75 (train/preemption.py); the same command resumes.
"""

import importlib.util
import json
import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alignrec_jax import export
from alignrec_jax.data.mmrec import HELD_OUT_SPLITS
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError
from alignrec_jax.train import checks
from alignrec_jax.train import distributed
from alignrec_jax.train import preemption
from alignrec_jax.train import pretrain
from alignrec_jax.train import probe
from alignrec_jax.train import stage2
from alignrec_jax.train import state as state_lib
from alignrec_jax.train import workdir as workdir_lib


def define_flags() -> None:
  """The command line's flags; defined only when main.py runs as the program, so that importing this module (tests,
  other entry points such as compare.py that define their own --config) adds no flags."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-process runs: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
  flags.DEFINE_bool("verbose", False, "Show the traceback of an error (by default: one line on stderr).")
  flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO lines of orbax and tfds (several per checkpoint); their warnings and errors still show."""
  _NOISY = (os.sep + "orbax" + os.sep, os.sep + "tensorflow_datasets" + os.sep)

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(part in record.pathname for part in self._NOISY)


def _initialise_jax(config) -> None:
  """Process-level JAX set-up: the persistent compilation cache (cuts the start-up of repeated runs)."""
  cache = os.environ.get("ALIGNREC_JAX_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "alignrec_jax", "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX %s, backend %s, %d local device(s): %s", jax.__version__, jax.default_backend(),
               jax.local_device_count(), jax.local_devices())
  del config


def format_metrics_table(results: dict, keys=("recall", "ndcg", "precision", "map")) -> str:
  """The final metrics as a fixed-width table: one row per split, one column per metric@K."""
  splits = [s for s in HELD_OUT_SPLITS if isinstance(results.get(s), dict)]
  if not splits:
    return ""
  columns = [c for c in results[splits[0]] if c.split("@")[0] in keys]
  width = max(11, *(len(c) + 1 for c in columns))
  label = max(7, *(len(s) + 1 for s in splits))
  lines = ["split".ljust(label) + "".join(c.rjust(width) for c in columns)]
  for split in splits:
    lines.append(split.ljust(label) + "".join(f"{results[split].get(c, float('nan')):{width}.4f}" for c in columns))
  return "\n".join(lines)


def _all(config, workdir: str) -> dict:
  """Stage 1 (pretrain, extract), then stage 2 on the extracted table. Both stages' checks and records come first,
  so that a stage-2 setting that cannot work, or that differs from the workdir's checkpoints, fails before stage 1
  spends its hours."""
  checks.check_stage1(config)
  stage2_config = stage2.after_stage1(config, workdir)
  checks.check_stage2(stage2_config)
  records = [(config, pretrain.checkpoint_dir(workdir), 1), (stage2_config, stage2.checkpoint_dir(workdir), 2)]
  with workdir_lib.claimed(config, workdir, records, distributed.is_main_process()):
    pretrain.pretrain(config, workdir)
    pretrain.extract(config, workdir)
    return stage2.run(stage2_config, workdir)


# config.stage -> (the function that runs it, whether it writes <workdir>/results.json); each function checks the keys
# it reads and claims the workdir (train/workdir.py) before any data loads
STAGES = {
    "pretrain": (pretrain.pretrain, False),
    "extract": (pretrain.extract, False),
    "train": (stage2.run, True),
    "all": (_all, True),
    "probe": (probe.run, True),
    "export": (export.run, False),  # writes <workdir>/export/; results.json stays the trained run's
}


def run(config, workdir: str) -> dict:
  """Runs `config.stage` in `workdir`; returns its results dict (also in <workdir>/results.json), {} for a stage that
  writes none."""
  if config.stage not in STAGES:
    raise ConfigError(f"config.stage={config.stage!r} is not one of {tuple(STAGES)}")
  _initialise_jax(config)
  stage, writes_results = STAGES[config.stage]
  results = stage(config, workdir)
  return results if writes_results else {}


def _config_arg(argv) -> tuple[str, str]:
  """(config file, the argument after its ':') of the --config flag in argv; ('', '') without one."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  path, _, arg = spec.partition(":")
  return path, arg


def _unknown_override(argv) -> str:
  """The first `--config.a.b=...` override whose key the config file does not define ('' if none)."""
  path, arg = _config_arg(argv)
  if not path:
    return ""
  spec = importlib.util.spec_from_file_location("_alignrec_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node.keys():
        parent = ".".join(key.split(".")[:i]) or "config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
        return f"unknown config key 'config.{key}' in {arg!r}: {parent} has no {part!r} (known: {known})"
      node = node[part]
  return ""


def parse_flags(argv):
  """absl flag parsing that turns a bad config file or an unknown --config.* key into one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.IllegalFlagValueError, flags.Error) as e:
    try:
      reason = _unknown_override(argv)
    except Exception as config_error:  # the config file itself is broken: its own message, last line only
      lines = [line for line in str(config_error).splitlines() if line.strip()]
      reason = lines[-1] if lines else type(config_error).__name__
      path = _config_arg(argv)[0]
      reason = reason if path in reason else f"{path}: {reason}"
    sys.exit(f"error: {reason or _one_line(e)}")


def _user_errors() -> tuple:
  """Exception types whose message is the whole story for a user: bad input, a busy workdir, a diverged or NaN run
  (the loop's FloatingPointErrors), the machine's own limits (OSError: a full disk, a missing permission). Anything
  else is a bug: it prints its type and points at --verbose."""
  return (DataError, ConfigError, export.RunError, workdir_lib.WorkdirError, state_lib.CheckpointError,
          FloatingPointError, OSError)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  FLAGS = flags.FLAGS
  try:
    _main(FLAGS)
  except preemption.Preempted as e:  # not an error: the run checkpointed and the same command resumes it
    if FLAGS.verbose:
      raise
    print(f"preempted: {_one_line(e)}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
  except Exception as e:  # every user-facing error: one line on stderr, exit 1; --verbose adds the traceback
    if FLAGS.verbose:
      raise
    if isinstance(e, _user_errors()):
      sys.exit(f"error: {_one_line(e)}")
    sys.exit(f"error: {type(e).__name__}: {_one_line(e)} (rerun with --verbose for the traceback)")


def _main(FLAGS) -> None:
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  main_process = distributed.is_main_process()
  if not main_process:  # every process runs the same loop: process 0's log and table speak for all of them
    logging.set_verbosity(logging.WARNING)
  try:
    config = FLAGS.config
    config.keys()  # the config file is loaded here, at the first access of its contents
  except Exception as e:
    path, arg = _config_arg(sys.argv)
    spec = f"{path}:{arg}" if arg else path
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f"config file not found: {spec}") from None
    raise ConfigError(f"config file {spec} cannot be loaded: {type(e.__cause__ or e).__name__}: "
                      f"{_one_line(e.__cause__ or e)}") from e
  workdir = os.path.expanduser(FLAGS.workdir)
  results = run(config, workdir)
  table = format_metrics_table(results) if main_process else ""
  if table:
    best = results.get("best_epoch")
    print(f"\nbest epoch {best} (selected on valid {config.eval.valid_metric})\n{table}")
  if config.stage == "export" and main_process:
    print(f"export: {os.path.join(workdir, 'export')} (files described in docs/formats.md)")
  if results and main_process:
    print(f"results: {os.path.join(workdir, 'results.json')}")
    sys.stdout.flush()
  summary = {k: results[k] for k in ("best_epoch", "test") if k in results}
  if summary:  # a training run's; a probe's results are its table (probes.format_probe_table, logged above)
    logging.info("results: %s", json.dumps(summary))


if __name__ == "__main__":
  distributed.configure_xla()  # before JAX starts its backend (at the first computation)
  define_flags()
  app.run(main, flags_parser=parse_flags)
