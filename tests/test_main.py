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
