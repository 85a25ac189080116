"""One TTT mini-batch in the dual form: the forward and its hand-derived backward, as matmuls.

The one written-out step. `scan.py` (impl="dual") runs it under lax.scan with a custom_vjp whose
backward is `backward` below (on the residuals of a checkpoint group's re-run `forward`, or,
without groups, on those the forward saved); `pallas_kernels/` runs the same functions inside its
kernels (`recompute_backward`), and both cut eta into mini-batches with `eta_inputs`. Pure jax: it
imports nothing else of ttt_jax, so the kernels may import it.

One head, one mini-batch of b tokens (../shared/PAPER.md, "TTT layer"). Layer l has key-side input
X_l, read-out input Q_l, weights W_l, b_l and output gradient G_l = dl/dZ_l:
  TTT-Linear: one layer, X_1 = xk, Q_1 = xq.
  TTT-MLP:    X_1 = xk, Q_1 = xq; X_2 = gelu(Z_1), Q_2 = gelu(Zq_1).
Forward, with e = eta_col (each token's step in the mini-batch's final weights) and, causal,
E = eta_mat [b, b] (E[t, s]: step of token s in the weights that token t reads):
  Z_l = X_l W_l + b_l;                  G_L = LN_L2_grad(Z_L, xv - xk)   (L: the last layer)
  MLP: H = G_2 W_2^T, G_1 = H * gelu'(Z_1)
  P_l = e * G_l;  W_l' = W_l - X_l^T P_l,  b_l' = b_l - 1^T P_l
  non-causal: Zq_l = Q_l W_l' + b_l'
  causal:     Zq_l = Q_l W_l + b_l - A_l G_l,  A_l = E * (S_l + 1),  S_l = Q_l X_l^T
              (the per-token weights W_l - sum_s E_ts X_ls^T G_ls are never formed)
  z = xq + LN(Zq_L)
Backward: the cotangents dW' of the weights after the mini-batch (carried from the next one) and
dz give, layer by layer from the last, the cotangents of W (carried to the previous mini-batch),
of the LayerNorm, of xq, xk, xv, e and E. Every matmul of the forward has two in the backward.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

WEIGHT_KEYS = {"linear": ("W1", "b1"), "mlp": ("W1", "b1", "W2", "b2")}
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715

Weights = dict[str, jax.Array]


class MiniBatch(NamedTuple):
  """One mini-batch: xq, xk, xv [b, d]; eta_col [b, 1]; eta_mat [b, b] (causal) or None."""
  xq: jax.Array
  xk: jax.Array
  xv: jax.Array
  eta_col: jax.Array
  eta_mat: jax.Array | None


def eta_inputs(eta: jax.Array, mini_batch_size: int,
               causal: bool) -> tuple[jax.Array, jax.Array | None]:
  """Each mini-batch's eta_col [batch, heads, n, b, 1] and eta_mat [batch, heads, n, b, b] or None.

  eta: [batch, heads, seq] per-token steps, or (causal) [batch, heads, seq, b] with eta[..., t, s]
  the step of token s of t's mini-batch in the weights t reads; seq = n * b. eta_mat (causal
  only) is masked to s <= t.
  """
  batch, heads, seq = eta.shape[:3]
  b, n = mini_batch_size, seq // mini_batch_size
  if not causal:
    if eta.ndim != 3:
      raise ValueError("a per-(token, source) eta [batch, heads, seq, mini_batch_size] is only "
                       f"meaningful with causal=True; got eta {eta.shape}")
    return eta.reshape(batch, heads, n, b, 1), None
  if eta.ndim == 3:
    mat = jnp.broadcast_to(eta.reshape(batch, heads, n, 1, b), (batch, heads, n, b, b))
  else:
    mat = eta.reshape(batch, heads, n, b, b)
  mat = mat * jnp.tril(jnp.ones((b, b), eta.dtype))
  # A mini-batch's final weights take each token's step from the last token's row.
  return mat[..., -1, :, None], mat


_NN, _TN, _NT = ((1,), (0,)), ((0,), (0,)), ((1,), (1,))


@dataclasses.dataclass(frozen=True)
class Dots:
  """Matmuls with operands cast to `mxu` (bf16 on an MXU/tensor core) accumulated in `acc`."""
  mxu: Any
  acc: Any

  def _dot(self, a, b, contract):
    return jax.lax.dot_general(a.astype(self.mxu), b.astype(self.mxu), (contract, ((), ())),
                               preferred_element_type=self.acc)

  def nn(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b."""
    return self._dot(a, b, _NN)

  def tn(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b, without materialising the transpose."""
    return self._dot(a, b, _TN)

  def nt(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T, without materialising the transpose."""
    return self._dot(a, b, _NT)


# ---------------------------------------------------------------------------------------------
# Element-wise pieces and their derivatives (rows of [n, d]; ln_w, ln_b [d] or [1, d]).


def _gelu_tanh_t(x: jax.Array) -> jax.Array:
  """t = tanh(u), u = c (x + k x^3): the one transcendental of gelu_tanh and its derivatives.

  The step computes it once per activation and keeps it for the backward; XLA on CPU would
  otherwise evaluate tanh again in every fusion that reads it.
  """
  return jnp.tanh(_GELU_C * (x + _GELU_K * x**3))


def _gelu(x, t):
  return 0.5 * x * (1.0 + t)


def _gelu_grad(x, t):
  """d gelu_tanh / dx = (1 + t) / 2 + x (1 - t^2) u' / 2, exact constants (the reference rounds
  them; see golden README)."""
  du = _GELU_C * (1.0 + 3 * _GELU_K * x * x)
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _gelu_grad2(x, t):
  """d^2 gelu_tanh / dx^2 = (1 - t^2) (u' + 3 c k x^2 - x t u'^2)."""
  du = _GELU_C * (1.0 + 3 * _GELU_K * x * x)
  return (1.0 - t * t) * (du + 3 * _GELU_C * _GELU_K * x * x - x * t * du * du)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return _gelu(x, _gelu_tanh_t(x))


def _mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=-1, keepdims=True)


