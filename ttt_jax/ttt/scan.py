"""Mini-batch TTT over a sequence: `ttt_scan`, the one public entry point of the TTT core.

For mini-batch i with tokens T_i (see ../shared/PAPER.md, "TTT layer"):
  W_i = W_{i-1} - sum_{t in T_i} eta_t grad l_t(W_{i-1})
  non-causal (video):  z_t = xq_t + LN(f_res(xq_t; W_i))
  causal (LM):         z_t = xq_t + LN(f_res(xq_t; W_{i-1} - sum_{s in T_i, s<=t} eta_ts grad l_s(W_{i-1})))

Implementations that return the same numbers:
  impl="grad": the design card's form. lax.scan over mini-batches, inner gradient by jax.grad of the
    inner loss; the causal variant materialises one weight set per token (readable, not fast). Its
    outer gradients are JAX's autodiff: the reference for the others.
  impl="dual": the step of dual.py (inner gradient by hand, as matmuls; causal by the triangular
    "dual form", never materialising per-token weights) under lax.scan, with a custom_vjp whose
    backward is dual.backward: groups in reverse, carrying the cotangent of W_i; each group's
    forward re-run once from the weights saved at its start, its residuals kept, then its
    mini-batches pulled back in reverse. checkpoint_group_size=None saves every mini-batch's
    weights and residuals in the forward instead, and the backward is dual.backward alone (no
    forward matmul twice; memory grows with them, see `ttt_scan`). The loops run over the
    mini-batches of [batch * heads, n, ...] (a reshape of the inputs), slicing mini-batch i out
    of axis 1 and writing z and the input cotangents back in place, with the step vmapped over
    batch * heads, so every term is one batched matmul and no transpose moves the inputs, z or
    their cotangents.
  impl="dual_autodiff": the same forward, differentiated by JAX through the scan and jax.checkpoint
    (the backward before dual.backward existed; bench/ttt_layer.py measures against it).
  impl="pallas": the fused kernels of pallas_kernels/ (same semantics, see that package).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ttt_jax.ttt import dual
from ttt_jax.ttt import inner as inner_lib

IMPLS = ("grad", "dual", "dual_autodiff", "pallas")
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


@dataclasses.dataclass(frozen=True)
class _DualConfig:
  """Static arguments of the dual scan (hashable: they key its custom_vjp). Its steps take every
  array with a leading [batch * heads] axis: one step is then a batched matmul per term."""
  inner: str
  eps: float
  group_size: int | None
  matmul_dtype: str
  state_dtype: str

  @property
  def dots(self) -> dual.Dots:
    return dual.Dots(jnp.dtype(self.matmul_dtype), jnp.dtype(self.state_dtype))

  def forward(self, w, ln_w, ln_b, mb):
    """dual.forward over [batch * heads]: (weights after, z, residuals)."""
    step = functools.partial(dual.forward, self.inner, eps=self.eps, dots=self.dots)
    return jax.vmap(step)(w, ln_w, ln_b, mb)

  def step(self, w, ln_w, ln_b, mb):
    return self.forward(w, ln_w, ln_b, mb)[:2]

  def backward(self, w, w_new, ln_w, ln_b, mb, res, dw_new, dz):
    step = functools.partial(dual.backward, self.inner, dots=self.dots)
    return jax.vmap(step)(w, w_new, ln_w, ln_b, mb, res, dw_new, dz)


def _mini_batch(xs, i):
  """Mini-batch i (an int or traced) of xs [batch * heads, n, ...]: [batch * heads, ...]."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False), xs)


def _put(bufs, vals, i):
  """bufs [batch * heads, n, ...] with mini-batch i set to vals [batch * heads, ...]."""
  return jax.tree.map(lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, i, axis=1),
                      bufs, vals)


def _run(cfg: _DualConfig, w, ln_w, ln_b, xs, z, start, count: int):
  """Mini-batches start .. start + count - 1 in order: (the weights after them, z with theirs
  written in)."""
  def body(i, carry):
    w, z = carry
    w, z_i = cfg.step(w, ln_w, ln_b, _mini_batch(xs, i))
    return w, _put(z, z_i, i)

  return jax.lax.fori_loop(start, start + count, body, (w, z))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dual_scan(cfg: _DualConfig, w0: inner_lib.Weights, ln_w: jax.Array, ln_b: jax.Array,
               xs: dual.MiniBatch) -> tuple[inner_lib.Weights, jax.Array]:
  """impl="dual": (final weights, z [batch * heads, n, b, d]).

  w0, ln_w, ln_b carry a leading [batch * heads] axis; xs is [batch * heads, n, b, ...] (a reshape
  of the [batch, heads, seq, ...] inputs, no transpose): the loops slice mini-batch i out of axis
  1 and write z and the input cotangents back in place.
  """
  return _run(cfg, w0, ln_w, ln_b, xs, jnp.zeros_like(xs.xq), 0, xs.xq.shape[1])


