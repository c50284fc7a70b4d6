"""The config files: the paper's Amazon sets are one config parameterised after the colon; the cold variants."""

import pytest

from alignrec_jax.train import checks
from configs import amazon
from configs import lfm2k
from configs import lfm2k_cold
from configs import ml100k_posters
from configs import ml100k_posters_cold


@pytest.mark.parametrize("name", ["baby", "sports", "elec"])
def test_amazon_config_reads_the_set_named_after_the_colon(name):
  config = amazon.get_config(name)
  assert (config.data.name, config.data.root, config.optim.lr) == (name, f"data/{name}", 5e-4)
  assert config.data.image_feat.endswith(f"/{name}_beit3_128token_add_title_brand_to_text/image_feat.npy")
  for arg in ("", "toys"):
    with pytest.raises(ValueError, match=r"one of baby, sports, elec \(e.g. --config=configs/amazon.py:baby\)"):
      amazon.get_config(arg)


def test_the_entry_commands_baby_config_is_amazon_baby():
  from configs import baby
  assert baby.get_config().to_dict() == amazon.get_config("baby").to_dict()


def test_the_cold_configs_are_their_datasets_config_with_held_out_items_and_the_neighbour_rule():
  for plain, cold in ((lfm2k, lfm2k_cold), (ml100k_posters, ml100k_posters_cold)):
    expected = plain.get_config()
    expected.data.cold_items, expected.model.cold_start = 0.2, "neighbours"
    assert cold.get_config().to_dict() == expected.to_dict()
    checks.check_stage2(cold.get_config())


@pytest.mark.parametrize("key, value", [("compute_dtype", "float16"), ("matmul_precision", "high")])
def test_a_stage1_arithmetic_outside_its_choices_fails_in_one_line_naming_the_key(key, value):
  from configs import base
  config = base.get_base_config()
  checks.check_stage1(config)  # the defaults pass
  config.pretrain[key] = value
  with pytest.raises(ValueError, match=rf"^config.pretrain.{key}='{value}' must be one of \(") as e:
    checks.check_stage1(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, why", [
    ("train.divergence_growth", 0.5, "must be 0 \\(off\\) or above 1"),
    ("train.divergence_growth", -1.0, "must be >= 0"),
    ("model.propagation", "dense", "must be one of \\("),
    ("model.embedding_size", 0, "must be >= 1")])
def test_a_stage2_value_outside_its_range_fails_in_one_line_naming_the_key(key, value, why):
  config = lfm2k.get_config()
  checks.check_stage2(config)  # the shipped config passes
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=rf"^config.{key}={value!r} {why}") as e:
    checks.check_stage2(config)
  assert "\n" not in str(e.value)
