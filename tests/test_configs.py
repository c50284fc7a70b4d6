"""The config files: the paper's Amazon sets are one config parameterised after the colon."""

import pytest

from configs import amazon


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