def _dual_scan_fwd(cfg, w0, ln_w, ln_b, xs):
  n = xs.xq.shape[1]
  z = jnp.zeros_like(xs.xq)
  if cfg.group_size is None:
    # Keep every mini-batch's starting weights and `dual.forward`'s residuals ([n, ...]): the
    # backward then runs `dual.backward` alone, no forward matmul again.
    def collect(carry, i):
      w, z = carry
      w_new, z_i, res = cfg.forward(w, ln_w, ln_b, _mini_batch(xs, i))
      return (w_new, _put(z, z_i, i)), (w, dual.stored_residuals(res))

    (w, z), (ws, res) = jax.lax.scan(collect, (w0, z), jnp.arange(n))
    return (w, z), (ln_w, ln_b, xs, (ws, w, res))
  # Keep only the weights at group starts; the backward re-runs one group at a time.
  g = min(cfg.group_size, n)
  n_full = n // g

  def group(carry, k):
    w, z = carry
    return _run(cfg, w, ln_w, ln_b, xs, z, k * g, g), w

  (w, z), ckpts = jax.lax.scan(group, (w0, z), jnp.arange(n_full))
  w_tail = w
  if n_full * g < n:
    w, z = _run(cfg, w, ln_w, ln_b, xs, z, n_full * g, n - n_full * g)
  return (w, z), (ln_w, ln_b, xs, (ckpts, w_tail))


def _group_backward(cfg: _DualConfig, w_start, ln_w, ln_b, xs, dz, start, m: int, carry):
  """One checkpoint group, mini-batches start .. start + m - 1 of xs, dz, in reverse: re-run it
  from its starting weights, keeping each mini-batch's weights and `dual.forward`'s residuals,
  then pull the cotangents back through `dual.backward` mini-batch by mini-batch; carry = (dW,
  d ln_w, d ln_b, the input cotangents [batch * heads, n, ...], this group's written in place).

  The group's forward runs once in the backward. Its mini-batches are unrolled (groups are a few
  mini-batches): the residuals stay values of one loop body instead of stacks that two inner
  scans write, copy and read back.
  """
  mbs = [_mini_batch(xs, start + j) for j in range(m)]
  ws, res = [w_start], []
  for mb in mbs:
    w_new, _, res_i = cfg.forward(ws[-1], ln_w, ln_b, mb)
    ws.append(w_new)
    res.append(res_i)
  dw, d_lnw, d_lnb, dxs = carry
  for j in reversed(range(m)):
    dw, dlnw_j, dlnb_j, d_mb = cfg.backward(ws[j], ws[j + 1], ln_w, ln_b, mbs[j], res[j], dw,
                                            _mini_batch(dz, start + j))
    d_lnw, d_lnb = d_lnw + dlnw_j, d_lnb + dlnb_j
    dxs = _put(dxs, d_mb, start + j)
  return dw, d_lnw, d_lnb, dxs


def _dual_scan_bwd(cfg, saved, cotangents):
  ln_w, ln_b, xs, rest = saved
  dw, dz = cotangents
  n = xs.xq.shape[1]
  carry = (dw, jnp.zeros_like(ln_w), jnp.zeros_like(ln_b), jax.tree.map(jnp.zeros_like, xs))
  if cfg.group_size is None:
    # In reverse; the weights after mini-batch i (those before i + 1) ride in the carry, so the
    # saved stack is not copied into a shifted one.
    def body(carry, inputs):
      dw, w_new, d_lnw, d_lnb, dxs = carry
      i, w, res = inputs
      dw, dlnw_i, dlnb_i, d_mb = cfg.backward(w, w_new, ln_w, ln_b, _mini_batch(xs, i),
                                              dual.full_residuals(res), dw, _mini_batch(dz, i))
      return (dw, w, d_lnw + dlnw_i, d_lnb + dlnb_i, _put(dxs, d_mb, i)), None

    ws, w_final, res = rest
    dw, d_lnw, d_lnb, dxs = carry
    (dw, _, d_lnw, d_lnb, dxs), _ = jax.lax.scan(body, (dw, w_final, d_lnw, d_lnb, dxs),
                                                 (jnp.arange(n), ws, res), reverse=True)
    return dw, d_lnw, d_lnb, dxs

  ckpts, w_tail = rest
  g = min(cfg.group_size, n)
  n_full = n // g
  if n_full * g < n:
    carry = _group_backward(cfg, w_tail, ln_w, ln_b, xs, dz, n_full * g, n - n_full * g, carry)

  def group(carry, inputs):
    k, w_start = inputs
    return _group_backward(cfg, w_start, ln_w, ln_b, xs, dz, k * g, g, carry), None

  carry, _ = jax.lax.scan(group, carry, (jnp.arange(n_full), ckpts), reverse=True)
  return carry


