"""Mesh and logical rules on 8 fake CPU devices: sharded results equal unsharded ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import (activation_sharding, logical_to_spec, make_mesh, shard_module)
from ttt_jax.ttt import TTTLayer


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_make_mesh_sizes_and_errors():
  mesh = make_mesh(data=-1, tensor=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices"):
    make_mesh(data=3, tensor=2)
  with pytest.raises(ValueError, match="at most one"):
    make_mesh(data=-1, tensor=-1)


def test_logical_to_spec_rules():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  assert logical_to_spec(("embed", "heads"), (64, 32), mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("batch", "length", "embed"), (4, 16, 64), mesh) == P(
      ("data", "fsdp"), None, None)  # fsdp already taken by batch: embed replicated
  assert logical_to_spec(("heads", None, None), (3, 8, 8), mesh) == P(None, None, None)  # 3 % 2
  assert logical_to_spec(None, (3,), mesh) == P()


def test_sharded_ttt_layer_matches_single_device():
  layer = TTTLayer(64, 4, inner="mlp", mini_batch_size=8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 64))
  want = layer(x)

  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  shard_module(layer, mesh)
  assert layer.wq.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert layer.inner_weights["W1"][...].sharding.spec == P("tensor", None, None)
  xs = jax.device_put(x, activation_sharding(mesh, ("batch", "length", "embed"), x.shape))
  got = nnx.jit(lambda m, x: m(x))(layer, xs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
