"""The config files: the paper's Amazon sets are one config parameterised after the colon."""

import pytest

from configs import amazon


@pytest.mark.parametrize("name", ["baby", "sports", "elec"])
def test_amazon_config_reads_the_set_named_after_the_colon(name):
  config = amazon.get_config(name)
  assert (config.data.name, config.data.root) == (name, f"data/{name}")
  assert config.data.image_feat == (f"../beit3_128token_add_title_brand_to_text/{name}_beit3_128token_add_title_brand_"
                                    "to_text/image_feat.npy")
  assert config.optim.lr == 5e-4


@pytest.mark.parametrize("arg", ["", "toys"])
def test_amazon_config_without_a_known_set_names_the_choices(arg):
  with pytest.raises(ValueError, match=r"one of baby, sports, elec \(e.g. --config=configs/amazon.py:baby\)"):
    amazon.get_config(arg)
