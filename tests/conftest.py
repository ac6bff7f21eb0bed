"""Test set-up: 8 fake CPU devices before JAX starts, so sharded code is tested on every run."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The read-only real data folder (`../shared/data` beside the checkout)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f"Real test data not found at {SHARED_DATA}: the checkout must sit beside shared/.")
  return SHARED_DATA
