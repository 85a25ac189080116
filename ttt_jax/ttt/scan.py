"""Mini-batch TTT over a sequence: `ttt_scan`, the one public entry point of the TTT core.

For mini-batch i with tokens T_i (see ../shared/PAPER.md, "TTT layer"):
  W_i = W_{i-1} - sum_{t in T_i} eta_t grad l_t(W_{i-1})
  non-causal (video):  z_t = xq_t + LN(f_res(xq_t; W_i))
  causal (LM):         z_t = xq_t + LN(f_res(xq_t; W_{i-1} - sum_{s in T_i, s<=t} eta_ts grad l_s(W_{i-1})))

Two implementations that return the same numbers:
  impl="grad": the design card's form. lax.scan over mini-batches, inner gradient by jax.grad of the
    inner loss; the causal variant materialises one weight set per token (readable, not fast).
  impl="dual": the inner gradient written out by hand (LN+L2 backward, GELU backward) as matmuls;
    the causal variant uses the triangular "dual form" and never materialises per-token weights.
  impl="pallas": the fused kernels of pallas_kernels/ (same semantics, see that package).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ttt_jax.ttt import inner as inner_lib

IMPLS = ("grad", "dual", "pallas")
# The paper checkpoints every 16 mini-batches for TTT-MLP in training.
DEFAULT_CHECKPOINT_GROUP_SIZE = 16

Params = dict[str, jax.Array]


def _step_grad(inner: str, causal: bool, eps: float, ln_w: jax.Array, ln_b: jax.Array,
               w: inner_lib.Weights, xs: tuple[jax.Array, ...]):
  """One mini-batch with jax.grad. xq/xk/xv [b, d]; eta [b] (non-causal) or [b, b] (causal)."""
  xq, xk, xv, eta = xs
  losses = functools.partial(inner_lib.token_losses, inner, ln_weight=ln_w, ln_bias=ln_b, eps=eps)
  if not causal:
    grads = jax.grad(lambda w_: jnp.sum(eta * losses(w_, xk=xk, xv=xv)))(w)
    w_new = jax.tree.map(jnp.subtract, w, grads)
    return w_new, inner_lib.apply(inner, w_new, ln_w, ln_b, xq, eps)
  # Per-token gradients [b, ...], then per-token weights W_t = W - sum_s eta_ts grad_s.
  per_token = jax.vmap(
      jax.grad(lambda w_, k, v: losses(w_, xk=k[None], xv=v[None])[0]), in_axes=(None, 0, 0))
  grads = per_token(w, xk, xv)
  w_tok = jax.tree.map(lambda p, g: p[None] - jnp.einsum("ts,s...->t...", eta, g), w, grads)
  z = jax.vmap(lambda wt, q: inner_lib.apply(inner, wt, ln_w, ln_b, q[None], eps)[0])(w_tok, xq)
  w_new = jax.tree.map(lambda p: p[-1], w_tok)
  return w_new, z


def _step_dual(inner: str, causal: bool, eps: float, ln_w: jax.Array, ln_b: jax.Array,
               w: inner_lib.Weights, xs: tuple[jax.Array, ...]):
  """One mini-batch, gradients by hand. Shapes as `_step_grad`."""
  xq, xk, xv, eta = xs
  target = xv - xk
  z1 = xk @ w["W1"] + w["b1"]
  if inner == "mlp":
    x2 = inner_lib.gelu_tanh(z1)
    grad_z2 = inner_lib.layer_norm_l2_grad(x2 @ w["W2"] + w["b2"], target, ln_w, ln_b, eps)
    grad_z1 = (grad_z2 @ w["W2"].T) * inner_lib.gelu_tanh_grad(z1)
  else:
    grad_z1 = inner_lib.layer_norm_l2_grad(z1, target, ln_w, ln_b, eps)
  # The final weights of the mini-batch take every token's step with the last token's row of eta.
  eta_last = (eta[-1] if causal else eta)[:, None]
  w_new = {"W1": w["W1"] - xk.T @ (eta_last * grad_z1),
           "b1": w["b1"] - jnp.sum(eta_last * grad_z1, axis=0, keepdims=True)}
  if inner == "mlp":
    w_new["W2"] = w["W2"] - x2.T @ (eta_last * grad_z2)
    w_new["b2"] = w["b2"] - jnp.sum(eta_last * grad_z2, axis=0, keepdims=True)
  if causal:
    # z_bar_t = xq_t W_t + b_t with W_t = W - sum_s eta_ts x_s^T g_s, b_t = b - sum_s eta_ts g_s:
    # the (xq_t . x_s + 1) kernel, masked by eta_ts, replaces the per-token weights.
    z_bar = xq @ w["W1"] + w["b1"] - (eta * (xq @ xk.T + 1.0)) @ grad_z1
    if inner == "mlp":
      x2_bar = inner_lib.gelu_tanh(z_bar)
      z_bar = x2_bar @ w["W2"] + w["b2"] - (eta * (x2_bar @ x2.T + 1.0)) @ grad_z2
  else:
    z_bar = inner_lib.f_res(inner, w_new, xq)
  return w_new, xq + inner_lib.layer_norm(z_bar, ln_w, ln_b, eps)


def _scan_groups(step, w0, xs, group_size: int | None):
  """lax.scan of `step` over the leading (mini-batch) axis of xs, rematerialised per group.

  With groups of g mini-batches, the backward pass keeps only the weights at group boundaries
  and recomputes inside one group at a time, so memory grows with seq/g * state + g * activations
  instead of seq/b * state.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  run = lambda w, chunk: jax.lax.scan(step, w, chunk)
  if group_size is None:
    return run(w0, xs)
  run = jax.checkpoint(run)
  g = min(group_size, n)
  n_full, rem = divmod(n, g)
  grouped = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), xs)
  w, z = jax.lax.scan(run, w0, grouped)
  z = z.reshape(n_full * g, *z.shape[2:])
  if rem:
    w, z_rem = run(w, jax.tree.map(lambda a: a[n_full * g:], xs))
    z = jnp.concatenate([z, z_rem], axis=0)
  return w, z


