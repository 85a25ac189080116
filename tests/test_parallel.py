"""Mesh and logical rules on 8 fake CPU devices: sharded results equal unsharded ones."""
import functools
import re

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


def test_constrain_is_live_only_under_activation_rules():
  from ttt_jax.parallel import activation_rules, constrain  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(data=1, context=8)
  x = jnp.ones((2, 16, 4))
  names = ("activation_batch", "activation_length", "activation_embed")
  assert constrain(x, names) is x
  with activation_rules(mesh):
    y = jax.jit(lambda x: constrain(x * 2, names))(x)
  assert y.sharding.spec == P(None, "context")


# 2 segments of 3 latent frames (5 in all) of 2 x 3 tokens, 9 text tokens each: 48 tokens; 8
# heads of 16 (RoPE's minimum) divide by context x tensor = 8; TTT-MLP with mini-batches of 8.
_CP_CONFIG = dict(num_heads=8, head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                  text_embed_dim=32, time_embed_dim=16, sample_height=4, sample_width=6,
                  max_text_seq_length=9, mixer="ttt_mlp", mixer_options=(("mini_batch_size", 8),),
                  dtype="float32")
_CP_SEQ, _CP_WIDTH = 48, 128


@functools.lru_cache(maxsize=1)
def _cp_problem():
  """(graphdef, state, inputs, loss(state, *inputs), one-device (loss, grads))."""
  from ttt_jax.models.dit import DiT, DiTConfig  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(DiT(DiTConfig(**_CP_CONFIG), rngs=nnx.Rngs(0)))
  keys = jax.random.split(jax.random.key(1), 2)
  inputs = (jax.random.normal(keys[0], (4, 5, 4, 4, 6)), jax.random.normal(keys[1], (4, 2, 9, 32)),
            jnp.array([3, 700, 250, 999]))

  def loss(state, latents, text, t):
    return jnp.mean(jnp.sin(nnx.merge(graphdef, state)(latents, text, t)))

  want = jax.jit(jax.value_and_grad(loss))(state, *inputs)
  return graphdef, state, inputs, loss, want


