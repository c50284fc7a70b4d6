"""The command line: unknown config keys and bad stages fail clearly; the metrics table prints."""

import os
import subprocess
import sys

import pytest

from alignrec_jax import main as cli
from tests.conftest import REPO_ROOT


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "alignrec_jax.main", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, message", [
    ("--config.optim.nope=1", "unknown config key 'config.optim.nope' in '--config.optim.nope=1': optim has no 'nope'"),
    ("--config.optm.lr=1", "config has no 'optm' (known: data, eval,"),
    ("--config.optim.lr=abc", "could not convert string to float: 'abc'"),
])
def test_bad_overrides_fail_with_one_line(tmp_path, override, message):
  proc = _run_cli("--config=configs/default.py", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_unknown_stage(tmp_path):
  from configs import default
  config = default.get_config()
  config.stage = "finetune"
  with pytest.raises(ValueError, match="config.stage='finetune' is not one of"):
    cli.run(config, str(tmp_path))


def test_metrics_table():
  results = {"best_epoch": 3, "valid": {"recall@10": 0.1, "recall@20": 0.2}, "test": {"recall@10": 0.15,
                                                                                       "recall@20": 0.25}}
  table = cli.format_metrics_table(results).splitlines()
  assert table[0].split() == ["split", "recall@10", "recall@20"]
  assert table[2].split() == ["test", "0.1500", "0.2500"]
  results["test_cold"] = {"recall@10": 0.3, "recall@20": 0.4}
  table = cli.format_metrics_table(results).splitlines()
  assert table[3].split() == ["test_cold", "0.3000", "0.4000"] and len(table) == 4


def test_missing_data_is_one_clear_line(tmp_path):
  proc = _run_cli("--config=configs/lfm2k.py", f"--workdir={tmp_path}", "--config.stage=train",
                  f"--config.data.root={tmp_path / 'nowhere'}")
  assert proc.returncode != 0
  assert "error: interaction file not found:" in proc.stderr and "lfm2k.inter" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_missing_tokenizer_file_is_one_line_naming_the_key(tmp_path):
  from PIL import Image
  import numpy as np
  os.makedirs(tmp_path / "items" / "images")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "items" / "images" / "0.png")
  (tmp_path / "items" / "items.tsv").write_text("itemID\ttext\timage\n0\ta red item\timages/0.png\n")
  workdir = tmp_path / "run"
  proc = _run_cli("--config=configs/default.py", f"--workdir={workdir}", "--config.stage=pretrain",
                  "--config.data.synthetic=False", f"--config.data.root={tmp_path / 'items'}",
                  f"--config.data.tokenizer={tmp_path / 'beit3.spm'}")
  assert proc.returncode == 1
  assert (f"error: config.data.tokenizer={tmp_path / 'beit3.spm'}: sentencepiece tokenizer file not found"
          in proc.stderr.splitlines())
  assert "Traceback" not in proc.stderr
  assert not (workdir / "tokenizer.spm").exists() and not (workdir / "tfds").exists()


def _tiny(workdir, *overrides):
  return _run_cli("--config=tests/train/tiny_config.py", f"--workdir={workdir}", *overrides)


def _one_error_line(proc):
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("override, message", [
    ("--config.eval.valid_metric=recall@25", "config.eval.valid_metric='recall@25' has a cut-off (25) that "
                                             "eval.topk (5, 10, 20) does not evaluate"),
    ("--config.eval.topk=abc", "config.eval.topk=('abc',) must hold positive integers"),
    ("--config.stage=bogus", "config.stage='bogus' is not one of"),
    ("--config.train.divergence_factor=-1", "config.train.divergence_factor=-1.0 must be >= 0.0"),
])
def test_config_errors_are_one_line_before_any_data_loads(tmp_path, override, message):
  proc = _tiny(tmp_path / "run", f"--config.data.root={tmp_path / 'no_data'}", override)
  assert message in _one_error_line(proc)
  assert not (tmp_path / "run").exists()  # nothing written


def test_missing_config_and_bad_workdirs_are_one_line(tmp_path):
  proc = _run_cli("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert "error: config file not found: configs/nope.py" in _one_error_line(proc)
  (tmp_path / "file").write_text("")
  proc = _tiny(tmp_path / "file")
  assert f"--workdir={tmp_path / 'file'} is a file, not a directory" in _one_error_line(proc)
  proc = _tiny(tmp_path / "file" / "below")
  assert "cannot be created: Not a directory" in _one_error_line(proc)


def test_verbose_shows_the_traceback(tmp_path):
  proc = _tiny(tmp_path / "run", "--config.stage=bogus", "--verbose")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_second_process_on_a_busy_workdir_fails_at_once(tmp_path):
  from tests.train.test_workdir import _hold_lock_in_a_child
  child = _hold_lock_in_a_child(tmp_path)
  try:
    proc = _tiny(tmp_path, f"--config.data.root={tmp_path / 'no_data'}")
    assert f"is in use by pid {child.pid} on host" in _one_error_line(proc)
  finally:
    child.kill()
    child.wait()


def test_a_diverged_run_exits_1_leaves_no_workdir_and_outputs_are_group_readable(tmp_path):
  from tests.train.test_stage2 import write_dataset
  root = write_dataset(tmp_path / "data")
  proc = _tiny(tmp_path / "run", f"--config.data.root={root}", "--config.optim.lr=1e6")
  assert "error: the run diverged: epoch 0's mean loss" in _one_error_line(proc)
  # a run that fails before its first checkpoint leaves the workdir as it found it (here: absent)
  assert not (tmp_path / "run").exists()
  old = os.umask(0o022)
  try:
    from alignrec_jax.data import atomic
    atomic.write_json(str(tmp_path / "x.json"), {})  # the package's one writer (mkstemp underneath)
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "x.json").st_mode & 0o777 == 0o644