def _check_inputs(inner, params, xq, xk, xv, eta, mini_batch_size, causal, impl):
  inner_lib.check_inner(inner)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
    raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
  if xq.ndim != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
    raise ValueError("xq, xk, xv must all be [batch, heads, seq, head_dim]; got "
                     f"{xq.shape}, {xk.shape}, {xv.shape}")
  b, h, s, d = xq.shape
  if eta.shape == (b, h, s, mini_batch_size):
    if not causal:
      raise ValueError("a per-(token, source) eta [batch, heads, seq, mini_batch_size] is only "
                       "meaningful with causal=True")
  elif eta.shape != (b, h, s):
    raise ValueError(f"eta must be [batch, heads, seq] = {(b, h, s)} (or, causal, "
                     f"[batch, heads, seq, mini_batch_size]); got {eta.shape}")
  want = set(inner_lib.WEIGHT_KEYS[inner]) | {"ln_weight", "ln_bias"}
  if set(params) != want:
    raise ValueError(f"params for inner={inner!r} need keys {sorted(want)}, got {sorted(params)}")
  if params["W1"].shape[:2] != (h, d) or params["ln_weight"].shape != (h, d):
    raise ValueError(f"params W1 {params['W1'].shape} / ln_weight {params['ln_weight'].shape} "
                     f"do not match heads={h}, head_dim={d}")


