"""TTTLayer against a hand-written float64 composition of its equations around the naive loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.mixers.ttt import TTTLayer, normalize_target
from ttt_reference import naive_ttt


def _np_ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _np_target_norm(t, w, b, eps):
  """The reference's ln_reconstruction_target: torch's unbiased std, eps outside the root."""
  mu = t.mean(-1, keepdims=True)
  return (t - mu) / (t.std(-1, ddof=1, keepdims=True) + eps) * w + b


def _np_rope(x, cos, sin):
  """Pairs as complex numbers times e^{i theta}: independent of the layer's real-valued form."""
  c = x[..., 0::2] + 1j * x[..., 1::2]
  c = c * (cos[:, None, 0::2] + 1j * sin[:, None, 0::2])
  return np.stack([c.real, c.imag], axis=-1).reshape(x.shape)


def manual_layer(layer, x, rope):
  p = {"/".join(map(str, k)): np.asarray(v[...], np.float64)
       for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  b, s, w = x.shape
  h, d, mb = layer.num_heads, layer.head_dim, layer.mini_batch_size
  heads = lambda name: (x @ p[f"{name}/kernel"] + p[f"{name}/bias"]).reshape(b, s, h, d)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q, k, v = unit(heads("wq")), unit(heads("wk")), heads("wv")
  if rope is not None:
    q, k = _np_rope(q, *rope), _np_rope(k, *rope)
  lw, lb = p["ttt_norm_weight"], p["ttt_norm_bias"]
  # Unbiased std (not the inner LayerNorm's biased variance), as the reference normalises.
  v = k + _np_target_norm(v - k, lw[None, None], lb[None, None], layer.inner_eps)
  gate = 1 / (1 + np.exp(-(x @ p["lr_weight"] + p["lr_bias"])))
  eta = (layer.inner_lr_base * gate / d / mb).transpose(0, 2, 1)
  params = {key: p[f"inner_weights/{key}"] for key in ("W1", "b1", "W2", "b2")
            if f"inner_weights/{key}" in p}
  params.update(ln_weight=lw, ln_bias=lb)
  t = lambda a: a.transpose(0, 2, 1, 3)
  z, _ = naive_ttt(layer.inner, params, t(q), t(k), t(v), eta, mb, False, layer.inner_eps)
  z = _np_ln(t(z).reshape(b, s, w), p["post_norm/scale"], p["post_norm/bias"], 1e-6)
  return z @ p["wo/kernel"] + p["wo/bias"]


def _rope(seq, d, key):
  theta = jax.random.uniform(key, (seq, d // 2), jnp.float64, 0, 6.3)
  theta = theta.at[:3].set(0.0)  # identity rows, as for text tokens
  rep = lambda a: np.repeat(np.asarray(a), 2, axis=-1)
  return rep(jnp.cos(theta)), rep(jnp.sin(theta))


@pytest.mark.parametrize("inner", ["mlp", "linear"])
def test_layer_matches_manual_composition(x64, inner):
  layer = TTTLayer(32, 4, inner=inner, mini_batch_size=4, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(0))
  # Give the learnable pieces non-trivial values so every term is exercised.
  layer.lr_bias[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
  layer.ttt_norm_weight[...] = 1 + 0.1 * jax.random.normal(jax.random.key(1), (4, 8))
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 11, 32), jnp.float64))  # 11: padding
  rope = _rope(11, 8, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), rope=rope)),
                             manual_layer(layer, x, rope), rtol=1e-9, atol=1e-9)
  # reverse=True: the same parameters over the reversed sequence, output back in order.
  flip = lambda a: a[:, ::-1] if a.ndim == 3 else a[::-1]
  want = flip(manual_layer(layer, flip(x), tuple(map(flip, rope))))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), rope=rope, reverse=True)), want,
                             rtol=1e-9, atol=1e-9)


def test_target_norm_is_the_references_not_the_inner_layer_norm(x64):
  """(x - mu) / (std_unbiased + 1e-8): sqrt(64/63), 0.8% from LN at head_dim 64 (PAPER.md)."""
  t = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 2, 64), jnp.float64))
  w, b = np.ones((2, 64)), np.zeros((2, 64))
  ours = np.asarray(normalize_target(jnp.asarray(t), w, b, 1e-8))
  mu = t.mean(-1, keepdims=True)
  by_hand = (t - mu) / (np.sqrt(((t - mu) ** 2).sum(-1, keepdims=True) / 63) + 1e-8)
  np.testing.assert_allclose(ours, by_hand, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ours.std(-1, ddof=1), 1.0, rtol=1e-6)
  ln = _np_ln(t, w, b, 1e-8)
  np.testing.assert_allclose(ln / ours, np.sqrt(64 / 63), rtol=1e-6)


def test_grad_reaches_every_parameter_under_jit():
  layer = TTTLayer(32, 2, inner="mlp", mini_batch_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))

  @nnx.jit
  def loss_and_grad(layer, x):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2 + m(x, reverse=True) ** 2))(layer)

  loss, grads = loss_and_grad(layer, x)
  assert np.isfinite(float(loss))
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.abs(g[...]).max()) > 0, path


def test_bf16_compute_with_fp32_state_is_close_to_fp32():
  make = lambda dtype: TTTLayer(64, 4, inner="mlp", mini_batch_size=8, dtype=dtype,
                                rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 32, 64))
  ref = make(None)(x)
  out = make(jnp.bfloat16)(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0.05, atol=0.05)


def test_bad_input_is_rejected():
  layer = TTTLayer(32, 4, inner="linear", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expects"):
    layer(jnp.zeros((2, 8, 16)))
  with pytest.raises(ValueError, match="rope"):
    layer(jnp.zeros((2, 8, 32)), rope=(jnp.ones((8, 4)), jnp.zeros((8, 4))))
  with pytest.raises(ValueError, match="divisible"):
    TTTLayer(30, 4, rngs=nnx.Rngs(0))