def _normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(x - mu) / sqrt(var + eps) and 1 / sqrt(var + eps), over the last axis."""
  mu = _mean(x)
  inv_std = jax.lax.rsqrt(_mean(jnp.square(x - mu)) + eps)
  return (x - mu) * inv_std, inv_std


def _normalise_bwd(d_hat: jax.Array, x_hat: jax.Array, inv_std: jax.Array) -> jax.Array:
  """Pulls the cotangent of x_hat = _normalise(x) back to x."""
  return inv_std * (d_hat - _mean(d_hat) - x_hat * _mean(d_hat * x_hat))


def layer_norm(x: jax.Array, ln_w: jax.Array, ln_b: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis."""
  return _normalise(x, eps)[0] * ln_w + ln_b


def _ln_l2_grad(x_hat, inv_std, target, ln_w, ln_b):
  g_hat = (ln_w * x_hat + ln_b - target) * ln_w
  return inv_std * (g_hat - _mean(g_hat) - x_hat * _mean(g_hat * x_hat)), g_hat


def layer_norm_l2_grad(z: jax.Array, target: jax.Array, ln_w: jax.Array, ln_b: jax.Array,
                       eps: float) -> jax.Array:
  """Gradient of 0.5 * ||LN(z) - target||^2 w.r.t. z, row by row. z, target [n, d] -> [n, d]."""
  return _ln_l2_grad(*_normalise(z, eps), target, ln_w, ln_b)[0]


