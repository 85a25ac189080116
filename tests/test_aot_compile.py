"""bench/aot_compile.py compiles the train step for a TPU slice on this CPU host (libtpu as a
compiler only; skipped without the "tpu" extra)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_compile_runlocal_bf16_for_a_v5p_8():
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "bench/aot_compile.py", "--config=configs/tomjerry_3s.py:runlocal,bf16",
       "--topology=v5p-8", "--config.mesh.data=1", "--config.mesh.fsdp=4"],
      cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["devices"] == 4 and r["mesh"]["fsdp"] == 4 and r["fits"]
  assert r["params"] == r["trainable_params"] > 0   # stage 1 trains everything
  # Arguments per chip hold at least a quarter of the float32 parameters and their two AdamW
  # moments (sharded at most 4 ways). No tight upper bound at this size: TPU layouts pad small
  # arrays to (8, 128) tiles (807 kB here for 724 kB of state).
  assert 3 * 4 * r["params"] / 4 <= r["argument_bytes"]
  assert r["per_device_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                   - r["alias_bytes"])
  assert r["flops_per_step"] > 0