_COLLECTIVE = re.compile(r"= (\(?[a-z0-9]+\[[^=]*?) (all-gather|all-reduce|collective-permute|"
                         r"all-to-all|reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


@pytest.mark.parametrize("axes", [dict(data=1, context=4, tensor=2),
                                  dict(data=1, fsdp=4, context=2),
                                  dict(data=2, context=4)])
def test_ulysses_dit_matches_one_device_and_never_gathers_the_stream(axes):
  """A 2-segment TTT-MLP DiT (fp32), loss and gradients of every parameter, sharded with the
  sequence over context: equal to one device (rtol 1e-5). Its compiled HLO holds the residual
  stream as [batch/(data x fsdp), seq/context, width] per device and moves q, k, v in
  all-to-alls (XLA splits each into [batch, seq/context, heads/(context x tensor), d] chunks,
  one per peer); no collective carries an array with a whole-sequence axis, nor one whose
  last two axes hold as many elements as a sample's [seq, width] stream."""
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  _, state, inputs, loss, (want_loss, want_grads) = _cp_problem()
  mesh = make_mesh(**axes)

  def sharded(state, *inputs):
    with activation_rules(mesh):
      return jax.value_and_grad(loss)(state, *inputs)

  compiled = jax.jit(sharded).lower(state, *inputs).compile()
  got_loss, got_grads = compiled(state, *inputs)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_grads, want_grads)

  hlo = compiled.as_text()
  batch, context = 4 // (axes.get("data", 1) * axes.get("fsdp", 1)), axes["context"]
  assert f"f32[{batch},{_CP_SEQ // context},{_CP_WIDTH}]" in hlo
  collectives = [(op, [tuple(int(n) for n in dims.split(",") if n)
                        for dims in _SHAPE.findall(shapes)])
                 for shapes, op in _COLLECTIVE.findall(hlo)]
  # XLA splits an all-to-all into one operand per peer: [batch, seq/context, heads/(context x
  # tensor), d] chunks of q, k, v (and [.., heads/(context x tensor)] of η).
  heads = _CP_CONFIG["num_heads"] // (context * axes.get("tensor", 1))
  assert any(op == "all-to-all" and (batch, _CP_SEQ // context, heads, 16) in shapes
             for op, shapes in collectives), collectives
  whole = [(op, shapes) for op, shapes in collectives
           if any(_CP_SEQ in dims or _CP_SEQ * _CP_WIDTH <= np.prod(dims[-2:])
                  for dims in shapes)]
  assert not whole, whole


def test_ulysses_refuses_heads_that_do_not_split():
  """2 heads cannot be spread over context=4 x tensor=2 devices."""
  from ttt_jax.models.dit import DiT, DiTConfig  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  _, _, inputs, _, _ = _cp_problem()
  model = DiT(DiTConfig(**{**_CP_CONFIG, "num_heads": 2, "head_dim": 64}), rngs=nnx.Rngs(0))
  with activation_rules(make_mesh(data=1, context=4, tensor=2)):
    with pytest.raises(ValueError, match=r"^2 heads do not split over context=4 \(context\) x "
                                         r"tensor=2 \(tensor\).*divisible by 8"):
      jax.eval_shape(model, *inputs)


@pytest.mark.parametrize("axes", [dict(data=1, context=4, tensor=2),
                                  dict(data=1, fsdp=4, context=2)])
def test_context_parallel_train_steps_match_one_device(axes, tmp_path):
  """runlocal 3 s (TTT-MLP, 96 tokens, 8 heads): two steps with the sequence split over
  context give the one-device losses."""
  from configs import tomjerry_3s  # pylint: disable=g-import-not-at-top
  from tests.test_training_loop import FakeLoader, _losses  # pylint: disable=g-import-not-at-top
  from ttt_jax import training  # pylint: disable=g-import-not-at-top
  c = tomjerry_3s.get_config("runlocal")
  c.model.update(dict(num_heads=8, head_dim=16))  # Ulysses: heads divide by context x tensor
  c.train.update(dict(steps=2, checkpoint_every=2, batch_size=4))
  training.train(c, str(tmp_path / "one"), loader=FakeLoader(c),
                 mesh=make_mesh(devices=jax.devices()[:1]))
  training.train(c, str(tmp_path / "sharded"), loader=FakeLoader(c), mesh=make_mesh(**axes))
  np.testing.assert_allclose([l for _, l in _losses(tmp_path / "sharded")],
                             [l for _, l in _losses(tmp_path / "one")], rtol=1e-5)


@pytest.mark.parametrize("axes", [dict(data=2, tensor=4), dict(data=1, fsdp=4, tensor=2),
                                  dict(data=1, context=2, tensor=4)])
def test_sharded_pallas_ttt_layer_matches_unsharded(axes):
  """TTTLayer with impl="pallas" (interpreted) under activation_rules: its scan runs inside
  mesh.sequence_to_heads' shard_map over batch and heads (with the all-to-all on context=2),
  in a permuted order as the DiT's reverse pass; output and gradients (input and every
  parameter, W0 and the inner LayerNorm getting theirs summed over the batch shards) equal the
  unsharded layer's."""
  from ttt_jax.parallel import activation_rules  # pylint: disable=g-import-not-at-top
  layer = TTTLayer(64, 8, inner="mlp", mini_batch_size=8, impl="pallas",
                   checkpoint_group_size=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  x = jax.random.normal(jax.random.key(1), (4, 24, 64))
  perm = np.random.default_rng(0).permutation(24)
  order = (perm, np.argsort(perm))
  angles = jnp.repeat(jax.random.uniform(jax.random.key(2), (24, 4), maxval=6.0), 2, axis=1)
  rope = (jnp.cos(angles), jnp.sin(angles))

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x, rope=rope, order=order)
    return jnp.sum(jnp.sin(out)), out

  grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  want = jax.jit(grads)(params, x)
  # `order`: the scan over x[:, perm] with rope by position there, returned in x's order.
  permuted = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, rope=rope))(params, x[:, perm])
  np.testing.assert_allclose(want[0][1], permuted[:, order[1]], rtol=1e-5, atol=1e-4)
  mesh = make_mesh(**axes)

  def sharded(params, x):
    with activation_rules(mesh):
      return grads(params, x)

  assert "shard_map" in str(jax.make_jaxpr(sharded)(params, x))
  got = jax.jit(sharded)(params, x)
  # Tensor-split projections sum in another order: float32 noise relative to each array's scale.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


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
