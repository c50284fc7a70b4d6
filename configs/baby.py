"""Amazon Baby with the paper's settings: the same config as `configs/amazon.py:baby`, under the name the project's
entry command has always used.

  python -m alignrec_jax.main --config=configs/baby.py --workdir=/tmp/alignrec_baby
"""

from configs import amazon


def get_config():
  return amazon.get_config("baby")