def _ln_l2_grad_bwd(dg, x_hat, inv_std, target, ln_w, ln_b):
  """Pulls dg, the cotangent of G = LN_L2_grad(z, target), back to (z, target, ln_w, ln_b).

  G = r (g - mean(g) - x_hat mean(g x_hat)), g = (w x_hat + b - target) w, r = inv_std. Through g
  and x_hat as usual; r itself depends on z with dr/dz = -r^2 x_hat / d, which adds
  -r x_hat mean(dg G).
  """
  grad, g_hat = _ln_l2_grad(x_hat, inv_std, target, ln_w, ln_b)
  a = inv_std * dg
  a_hat = _mean(a * x_hat)
  d_g = a - _mean(a) - x_hat * a_hat
  d_hat = d_g * ln_w * ln_w - a * _mean(g_hat * x_hat) - g_hat * a_hat
  dz = _normalise_bwd(d_hat, x_hat, inv_std) - inv_std * x_hat * _mean(dg * grad)
  pred = ln_w * x_hat + ln_b - target
  d_lnw = jnp.sum(d_g * (pred + ln_w * x_hat), axis=0, keepdims=True)
  d_lnb = jnp.sum(d_g * ln_w, axis=0, keepdims=True)
  return dz, -d_g * ln_w, d_lnw, d_lnb


# ---------------------------------------------------------------------------------------------
# One layer's inner step and read-out, and their backward.


def _layer_forward(x, q, w, b, g, mb: MiniBatch, dots: Dots):
  """(W', b', Zq, S): the layer's step and read-out; S = Q X^T (causal) or None."""
  p = mb.eta_col * g
  w_new, b_new = w - dots.tn(x, p), b - jnp.sum(p, axis=0, keepdims=True)
  if mb.eta_mat is None:
    return w_new, b_new, dots.nn(q, w_new) + b_new, None
  s = dots.nt(q, x)
  return w_new, b_new, dots.nn(q, w) + b - dots.nn(mb.eta_mat * (s + 1.0), g), s


def _layer_backward(x, q, w, w_new, g, s, mb: MiniBatch, dw_new, db_new, dzq, dots: Dots):
  """Cotangents (dW, db, dQ, dX, dG, de, dE) of `_layer_forward` from dW', db', dZq."""
  if mb.eta_mat is None:
    # Zq = Q W' + b': the read-out adds to the cotangent of the new weights.
    dw_new = dw_new + dots.tn(q, dzq)
    db_new = db_new + jnp.sum(dzq, axis=0, keepdims=True)
    dq, dx, dg, d_eta_mat = dots.nt(dzq, w_new), 0.0, 0.0, None
    dw, db = dw_new, db_new
  else:
    # Zq = Q W + b - (E * (Q X^T + 1)) G.
    dw = dw_new + dots.tn(q, dzq)
    db = db_new + jnp.sum(dzq, axis=0, keepdims=True)
    d_a = -dots.nt(dzq, g)
    d_eta_mat = d_a * (s + 1.0)
    d_s = d_a * mb.eta_mat
    dq = dots.nt(dzq, w) + dots.nn(d_s, x)
    dx = dots.tn(d_s, q)
    dg = -dots.tn(mb.eta_mat * (s + 1.0), dzq)
  # W' = W - X^T P, b' = b - 1^T P with P = e * G.
  p = mb.eta_col * g
  d_p = -(dots.nn(x, dw_new) + db_new)
  dx = dx - dots.nt(p, dw_new)
  d_eta_col = jnp.sum(d_p * g, axis=-1, keepdims=True)
  return dw, db, dq, dx, dg + mb.eta_col * d_p, d_eta_col, d_eta_mat


# ---------------------------------------------------------------------------------------------
# The step.


