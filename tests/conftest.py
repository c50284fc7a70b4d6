"""Test-session set-up: 4 forced CPU devices (for the pmap tests) and JAX's persistent compilation cache.

Both must be set before JAX initialises its backend, which is why they live here and not in the tests.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # `configs` is imported by path-loaded config files

from alignrec_jax.train import distributed  # noqa: E402  (imports no JAX)

distributed.configure_xla()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "ALIGNREC_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "alignrec_jax", "jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_data_dir(name: str) -> str:
  """Path of a real data set in ../shared/data, or skip the test with the reason."""
  path = os.path.join(SHARED_DATA, name)
  if not os.path.isdir(path):
    pytest.skip(f"real data set {name!r} not found at {path} (it lives in ../shared/data beside the repository; "
                "CI has it)")
  return path