_dual_scan.defvjp(_dual_scan_fwd, _dual_scan_bwd)


def _split_groups(tree, g: int):
  """[n, ...] leaves -> ([n // g, g, ...], [n % g, ...]); a g over n is cut to n."""
  n = jax.tree.leaves(tree)[0].shape[0]
  g = min(g, n)
  n_full = n // g
  full = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), tree)
  return full, jax.tree.map(lambda a: a[n_full * g:], tree)


def _scan_groups(step, w0, xs, group_size: int | None):
  """lax.scan of `step` over the leading (mini-batch) axis of xs, rematerialised per group.

  With groups of g mini-batches, the backward pass keeps only the weights at group boundaries
  and recomputes inside one group at a time, so memory grows with seq/g * state + g * activations
  instead of seq/b * state.
  """
  run = lambda w, chunk: jax.lax.scan(step, w, chunk)
  if group_size is None:
    return run(w0, xs)
  run = jax.checkpoint(run)
  full, tail = _split_groups(xs, group_size)
  w, z = jax.lax.scan(run, w0, full)
  z = z.reshape(-1, *z.shape[2:])
  if jax.tree.leaves(tail)[0].shape[0]:
    w, z_tail = run(w, tail)
    z = jnp.concatenate([z, z_tail], axis=0)
  return w, z


def _check_inputs(inner, params, xq, xk, xv, eta, mini_batch_size, impl):
  inner_lib.check_inner(inner)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
    raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
  if xq.ndim != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
    raise ValueError("xq, xk, xv must all be [batch, heads, seq, head_dim]; got "
                     f"{xq.shape}, {xk.shape}, {xv.shape}")
  batch, heads, seq, d = xq.shape
  # A per-(token, source) eta without causal is rejected by dual.eta_inputs.
  if eta.shape not in ((batch, heads, seq), (batch, heads, seq, mini_batch_size)):
    raise ValueError(f"eta must be [batch, heads, seq] = {(batch, heads, seq)} (or, causal, "
                     f"[batch, heads, seq, mini_batch_size]); got {eta.shape}")
  want = set(inner_lib.WEIGHT_KEYS[inner]) | {"ln_weight", "ln_bias"}
  if set(params) != want:
    raise ValueError(f"params for inner={inner!r} need keys {sorted(want)}, got {sorted(params)}")
  if params["W1"].shape[:2] != (heads, d) or params["ln_weight"].shape != (heads, d):
    raise ValueError(f"params W1 {params['W1'].shape} / ln_weight {params['ln_weight'].shape} "
                     f"do not match heads={heads}, head_dim={d}")


