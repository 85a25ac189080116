"""ttt_jax/toy_job.py's host-device split (the job itself runs in tests/test_pipeline.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
_PROBE = ("import sys; from ttt_jax import toy_job; n = toy_job.split_host_cpu(int(sys.argv[1])); "
          "import jax; print(n, len(jax.devices('cpu')))")


def _probe(count: int, xla_flags: str | None) -> tuple[int, int]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _PROBE, str(count)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  set_count, devices = out.stdout.split()
  return int(set_count), int(devices)


@pytest.mark.parametrize("count", [2, 3])
def test_split_host_cpu_sets_the_device_count_before_jax_starts(count):
  assert _probe(count, None) == (count, count)


def test_split_host_cpu_keeps_a_count_xla_flags_already_sets():
  assert _probe(3, "--xla_force_host_platform_device_count=5") == (0, 5)


def test_split_host_cpu_is_a_no_op_once_a_backend_is_up():
  from ttt_jax import toy_job  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  before = os.environ.get("XLA_FLAGS")
  try:
    os.environ.pop("XLA_FLAGS", None)
    assert toy_job.split_host_cpu(4) == 0
    assert "XLA_FLAGS" not in os.environ
  finally:
    if before is not None:
      os.environ["XLA_FLAGS"] = before
