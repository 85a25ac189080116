"""Test set-up: eight fake CPU devices for the sharding tests; an `x64` fixture."""
import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With the `tpu` extra installed, libtpu takes a process lockfile; parallel test workers (and the
# ahead-of-time TPU compile tests) must not collide on it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """float64 for golden vectors and finite differences; fp32 stays the default."""
  with jax.enable_x64(True):
    yield