def ttt_scan(inner: str, params: Params, xq: jax.Array, xk: jax.Array, xv: jax.Array,
             eta: jax.Array, *, mini_batch_size: int, causal: bool = False, impl: str = "grad",
             checkpoint_group_size: int | None = DEFAULT_CHECKPOINT_GROUP_SIZE,
             eps: float = inner_lib.DEFAULT_EPS, matmul_dtype: Any = None,
             platform: str | None = None) -> tuple[jax.Array, Params]:
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
    impl: "grad", "dual", "dual_autodiff" or "pallas" (same numbers; see the module docstring).
    checkpoint_group_size: rematerialise every this many mini-batches in the backward pass
      (the weights are saved at group starts; the backward re-runs one group's forward at a
      time). impl="dual" unrolls a group in its backward, so compile time grows with it (16:
      about twice 4's). None rematerialises nothing: every mini-batch's residuals are kept, and
      impl="dual"'s backward runs only `dual.backward` (it keeps each mini-batch's starting
      weights and `dual.forward`'s activations but the GELUs' tanh: for MLP with hidden h,
      2 d h + 3 b h + 2 b d numbers a mini-batch and head, + 2 b^2 causal, about 3.7x the inputs
      and their gradients at d = b = 64). impl="pallas" always rematerialises (an int >= 1;
      None is refused).
    eps: inner LayerNorm epsilon (the reference uses 1e-8).
    matmul_dtype: operand dtype of the inner matmuls for the dual and pallas impls, e.g.
      jnp.bfloat16 (the MXU's and tensor cores' rate); the inner state, the statistics and the
      accumulation stay in the state dtype. None: the state dtype.
    platform: impl="pallas" only: the platform the program compiles for ("tpu", "gpu" compile
      the kernels, anything else interprets them); None: jax.default_backend().

  Returns:
    z: [batch, heads, seq, head_dim] in xq's dtype.
    final_params: the inner weights after the last mini-batch, batched over the batch:
      W1 [batch, heads, d, h], b1 [batch, heads, 1, h], ... (float32, or float64 for float64 input).
  """
  _check_inputs(inner, params, xq, xk, xv, eta, mini_batch_size, impl)
  if matmul_dtype is not None and impl == "grad":
    raise ValueError("matmul_dtype needs impl='dual', 'dual_autodiff' or 'pallas'; impl='grad' "
                     "is the full-precision reference")
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
    # The kernels take their matmul operands in xq's dtype.
    xq, xk, xv = (a.astype(matmul_dtype or dtype) for a in (xq, xk, xv))
    z, final = ttt_scan_pallas(inner, params, xq, xk, xv, eta, mini_batch_size=mini_batch_size,
                               causal=causal, checkpoint_group_size=checkpoint_group_size,
                               eps=eps, platform=platform)
    return z[:, :, :seq].astype(out_dtype), final

  to_mb = lambda a: a.reshape(batch, heads, n_mb, mini_batch_size, d)
  xs = dual.MiniBatch(*map(to_mb, (xq, xk, xv)), *dual.eta_inputs(eta, mini_batch_size, causal))
  w0 = {k: params[k] for k in inner_lib.WEIGHT_KEYS[inner]}
  cfg = _DualConfig(inner, float(eps), checkpoint_group_size,
                    jnp.dtype(matmul_dtype or dtype).name, jnp.dtype(dtype).name)

  if impl == "dual":
    # [batch, heads, n, ...] -> [batch * heads, n, ...], a reshape (no transpose of the inputs,
    # z or their cotangents); W0 and the LayerNorm broadcast over the batch (autodiff sums their
    # cotangents back).
    flat = lambda a: a.reshape(batch * heads, *a.shape[2:])
    per_bh = lambda a: jnp.broadcast_to(a, (batch, *a.shape)).reshape(batch * heads, *a.shape[1:])
    final, z = _dual_scan(cfg, jax.tree.map(per_bh, w0), per_bh(params["ln_weight"]),
                          per_bh(params["ln_bias"]), jax.tree.map(flat, xs))
    final = jax.tree.map(lambda a: a.reshape(batch, heads, *a.shape[1:]), final)
    z = z.reshape(batch, heads, n_mb * mini_batch_size, d)[:, :, :seq]
    return z.astype(out_dtype), final

  def per_head(w, ln_w, ln_b, mbs):
    if impl == "grad":
      # The reference's eta: each token's step [n, b], or causal the masked [n, b, b].
      eta_grad = mbs.eta_mat if causal else mbs.eta_col[..., 0]
      step = functools.partial(_step_grad, inner, causal, eps, ln_w, ln_b)
      return _scan_groups(step, w, (mbs.xq, mbs.xk, mbs.xv, eta_grad), checkpoint_group_size)
    step = lambda w_, mb: dual.step(inner, w_, ln_w, ln_b, mb, eps=cfg.eps, dots=cfg.dots)
    return _scan_groups(step, w, mbs, checkpoint_group_size)

  over_heads = jax.vmap(per_head, in_axes=(0, 0, 0, 0))
  over_batch = jax.vmap(over_heads, in_axes=(None, None, None, 0))
  final, z = over_batch(w0, params["ln_weight"], params["ln_bias"], xs)
  z = z.reshape(batch, heads, n_mb * mini_batch_size, d)[:, :, :seq]
  return z.astype(out_dtype), final
