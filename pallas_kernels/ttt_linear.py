"""TTT-Linear inner model for the fused kernels: f_res(x) = x @ W1 + b1.

`step` is one mini-batch of one head (see common.py for the layout); the kernels run it in the
forward scan and differentiate it with jax.vjp in the backward scan.
"""
from __future__ import annotations

import jax

from pallas_kernels import common

WEIGHT_KEYS = ("W1", "b1")


def step(w: common.Weights, ln_w: jax.Array, ln_b: jax.Array, mb: common.MiniBatch, *,
         eps: float, dots: common.Dots) -> tuple[common.Weights, jax.Array]:
  """One mini-batch. W1 [d, d], b1 [1, d]; ln_w, ln_b [1, d] -> (new weights, z [b, d])."""
  z1 = dots.nn(mb.xk, w["W1"]) + w["b1"]
  grad_z1 = common.layer_norm_l2_grad(z1, mb.xv - mb.xk, ln_w, ln_b, eps)
  w1, b1 = common.sgd_update(w["W1"], w["b1"], mb.xk, grad_z1, mb.eta_col, dots)
  if mb.eta_mat is None:
    z_bar = dots.nn(mb.xq, w1) + b1
  else:
    z_bar = common.dual_readout(mb.xq, mb.xk, w["W1"], w["b1"], grad_z1, mb.eta_mat, dots)
  return {"W1": w1, "b1": b1}, mb.xq + common.layer_norm(z_bar, ln_w, ln_b, eps)
