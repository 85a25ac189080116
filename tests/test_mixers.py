"""Sequence mixers: registry, fast forms against naive/recurrent references, jit/grad/bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.mixers import MIXERS, build_mixer, count_params, matched_options
from ttt_jax.mixers.common import causal_depthwise_conv, l2_normalize, matmul, scale_channels
from ttt_jax.mixers.gated_deltanet import (gated_delta_rule_chunked, gated_delta_rule_recurrent,
                                           unit_lower_inverse)
from ttt_jax.mixers.mamba2 import ssd_chunked, ssd_recurrent
from ttt_jax.mixers.swa import sliding_window_attention

LOGICAL_AXES = {"batch", "length", "embed", "heads", "head_dim", "mlp", "layers", "vocab",
                "conv_in", "conv_out", None}
WIDTH, HEADS = 32, 4
# Small sizes so each mixer compiles fast; chunk 8 makes every test sequence span many chunks.
TINY = {"swa": {"window": 10},
        "mamba2": {"state_size": 8, "chunk_size": 8},
        "gated_deltanet": {"chunk_size": 8}}


def _normal(seed, shape):
  # numpy, not jax.random: eager jax.random compiles once per shape, which dominates runtime.
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def test_registry_names_and_errors():
  assert MIXERS == ("none", "swa", "mamba2", "gated_deltanet", "ttt_linear", "ttt_mlp")
  assert build_mixer("none", WIDTH, HEADS, rngs=nnx.Rngs(0)) is None
  assert count_params(None) == 0
  with pytest.raises(ValueError, match="gated_deltanet.*ttt_mlp"):
    build_mixer("mamba", WIDTH, HEADS, rngs=nnx.Rngs(0))
  for name in ("none", "swa", "mamba2", "gated_deltanet"):
    with pytest.raises(TypeError, match="windw"):
      build_mixer(name, WIDTH, HEADS, rngs=nnx.Rngs(0), windw=4)
  with pytest.raises(ValueError, match="no size knob"):
    matched_options("swa", WIDTH, HEADS, 4 * WIDTH**2)


def test_ttt_mixers_build_and_reverse():
  x = _normal(0, (1, 32, WIDTH))
  run = nnx.jit(lambda m, x: (m(x, reverse=True), m(x[:, ::-1])[:, ::-1]))
  for name in ("ttt_linear", "ttt_mlp"):
    mixer = build_mixer(name, WIDTH, HEADS, rngs=nnx.Rngs(0), mini_batch_size=8)
    y_reverse, y_flipped = run(mixer, x)
    assert y_reverse.shape == x.shape and count_params(mixer) > 4 * WIDTH**2
    np.testing.assert_allclose(y_reverse, y_flipped, rtol=1e-5, atol=1e-5)


def test_count_params_swa_formula():
  mixer = build_mixer("swa", WIDTH, HEADS, rngs=nnx.Rngs(0))
  head_dim = WIDTH // HEADS
  # q, k, v, o kernels and biases, plus scale and bias of the q and k LayerNorms.
  assert count_params(mixer) == 4 * (WIDTH * WIDTH + WIDTH) + 2 * 2 * head_dim


@pytest.mark.parametrize("seq,window", [(37, 9), (16, 100), (20, 1)])
def test_sliding_window_matches_masked_full_attention(seq, window):
  q, k, v = (_normal(i, (2, seq, 3, 8)) for i in range(3))
  out = jax.jit(sliding_window_attention, static_argnums=3)(q, k, v, window)
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  pos = np.arange(seq)
  logits = np.where(np.abs(pos[:, None] - pos[None, :]) <= window // 2, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-5, atol=1e-5)


def _assert_fast_matches_reference(fast, reference, inputs):
  """Same outputs, and same gradients of a random projection of them w.r.t. every input."""
  def value_and_grads(f):
    def loss(*args):
      y = f(*args)
      return jnp.sum(y * _normal(9, y.shape)), y
    return jax.jit(jax.value_and_grad(loss, tuple(range(len(inputs))), has_aux=True))(*inputs)
  (_, y_fast), g_fast = value_and_grads(fast)
  (_, y_ref), g_ref = value_and_grads(reference)
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  return y_ref


def _ssd_inputs(seq):
  batch, heads, head_dim, state = 2, 3, 4, 5
  x = _normal(0, (batch, seq, heads, head_dim))
  # Slow decays (per-token factor ~0.9-0.98) so state really crosses chunk boundaries.
  dt = np.log1p(np.exp(_normal(1, (batch, seq, heads)) - 3.0))
  a = -np.linspace(0.5, 2.0, heads, dtype=np.float32)
  b, c = _normal(3, (batch, seq, heads, state)), _normal(4, (batch, seq, heads, state))
  return x, dt, a, b, c


@pytest.mark.parametrize("seq", [8, 37, 48])
def test_ssd_chunked_matches_recurrent_matches_loop(seq):
  inputs = _ssd_inputs(seq)
  y = _assert_fast_matches_reference(lambda *args: ssd_chunked(*args, chunk_size=16),
                                     ssd_recurrent, inputs)
  x, dt, a, b, c = (np.asarray(t, np.float64) for t in inputs)
  h = np.zeros(x.shape[:1] + x.shape[2:] + b.shape[-1:])  # [batch, heads, head_dim, state]
  expected = np.zeros_like(x)
  for t in range(seq):
    h = (np.exp(dt[:, t] * a)[..., None, None] * h
         + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :])
    expected[:, t] = (h @ c[:, t, ..., None])[..., 0]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _delta_inputs(seq, key_dim=4, value_dim=6):
  batch, heads = 2, 3
  q = _normal(0, (batch, seq, heads, key_dim))
  k = _normal(1, (batch, seq, heads, key_dim))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = _normal(2, (batch, seq, heads, value_dim))
  g = -np.random.default_rng(3).uniform(0.01, 0.1, (batch, seq, heads)).astype(np.float32)
  beta = 1 / (1 + np.exp(-_normal(4, (batch, seq, heads))))
  return q, k, v, g, beta


# 200 is 13 chunks: the state passes through many chunks, the last one padded.
@pytest.mark.parametrize("seq", [8, 37, 48, 200])
def test_gated_delta_rule_chunked_matches_recurrent_matches_loop(seq):
  inputs = _delta_inputs(seq)
  o = _assert_fast_matches_reference(
      lambda *args: gated_delta_rule_chunked(*args, chunk_size=16), gated_delta_rule_recurrent,
      inputs)
  q, k, v, g, beta = (np.asarray(t, np.float64) for t in inputs)
  batch, _, heads, key_dim = k.shape
  expected = np.zeros_like(v)
  for i in range(batch):
    for h in range(heads):
      s = np.zeros((v.shape[-1], key_dim))
      for t in range(seq):  # The defining equation, with the explicit matrix I - beta k k^T.
        k_t, b_t = k[i, t, h][:, None], beta[i, t, h]
        s = (s @ (np.exp(g[i, t, h]) * (np.eye(key_dim) - b_t * k_t @ k_t.T))
             + b_t * v[i, t, h][:, None] @ k_t.T)
        expected[i, t, h] = s @ q[i, t, h]
  np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_dim", [64, 128])
def test_gated_delta_rule_chunked_at_real_head_sizes(key_dim):
  """The paper's head sizes (value_dim = 2 key_dim as in fla), forward and backward; seq 40 over
  chunks of 32 crosses a chunk boundary and pads the last chunk. These hung before issue 18."""
  _assert_fast_matches_reference(
      lambda *args: gated_delta_rule_chunked(*args, chunk_size=32), gated_delta_rule_recurrent,
      _delta_inputs(40, key_dim, 2 * key_dim))


def test_gated_deltanet_issues_no_lapack_call():
  """jaxlib's CPU trsm kernel can deadlock XLA's thread pool (bench/repro_gdn_hang.py), so the
  chunked form, forward and backward, must stay free of LAPACK custom calls."""
  mixer = build_mixer("gated_deltanet", WIDTH, HEADS, rngs=nnx.Rngs(0), chunk_size=8)
  graphdef, params = nnx.split(mixer)
  grad = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, reverse=True) ** 2))
  hlo = jax.jit(grad).lower(params, _normal(0, (2, 21, WIDTH))).as_text()
  assert "lapack" not in hlo and "triangular_solve" not in hlo


@pytest.mark.parametrize("n", [5, 8, 37, 64])  # product form only; odd sizes padded; doublings
def test_unit_lower_inverse(n):
  rng = np.random.default_rng(0)
  # |A_ti| <= 1/4: the size of beta (gamma_t/gamma_i) k_t.k_i for unit keys of dimension >= 16.
  a = np.tril(rng.uniform(-0.25, 0.25, (2, 3, n, n)), -1).astype(np.float32)
  upper = np.triu(rng.standard_normal((n, n)), 0).astype(np.float32)  # must be ignored
  t = jax.jit(unit_lower_inverse)(a + upper)
  np.testing.assert_allclose(t @ (np.eye(n, dtype=np.float32) + a), np.broadcast_to(
      np.eye(n), a.shape), atol=1e-4)
  # The custom gradient against autodiff of a plain solve, on the strict lower part.
  cotangent = _normal(1, a.shape)
  solve = lambda a: jnp.linalg.inv(jnp.eye(n) + jnp.tril(a, -1))
  expected = jax.vjp(solve, a + upper)[1](cotangent)[0]
  np.testing.assert_allclose(jax.vjp(unit_lower_inverse, a + upper)[1](cotangent)[0], expected,
                             rtol=1e-4, atol=1e-4)


def _conv_reference(x, kernel):  # the same convolution, differentiated by autodiff
  size, seq = kernel.shape[0], x.shape[1]
  padded = jnp.pad(x, ((0, 0), (size - 1, 0), (0, 0)))
  return jnp.einsum("bskc,kc->bsc", jnp.stack([padded[:, i:i + seq] for i in range(size)], 2),
                    kernel)


@pytest.mark.parametrize("fast,reference,shapes", [
    (causal_depthwise_conv, _conv_reference, [(2, 11, 6), (4, 6)]),
    (matmul, lambda x, kernel: jnp.einsum("bsi,io->bso", x, kernel), [(2, 11, 6), (6, 5)]),
    (scale_channels, lambda x, scale: x * scale, [(2, 11, 6), (6,)]),
    (l2_normalize, lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6),
     [(2, 11, 6)])])
def test_written_out_vjps_match_autodiff(fast, reference, shapes):
  inputs = [_normal(i, shape) for i, shape in enumerate(shapes)]
  y, vjp = jax.vjp(fast, *inputs)
  y_ref, vjp_ref = jax.vjp(reference, *inputs)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy = _normal(9, y.shape)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swa", "mamba2", "gated_deltanet"])
def test_mixer_module(name):
  """jit, reverse, bf16, causality, grad, logical axis names; recurrent == chunked."""
  mixer = build_mixer(name, WIDTH, HEADS, rngs=nnx.Rngs(0), **TINY[name])
  x = _normal(1, (2, 21, WIDTH))
  x_changed = x.copy()
  x_changed[:, 13] += 1.0

  @nnx.jit
  def run(m, x):
    # One batched call for the float32 variants keeps compile time down.
    y, y_flipped, y_changed = jnp.split(m(jnp.concatenate([x, x[:, ::-1], x_changed])), 3)
    return y, m(x, reverse=True), y_flipped[:, ::-1], m(x.astype(jnp.bfloat16)), y_changed

  y, y_reverse, y_flipped, y_bf16, y_changed = run(mixer, x)
  assert y.shape == x.shape and y_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y_reverse, y_flipped, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_bf16, np.float32), y, rtol=0.05,
                             atol=0.05 * float(np.abs(y).max()))
  changed = np.abs(y_changed - y).max(axis=(0, 2)) > 0  # per position
  if name == "swa":  # Symmetric window of 5 on each side; direction does not matter.
    np.testing.assert_allclose(y_reverse, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(changed, np.abs(np.arange(21) - 13) <= 5)
  else:  # Causal, and the state carries the change to every later token.
    assert np.abs(y_reverse - y).max() > 1e-3
    np.testing.assert_array_equal(changed, np.arange(21) >= 13)
    recurrent = build_mixer(name, WIDTH, HEADS, rngs=nnx.Rngs(0), **TINY[name],
                            algorithm="recurrent")
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(recurrent, x), y, rtol=1e-5,
                               atol=1e-5)

  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, reverse=True) ** 2)))(mixer)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path

  for path, param in nnx.iter_graph(mixer):
    if isinstance(param, nnx.Param):
      names = param.get_metadata().get("out_sharding")
      assert names is not None and len(names) == param.ndim, path
      assert set(names) <= LOGICAL_AXES, (path, names)


@pytest.mark.parametrize("name,options", [("mamba2", {"state_size": 16}),
                                          ("gated_deltanet", {})])
def test_matched_options_hit_parameter_target(name, options):
  width, heads = 64, 4
  head_dim = width // heads
  # TTT-MLP's count: q/k/v/o projections, per-head W1 [d, 4d], W2 [4d, d] and biases, per-head
  # LayerNorm, learning-rate gate, post LayerNorm.
  ttt_mlp = (4 * (width**2 + width) + heads * (8 * head_dim**2 + 5 * head_dim + 2 * head_dim)
             + heads * (width + 1) + 2 * width)
  found = matched_options(name, width, heads, ttt_mlp, **options)
  mixer = build_mixer(name, width, heads, rngs=nnx.Rngs(0), **options, **found)
  assert abs(count_params(mixer) - ttt_mlp) / ttt_mlp < 0.03, (found, count_params(mixer))
  budgeted = build_mixer(name, width, heads, rngs=nnx.Rngs(0), param_budget=ttt_mlp, **options)
  assert count_params(budgeted) == count_params(mixer)
