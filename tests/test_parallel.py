"""Mesh and logical rules on 8 fake CPU devices: sharded results equal unsharded ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import (activation_sharding, logical_to_spec, make_mesh, shard_module)
from ttt_jax.mixers import TTTLayer


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


def _small_dit(mixer="none"):
  from ttt_jax.models.dit import DiT, DiTConfig  # pylint: disable=g-import-not-at-top
  cfg = DiTConfig(num_heads=2, head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                  text_embed_dim=32, time_embed_dim=16, sample_height=4, sample_width=6,
                  max_text_seq_length=18, mixer=mixer)
  return DiT(cfg, rngs=nnx.Rngs(0))


def test_constrain_is_live_only_under_activation_rules():
  from ttt_jax.parallel import activation_rules, constrain  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(data=1, context=8)
  x = jnp.ones((2, 16, 4))
  names = ("activation_batch", "activation_length", "activation_embed")
  assert constrain(x, names) is x
  with activation_rules(mesh):
    y = jax.jit(lambda x: constrain(x * 2, names))(x)
  assert y.sharding.spec == P(None, "context")


def test_context_parallel_dit_shards_the_residual_stream():
  """On context=8 the compiled forward holds [batch, seq/8, width] per device and communicates;
  without the rules XLA keeps the whole stream on every device. Same numbers either way."""
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  model = _small_dit()
  graphdef, state = nnx.split(model)
  # 1 segment: 18 text tokens + 13 frames x 6 tokens = 96 = 8 x 12.
  latents = jax.random.normal(jax.random.key(1), (2, 13, 4, 4, 6))
  text = jax.random.normal(jax.random.key(2), (2, 1, 18, 32))
  t = jnp.array([3, 700])
  mesh = make_mesh(data=1, context=8)

  def forward(state, latents, text, t):
    return nnx.merge(graphdef, state)(latents, text, t)

  def live(state, latents, text, t):
    with activation_rules(mesh):
      return forward(state, latents, text, t)

  width = 32
  hlo = {}
  for name, fn in (("dead", forward), ("live", live)):
    hlo[name] = jax.jit(fn).lower(state, latents, text, t).compile().as_text()
  local = f"f32[2,12,{width}]"
  assert local in hlo["live"] and local not in hlo["dead"]
  assert any(op in hlo["live"] for op in ("all-gather", "all-to-all", "collective-permute",
                                          "all-reduce"))
  np.testing.assert_allclose(jax.jit(live)(state, latents, text, t),
                             forward(state, latents, text, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes", [dict(data=1, context=4, tensor=2),
                                  dict(data=1, fsdp=4, context=2)])
def test_context_parallel_train_steps_match_one_device(axes, tmp_path):
  """runlocal 3 s (TTT-MLP, 96 tokens): two steps with the sequence split over context give
  the one-device losses."""
  from configs import tomjerry_3s  # pylint: disable=g-import-not-at-top
  from tests.test_training_loop import FakeLoader, _losses  # pylint: disable=g-import-not-at-top
  from ttt_jax import training  # pylint: disable=g-import-not-at-top
  c = tomjerry_3s.get_config("runlocal")
  c.train.update(dict(steps=2, checkpoint_every=2, batch_size=4))
  training.train(c, str(tmp_path / "one"), loader=FakeLoader(c),
                 mesh=make_mesh(devices=jax.devices()[:1]))
  training.train(c, str(tmp_path / "sharded"), loader=FakeLoader(c), mesh=make_mesh(**axes))
  np.testing.assert_allclose([l for _, l in _losses(tmp_path / "sharded")],
                             [l for _, l in _losses(tmp_path / "one")], rtol=1e-5)


@pytest.mark.parametrize("axes", [dict(data=2, tensor=4), dict(data=1, fsdp=4, tensor=2),
                                  dict(data=1, context=2, tensor=4)])
def test_sharded_pallas_ttt_scan_matches_unsharded(axes):
  """impl="pallas" (interpreted) under activation_rules runs inside a shard_map over batch and
  heads and gives the unsharded outputs and gradients; the per-head W0 and LayerNorm, shared by
  the batch, get their gradient summed over the batch shards. context=2 splits nothing here:
  its devices repeat the same blocks."""
  from ttt_jax.mixers.ttt import sharded_ttt_scan  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  from ttt_jax.ttt import inner as inner_lib  # pylint: disable=g-import-not-at-top
  batch, heads, seq, d = 4, 4, 24, 8
  keys = jax.random.split(jax.random.key(0), 5)
  params = inner_lib.init_params("mlp", keys[0], heads, d)
  params = {k: v + 0.1 * jax.random.normal(keys[4], v.shape) for k, v in params.items()}
  xq, xk, xv = (jax.random.normal(k, (batch, heads, seq, d)) for k in keys[1:4])
  eta = jax.random.uniform(keys[4], (batch, heads, seq), maxval=0.2)
  args = (params, xq, xk, xv, eta)

  def loss(*args):
    # A cotangent on z and on the final weights, so both backward paths are checked.
    z, final = sharded_ttt_scan("mlp", *args, mini_batch_size=8, impl="pallas",
                                checkpoint_group_size=2)
    return jnp.sum(jnp.sin(z)) + sum(jnp.sum(jnp.cos(w)) for w in final.values()), (z, final)

  grads = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)
  (_, want), want_grads = jax.jit(grads)(*args)
  mesh = make_mesh(**axes)

  def sharded(*args):
    with activation_rules(mesh):
      return grads(*args)

  assert "shard_map" in str(jax.make_jaxpr(sharded)(*args))
  (_, got), got_grads = jax.jit(sharded)(*args)
  for g, w in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sharded_splash_attention_matches_unsharded():
  """Splash (interpreted) under activation_rules: a shard_map over batch (data) and heads
  (tensor); the unsharded values and gradients."""
  from ttt_jax.models.layers import splash_attention  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  q, k, v, dy = (jax.random.normal(key, (2, 100, 4, 8))
                 for key in jax.random.split(jax.random.key(0), 4))
  grads = jax.value_and_grad(lambda *a: jnp.vdot(splash_attention(*a), dy), argnums=(0, 1, 2))
  want = jax.jit(grads)(q, k, v)
  mesh = make_mesh(data=2, tensor=4)

  def sharded(*args):
    with activation_rules(mesh):
      return grads(*args)

  assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))
  for g, w in zip(jax.tree.leaves(jax.jit(sharded)(q, k, v)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
