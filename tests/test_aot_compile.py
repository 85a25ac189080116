"""`python -m ttt_jax.plan` compiles the train step for a TPU slice on this CPU host (libtpu as a
compiler only; skipped without the "tpu" extra)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_runlocal_bf16_for_a_v5p_8():
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Global batch 8 over fsdp=4 with grad_accum_steps=0: 2 micro-batches of one sample a chip.
  out = subprocess.run(
      [sys.executable, "-m", "ttt_jax.plan", "--config=configs/tomjerry_3s.py:runlocal,bf16",
       "--topology=v5p-8", "--mesh.fsdp=4", "--remat=save_dots", "--config.train.batch_size=8",
       "--config.train.grad_accum_steps=0"],
      cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("params", "trainable_params", "devices", "mesh", "per_device_bytes", "hbm_bytes",
              "fits", "flops_per_step", "compile_seconds"):
    assert key in r, key
  assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
  assert r["fits"] and r["hbm_bytes"] == 95 * 2**30 and r["topology"] == "v5p-8"
  assert r["grad_accum_steps"] == 2 and r["remat"] == "save_dots" and r["dtype"] == "bfloat16"
  assert r["params"] == r["trainable_params"] > 0   # stage 1 trains everything
  # Arguments per chip hold at least a quarter of the float32 parameters and their two AdamW
  # moments (sharded at most 4 ways). No tight upper bound at this size: TPU layouts pad small
  # arrays to (8, 128) tiles (807 kB here for 724 kB of state).
  assert 3 * 4 * r["params"] / 4 <= r["argument_bytes"] < 2 * 3 * 4 * r["params"] / 4 + 2**20
  assert r["per_device_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                   - r["alias_bytes"])
  assert r["flops_per_step"] > 0 and r["compile_seconds"] > 0


def test_plan_refuses_a_batch_that_would_be_replicated():
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "ttt_jax.plan", "--config=configs/tomjerry_3s.py:runlocal,bf16",
       "--topology=v5p-8", "--mesh.fsdp=4"],
      cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "python -m ttt_jax.plan: error: config.train.batch_size=2 in 1 micro-batch(es) "
      "(train.grad_accum_steps) of 2 does not split over data x fsdp = 4 devices: the batch "
      "would be replicated; make the micro-batch a multiple of 4")


def _v5p_8_mesh(**axes):
  """A data x tensor mesh over the 4 compile-only chips of a v5p-8."""
  pytest.importorskip("libtpu")
  from ttt_jax import plan  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  return make_mesh(devices=plan.topology_devices("v5p-8"), **axes)


def _mosaic_kernels(compiled) -> int:
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def test_sharded_pallas_ttt_layer_compiles_for_a_v5p_8():
  """The Mosaic TTT kernels, forward and backward, of TTTLayer(impl="pallas") inside
  mesh.sequence_to_heads' shard_map over batch and heads; the CPU host picks Mosaic (not the
  interpreter) from the mesh's devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ttt_jax.mixers.ttt import TTTLayer  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  mesh = _v5p_8_mesh(data=2, tensor=2)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: TTTLayer(
      256, 4, inner="mlp", impl="pallas", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
  sds = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
  state = jax.tree.map(lambda a: sds(a, P()), state)
  x = sds(jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16), P("data"))

  def grads(state, x):
    with activation_rules(mesh):
      loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x).astype(jnp.float32) ** 2)
      return jax.grad(loss, argnums=(0, 1))(state, x)

  compiled = jax.jit(grads).lower(state, x).compile()
  assert _mosaic_kernels(compiled) == 2   # the forward and the backward kernel


def test_splash_attention_compiles_for_a_v5p_8():
  """Splash, forward and backward, inside the shard_map; 600 tokens pad to 1024 (2 x 2 tiles of
  512) with the padded keys masked; head_dim 64 as CogVideoX's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.layers import splash_attention  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  mesh = _v5p_8_mesh(data=2, tensor=2)
  x = jax.ShapeDtypeStruct((4, 600, 4, 64), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data", None, "tensor")))

  def grads(q, k, v):
    with activation_rules(mesh):
      loss = lambda *a: jnp.sum(splash_attention(*a).astype(jnp.float32) ** 2)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  compiled = jax.jit(grads).lower(x, x, x).compile()
  assert _mosaic_kernels(compiled) == 3   # forward, dq and dkv kernels


def test_plan_runlocal_with_pallas_ttt_and_splash_for_a_v5p_8():
  """The DiT train step with impl="pallas" and splash attention on fsdp=2 x tensor=2: the Mosaic
  kernels (not the interpreter) in the sharded step."""
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "ttt_jax.plan", "--config=configs/tomjerry_3s.py:runlocal,bf16",
       "--topology=v5p-8", "--mesh.fsdp=2", "--mesh.tensor=2", "--remat=save_dots",
       "--config.train.batch_size=4", "--config.model.mixer_options.impl=pallas",
       "--attention=splash"],
      cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["attention"] == "splash" and r["fits"]
  assert r["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 2}
  # Splash's forward, dq and dkv kernels and the TTT forward and backward kernels, at least.
  assert r["mosaic_kernels"] >= 5, r