def forward(inner: str, w: Weights, ln_w: jax.Array, ln_b: jax.Array, mb: MiniBatch, *,
            eps: float, dots: Dots) -> tuple[Weights, jax.Array, dict[str, jax.Array]]:
  """One mini-batch. W1 [d, h], b1 [1, h] (MLP also W2 [h, d], b2 [1, d]); ln_w, ln_b [d] or [1, d].

  Returns the weights after the mini-batch, z [b, d], and the activations that `backward` needs
  (the residuals, all [b, *]).
  """
  target = mb.xv - mb.xk
  z1 = dots.nn(mb.xk, w["W1"]) + w["b1"]
  res = {}
  if inner == "mlp":
    t1 = _gelu_tanh_t(z1)
    x2 = _gelu(z1, t1)
    z_last = dots.nn(x2, w["W2"]) + w["b2"]
  else:
    z_last = z1
  res["z_hat"], res["z_inv_std"] = _normalise(z_last, eps)
  g_last = _ln_l2_grad(res["z_hat"], res["z_inv_std"], target, ln_w, ln_b)[0]
  if inner == "mlp":
    # Not G2 itself: `backward` rebuilds it element-wise from z_hat (the same expression as in
    # the LayerNorm pull-back, which XLA computes once).
    res.update(z1=z1, t1=t1, hid=dots.nt(g_last, w["W2"]))
    g1 = res["hid"] * _gelu_grad(z1, t1)
  else:
    g1 = g_last
  w1, b1, zq, res["s1"] = _layer_forward(mb.xk, mb.xq, w["W1"], w["b1"], g1, mb, dots)
  new = {"W1": w1, "b1": b1}
  if inner == "mlp":
    res["zq1"], res["tq1"] = zq, _gelu_tanh_t(zq)
    w2, b2, zq, res["s2"] = _layer_forward(x2, _gelu(zq, res["tq1"]), w["W2"], w["b2"], g_last,
                                           mb, dots)
    new.update(W2=w2, b2=b2)
  res["zq_hat"], res["zq_inv_std"] = _normalise(zq, eps)
  res = {k: v for k, v in res.items() if v is not None}
  return new, mb.xq + res["zq_hat"] * ln_w + ln_b, res


# Residuals of `forward` that `backward` can rebuild element-wise: the tanh of each GELU. Within
# one computation (a checkpoint group's re-run) they are kept, since XLA on CPU would otherwise
# evaluate tanh again in every fusion that reads them; saved across a scan for a later backward,
# writing and reading them costs more than one tanh (fwd+bwd CPU time about -10% at 4 heads x 64,
# 4096 tokens, mini-batch 64, on the shared 2-core dev CPU).
_REBUILT = {"t1": "z1", "tq1": "zq1"}