def ttt_scan(inner: str, params: Params, xq: jax.Array, xk: jax.Array, xv: jax.Array,
             eta: jax.Array, *, mini_batch_size: int, causal: bool = False, impl: str = "grad",
             checkpoint_group_size: int | None = DEFAULT_CHECKPOINT_GROUP_SIZE,
             eps: float = inner_lib.DEFAULT_EPS) -> tuple[jax.Array, Params]:
  """Runs mini-batch TTT over a sequence for every (batch, head).

  Args:
    inner: "mlp" or "linear".
    params: initial inner weights W0 shared across the batch, W1 [heads, d, h], b1 [heads, 1, h],
      (W2 [heads, h, d], b2 [heads, 1, d]), and the inner LayerNorm ln_weight, ln_bias [heads, d].
    xq, xk, xv: [batch, heads, seq, head_dim].
    eta: [batch, heads, seq], the per-token step (base_lr/head_dim and 1/mini_batch_size already
      folded in). With causal=True also [batch, heads, seq, mini_batch_size]: eta[..., t, s] is the
      step with which token s of t's mini-batch enters the weights t reads (entries s > t are
      ignored); the final weights of a mini-batch use its last token's row.
    mini_batch_size: tokens per inner step. A seq that is not a multiple is padded with eta = 0
      tokens (which leave the weights unchanged) and the padding is trimmed from z.
    causal: within-mini-batch causal read-out (language models) instead of W_i for all (video).
    impl: "grad", "dual" or "pallas" (same numbers).
    checkpoint_group_size: rematerialise every this many mini-batches in the backward pass;
      None stores every mini-batch's residuals.
    eps: inner LayerNorm epsilon (the reference uses 1e-8).

  Returns:
    z: [batch, heads, seq, head_dim] in xq's dtype.
    final_params: the inner weights after the last mini-batch, batched over the batch:
      W1 [batch, heads, d, h], b1 [batch, heads, 1, h], ... (float32, or float64 for float64 input).
  """
  _check_inputs(inner, params, xq, xk, xv, eta, mini_batch_size, causal, impl)
  batch, heads, seq, d = xq.shape
  out_dtype = xq.dtype
  # fp32 inner state and statistics for bf16/fp16 input; float64 stays float64.
  dtype = jnp.promote_types(jnp.result_type(xq, xk, xv, eta, *jax.tree.leaves(params)),
                            jnp.float32)
  xq, xk, xv, eta = (a.astype(dtype) for a in (xq, xk, xv, eta))
  params = jax.tree.map(lambda a: a.astype(dtype), params)

  pad = -seq % mini_batch_size
  if pad:
    pad_seq = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
    xq, xk, xv, eta = map(pad_seq, (xq, xk, xv, eta))
  n_mb = (seq + pad) // mini_batch_size

  if impl == "pallas":
    # Imported here: the kernels are optional at import time and pull in Pallas.
    from pallas_kernels import ttt_scan_pallas
    z, final = ttt_scan_pallas(inner, params, xq, xk, xv, eta, mini_batch_size=mini_batch_size,
                               causal=causal, checkpoint_group_size=checkpoint_group_size,
                               eps=eps)
    return z[:, :, :seq].astype(out_dtype), final

  b = mini_batch_size
  if causal:
    mask = jnp.tril(jnp.ones((b, b), dtype))
    if eta.ndim == 3:
      eta = eta.reshape(batch, heads, n_mb, 1, b) * mask
    else:
      eta = eta.reshape(batch, heads, n_mb, b, b) * mask
  else:
    eta = eta.reshape(batch, heads, n_mb, b)
  to_mb = lambda a: a.reshape(batch, heads, n_mb, b, d)
  xq, xk, xv = map(to_mb, (xq, xk, xv))
  step_fn = {"grad": _step_grad, "dual": _step_dual}[impl]
  w0 = {k: params[k] for k in inner_lib.WEIGHT_KEYS[inner]}

  def per_head(w, ln_w, ln_b, q, k, v, e):
    step = functools.partial(step_fn, inner, causal, eps, ln_w, ln_b)
    return _scan_groups(step, w, (q, k, v, e), checkpoint_group_size)

  over_heads = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0))
  over_batch = jax.vmap(over_heads, in_axes=(None, None, None, 0, 0, 0, 0))
  final, z = over_batch(w0, params["ln_weight"], params["ln_bias"], xq, xk, xv, eta)
  z = z.reshape(batch, heads, n_mb * b, d)[:, :, :seq]
  return z.astype(out_dtype), final
