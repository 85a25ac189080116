"""The inner model of a TTT layer: f(x) = x + LN(f_res(x)), one per head.

Everything here acts on ONE head: weights without a heads axis, tokens `[n, head_dim]`. The scan
in `scan.py` vmaps over heads and batch. Equations: ../shared/PAPER.md, "TTT layer".

Inner weights (a dict pytree), for head_dim d and hidden h = 4d:
  linear: W1 [d, d], b1 [1, d]
  mlp:    W1 [d, h], b1 [1, h], W2 [h, d], b2 [1, d]
The per-head LayerNorm (ln_weight [d], ln_bias [d]) is an outer parameter: the inner loop reads it
but never updates it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# The element-wise math lives once, beside the dual step that the kernels share.
from ttt_jax.ttt.dual import WEIGHT_KEYS, gelu_tanh, layer_norm

INNER_MODELS = tuple(WEIGHT_KEYS)  # ("linear", "mlp")
# The public reference uses 1e-8 inside the inner LayerNorm.
DEFAULT_EPS = 1e-8

Weights = dict[str, jax.Array]


def check_inner(inner: str) -> None:
  if inner not in INNER_MODELS:
    raise ValueError(f"inner model must be one of {INNER_MODELS}, got {inner!r}")


def init_params(inner: str, key: jax.Array, num_heads: int, head_dim: int, *,
                hidden_mult: int = 4, std: float = 0.02,
                dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Initial inner weights W0 (normal std 0.02, biases 0) and the per-head LayerNorm.

  Returns a dict with a leading heads axis: W1 [heads, d, h], b1 [heads, 1, h], (W2 [heads, h, d],
  b2 [heads, 1, d]), ln_weight [heads, d] (ones), ln_bias [heads, d] (zeros).
  """
  check_inner(inner)
  d = head_dim
  h = hidden_mult * d if inner == "mlp" else d
  k1, k2 = jax.random.split(key)
  params = {
      "W1": std * jax.random.normal(k1, (num_heads, d, h), dtype),
      "b1": jnp.zeros((num_heads, 1, h), dtype),
  }
  if inner == "mlp":
    params["W2"] = std * jax.random.normal(k2, (num_heads, h, d), dtype)
    params["b2"] = jnp.zeros((num_heads, 1, d), dtype)
  params["ln_weight"] = jnp.ones((num_heads, d), dtype)
  params["ln_bias"] = jnp.zeros((num_heads, d), dtype)
  return params


def f_res(inner: str, w: Weights, x: jax.Array) -> jax.Array:
  """The residual branch of the inner model. x [n, d] -> [n, d]."""
  z1 = x @ w["W1"] + w["b1"]
  if inner == "linear":
    return z1
  return gelu_tanh(z1) @ w["W2"] + w["b2"]


def apply(inner: str, w: Weights, ln_weight: jax.Array, ln_bias: jax.Array, x: jax.Array,
          eps: float) -> jax.Array:
  """f(x) = x + LN(f_res(x)). x [n, d] -> [n, d]."""
  return x + layer_norm(f_res(inner, w, x), ln_weight, ln_bias, eps)


def token_losses(inner: str, w: Weights, ln_weight: jax.Array, ln_bias: jax.Array,
                 xk: jax.Array, xv: jax.Array, eps: float) -> jax.Array:
  """l_t = 0.5 * ||LN(f_res(xk_t)) - (xv_t - xk_t)||^2 for each token. xk, xv [n, d] -> [n]."""
  pred = layer_norm(f_res(inner, w, xk), ln_weight, ln_bias, eps)
  return 0.5 * jnp.sum(jnp.square(pred - (xv - xk)), axis=-1)