def stored_residuals(res: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`forward`'s residuals without those that `full_residuals` rebuilds."""
  return {k: v for k, v in res.items() if k not in _REBUILT}


def full_residuals(res: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The residuals `backward` reads, from `stored_residuals`' (any leading axes)."""
  return {**res, **{k: _gelu_tanh_t(res[z]) for k, z in _REBUILT.items() if z in res}}


def step(inner: str, w: Weights, ln_w: jax.Array, ln_b: jax.Array, mb: MiniBatch, *,
         eps: float, dots: Dots) -> tuple[Weights, jax.Array]:
  """`forward` without the residuals: (weights after the mini-batch, z [b, d])."""
  return forward(inner, w, ln_w, ln_b, mb, eps=eps, dots=dots)[:2]


def backward(inner: str, w: Weights, w_new: Weights, ln_w: jax.Array, ln_b: jax.Array,
             mb: MiniBatch, res: dict[str, jax.Array], dw_new: Weights, dz: jax.Array, *,
             dots: Dots) -> tuple[Weights, jax.Array, jax.Array, MiniBatch]:
  """The cotangents of `forward`'s inputs from those of its outputs.

  Args:
    inner, ln_w, ln_b, mb: as `forward`; w, w_new: the weights before and after the mini-batch;
      res: `forward`'s residuals.
    dw_new: cotangent of the weights after the mini-batch; dz: of z [b, d].

  Returns:
    (dW of the weights before the mini-batch, d ln_w, d ln_b (ln_w's shape), and a MiniBatch of
    the cotangents of xq, xk, xv, eta_col and eta_mat).
  """
  target = mb.xv - mb.xk
  # z = xq + LN(Zq_L).
  # Row sums keep their axis ([1, d]): Mosaic wants 2-D values.
  d_lnw = jnp.sum(dz * res["zq_hat"], axis=0, keepdims=True)
  d_lnb = jnp.sum(dz, axis=0, keepdims=True)
  dzq = _normalise_bwd(dz * ln_w, res["zq_hat"], res["zq_inv_std"])
  dw, z_hat, z_inv_std = {}, res["z_hat"], res["z_inv_std"]
  g_last = _ln_l2_grad(z_hat, z_inv_std, target, ln_w, ln_b)[0]
  if inner == "mlp":
    z1, t1, zq1, tq1 = res["z1"], res["t1"], res["zq1"], res["tq1"]
    x2, xq2, gelu_grad1 = _gelu(z1, t1), _gelu(zq1, tq1), _gelu_grad(z1, t1)
    g1 = res["hid"] * gelu_grad1
    dw["W2"], dw["b2"], dxq2, dx2, dg2, d_col, d_mat = _layer_backward(
        x2, xq2, w["W2"], w_new["W2"], g_last, res.get("s2"), mb, dw_new["W2"],
        dw_new["b2"], dzq, dots)
    dzq = dxq2 * _gelu_grad(zq1, tq1)
  else:
    g1 = g_last
  dw["W1"], dw["b1"], dxq, dxk, dg1, d_col1, d_mat1 = _layer_backward(
      mb.xk, mb.xq, w["W1"], w_new["W1"], g1, res.get("s1"), mb, dw_new["W1"], dw_new["b1"],
      dzq, dots)
  if inner == "mlp":
    d_col = d_col + d_col1
    d_mat = None if d_mat is None else d_mat + d_mat1
    # G1 = H * gelu'(Z1), H = G2 W2^T.
    d_hid = dg1 * gelu_grad1
    dz1 = dg1 * res["hid"] * _gelu_grad2(z1, t1)
    dg_last = dg2 + dots.nn(d_hid, w["W2"])
    dw["W2"] = dw["W2"] + dots.tn(d_hid, g_last)
  else:
    d_col, d_mat, dg_last = d_col1, d_mat1, dg1
  dz_last, d_target, d_lnw2, d_lnb2 = _ln_l2_grad_bwd(dg_last, z_hat, z_inv_std, target, ln_w,
                                                      ln_b)
  if inner == "mlp":
    # Z2 = X2 W2 + b2, X2 = gelu(Z1).
    dw["W2"] = dw["W2"] + dots.tn(x2, dz_last)
    dw["b2"] = dw["b2"] + jnp.sum(dz_last, axis=0, keepdims=True)
    dz1 = dz1 + (dx2 + dots.nt(dz_last, w["W2"])) * gelu_grad1
  else:
    dz1 = dz_last
  # Z1 = xk W1 + b1; target = xv - xk; z = xq + ...
  dw["W1"] = dw["W1"] + dots.tn(mb.xk, dz1)
  dw["b1"] = dw["b1"] + jnp.sum(dz1, axis=0, keepdims=True)
  dxk = dxk + dots.nt(dz1, w["W1"]) - d_target
  d_lnw = (d_lnw + d_lnw2).reshape(ln_w.shape)
  d_lnb = (d_lnb + d_lnb2).reshape(ln_b.shape)
  return dw, d_lnw, d_lnb, MiniBatch(dxq + dz, dxk, d_target, d_col, d_mat)


def recompute_backward(inner: str, w: Weights, ln_w: jax.Array, ln_b: jax.Array, mb: MiniBatch,
                       dw_new: Weights, dz: jax.Array, *, eps: float,
                       dots: Dots) -> tuple[Weights, jax.Array, jax.Array, MiniBatch]:
  """`backward` of one mini-batch, its `forward` recomputed from w, the weights before it.

  For the kernels, where a group's residuals would not fit on chip. Returns what `backward`
  returns.
  """
  w_new, _, res = forward(inner, w, ln_w, ln_b, mb, eps=eps, dots=dots)
  return backward(inner, w, w_new, ln_w, ln_b, mb, res, dw_new, dz, dots=dots)
