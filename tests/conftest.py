"""Test set-up: 8 fake CPU devices before JAX starts, so sharded code is tested on every run."""
import os
import tempfile

# Compile time dominates the suite on 2 cores: XLA:CPU's backend optimisation level 0 compiles the tiny test
# models about twice as fast (run time matters little at these sizes), its older loop emitters instead of the
# fusion emitters compile a tiny model's train step in 10-11 s instead of 14-15 s, and the 'rbg' key
# implementation avoids compiling threefry into every initialiser. Library behaviour is unchanged;
# subprocesses inherit all three.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same tiny models many times: a persistent compilation cache saves minutes on 2 cores.
# One folder per pytest-xdist worker: JAX writes cache entries without a lock, so two workers sharing a folder
# could read each other's half-written files.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "deeplab_jax_test_xla_cache" + os.environ.get("PYTEST_XDIST_WORKER", "")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from reference import SHARED_DATA  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: integration tests (whole runs, subprocesses); the quick loop is "
                          "`python -m pytest -m 'not slow'`, CI runs everything")


@pytest.fixture(scope="session")
def shared_data():
  """The read-only real data folder (`../shared/data` beside the checkout)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f"Real test data not found at {SHARED_DATA}: the checkout must sit beside shared/.")
  return SHARED_DATA
