"""TTT-MLP inner model for the fused kernels: f_res(x) = gelu_tanh(x @ W1 + b1) @ W2 + b2.

`step` is one mini-batch of one head (see common.py for the layout); the kernels run it in the
forward scan and differentiate it with jax.vjp in the backward scan.
"""
from __future__ import annotations

import jax

from pallas_kernels import common

WEIGHT_KEYS = ("W1", "b1", "W2", "b2")


def step(w: common.Weights, ln_w: jax.Array, ln_b: jax.Array, mb: common.MiniBatch, *,
         eps: float, dots: common.Dots) -> tuple[common.Weights, jax.Array]:
  """One mini-batch. W1 [d, h], b1 [1, h], W2 [h, d], b2 [1, d]; ln_w, ln_b [1, d].

  Returns the weights after the mini-batch and z [b, d].
  """
  z1 = dots.nn(mb.xk, w["W1"]) + w["b1"]
  x2 = common.gelu_tanh(z1)
  z2 = dots.nn(x2, w["W2"]) + w["b2"]
  grad_z2 = common.layer_norm_l2_grad(z2, mb.xv - mb.xk, ln_w, ln_b, eps)
  grad_z1 = dots.nt(grad_z2, w["W2"]) * common.gelu_tanh_grad(z1)
  w1, b1 = common.sgd_update(w["W1"], w["b1"], mb.xk, grad_z1, mb.eta_col, dots)
  w2, b2 = common.sgd_update(w["W2"], w["b2"], x2, grad_z2, mb.eta_col, dots)
  if mb.eta_mat is None:
    z_bar = dots.nn(common.gelu_tanh(dots.nn(mb.xq, w1) + b1), w2) + b2
  else:
    # Token t's hidden layer is read with its own W1_t, b1_t; its output layer then with W2_t, b2_t
    # whose inputs are the key-side activations x2.
    x2_bar = common.gelu_tanh(
        common.dual_readout(mb.xq, mb.xk, w["W1"], w["b1"], grad_z1, mb.eta_mat, dots))
    z_bar = common.dual_readout(x2_bar, x2, w["W2"], w["b2"], grad_z2, mb.eta_mat, dots)
  new = {"W1": w1, "b1": b1, "W2": w2, "b2": b2}
  return new, mb.xq + common.layer_norm(z_bar, ln_w, ln_b, eps)
