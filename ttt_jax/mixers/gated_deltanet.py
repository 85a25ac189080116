"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024), chunked (WY/UT form) and recurrent.

Per head, with state S_t `[value_dim, key_dim]`:
  S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T,   o_t = S_t q_t,
alpha_t = exp(g_t), g_t = -exp(a_log) softplus(raw_t + dt_bias) (Mamba-2's decay),
beta_t = sigmoid(.), q and k L2-normalised (q also scaled by key_dim^-1/2). Causal; the
bidirectional DiT block gets the other direction with reverse=True.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.mixers.common import (GatedRMSNorm, SequenceMixer, ShortConv, decay_params,
                                   dense_together, l2_normalize, linear, pad_to_multiple)


def gated_delta_rule_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                               beta: jax.Array) -> jax.Array:
  """Token-by-token gated delta rule (the reference).

  Args:
    q, k: `[batch, seq, heads, key_dim]`.
    v: `[batch, seq, heads, value_dim]`.
    g: `[batch, seq, heads]`, log decay (alpha = exp(g)).
    beta: `[batch, seq, heads]`, write strengths.

  Returns:
    o: `[batch, seq, heads, value_dim]`.
  """
  def step(s, inputs):
    q_t, k_t, v_t, g_t, beta_t = inputs
    s_k = jnp.einsum("bhvk,bhk->bhv", s, k_t)
    s = (jnp.exp(g_t)[..., None, None] * (s - jnp.einsum("bh,bhv,bhk->bhvk", beta_t, s_k, k_t))
         + jnp.einsum("bh,bhv,bhk->bhvk", beta_t, v_t, k_t))
    return s, jnp.einsum("bhvk,bhk->bhv", s, q_t)

  batch, _, heads, key_dim = k.shape
  s0 = jnp.zeros((batch, heads, v.shape[-1], key_dim), v.dtype)
  _, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1)


# Diagonal blocks up to this size are inverted in product form; larger ones by block doubling.
# The product form multiplies powers of A up to A^(n/2), whose entries can grow like
# binomial(n-1, n/2 - 1) for |A_ti| <= 1: 35 at n = 8, harmless in float32.
_PRODUCT_FORM_SIZE = 8


def _product_form_inverse(a: jax.Array) -> jax.Array:
  """(I + A)^-1 = (I - A)(I + A^2)(I + A^4)... for strictly lower `a` `[..., n, n]`.

  A is nilpotent (A^n = 0), so the product of the ceil(log2 n) factors is the whole series
  sum_k (-A)^k.
  """
  n = a.shape[-1]
  eye = jnp.eye(n, dtype=a.dtype)
  power = -a
  inverse = eye + power
  for _ in range(1, max(1, math.ceil(math.log2(n)))):
    power = power @ power
    inverse = inverse @ (eye + power)
  return inverse


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + A)^-1 for strictly lower `a` `[..., n, n]` by block doubling.

  With A = [[A11, 0], [A21, A22]]: (I + A)^-1 = [[T11, 0], [-T22 A21 T11, T22]], where
  T11, T22 are the inverses of the two diagonal blocks, found together (stacked on a new batch
  axis) by the same rule, down to blocks of _PRODUCT_FORM_SIZE rows. An odd size gets a zero row
  and column (an identity block), which leaves the other entries of the inverse as they are.
  """
  n = a.shape[-1]
  if n <= _PRODUCT_FORM_SIZE:
    return _product_form_inverse(a)
  if n % 2:
    padded = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, 1), (0, 1)])
    return _unit_lower_inverse(padded)[..., :n, :n]
  h = n // 2
  diagonal = _unit_lower_inverse(jnp.stack([a[..., :h, :h], a[..., h:, h:]], axis=-3))
  t11, t22 = diagonal[..., 0, :, :], diagonal[..., 1, :, :]
  t21 = -(t22 @ a[..., h:, :h]) @ t11
  return jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                          jnp.concatenate([t21, t22], -1)], -2)


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + A)^-1 for strictly lower `a` `[..., n, n]`; only A's strict lower part is read.

  Written with matmuls instead of `lax.linalg.triangular_solve`: on CPU that lowers to jaxlib's
  LAPACK trsm kernel, which can deadlock XLA's thread pool (bench/repro_gdn_hang.py).
  """
  return _unit_lower_inverse(jnp.where(_strictly_lower(a.shape[-1]), a, 0))


def _strictly_lower(n: int) -> jax.Array:
  return jnp.tril(jnp.ones((n, n), bool), -1)


def _unit_lower_inverse_fwd(a):
  t = unit_lower_inverse(a)
  return t, t


def _unit_lower_inverse_bwd(t, dt):
  # d(M^-1) = -M^-1 dM M^-1, so dA = -T^T dT T^T, restricted to the strict lower part.
  t_transposed = jnp.swapaxes(t, -1, -2)
  return (jnp.where(_strictly_lower(t.shape[-1]), -(t_transposed @ dt) @ t_transposed, 0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


@jax.custom_vjp
def _within_chunk(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array
                  ) -> tuple[jax.Array, ...]:
  """Everything of the chunked form that needs no state, for all chunks at once.

  Args: q, k `[..., chunk, key_dim]`, v `[..., chunk, value_dim]`, g and beta `[..., chunk]`.
  Returns (w, u_prime, attn, q_decayed, k_to_end, gamma_end) as in `gated_delta_rule_chunked`.
  The written-out VJP turns autodiff's row and column sums (of the decays, of beta) into dots:
  XLA:CPU ran those reductions several times slower than the rest of the chunk work (issue 18).
  """
  return _within_chunk_fwd(q, k, v, g, beta)[0]


def _within_chunk_fwd(q, k, v, g, beta):
  n = k.shape[-2]
  log_gamma = jnp.cumsum(g, axis=-1)
  # exp only on the kept triangle: the masked differences are positive and could overflow.
  diff = log_gamma[..., :, None] - log_gamma[..., None, :]  # [..., t, i]
  decay = jnp.exp(jnp.where(jnp.tril(jnp.ones((n, n), bool)), diff, -jnp.inf))  # ones on diagonal
  strict_decay = decay * _strictly_lower(n)
  gram = jnp.einsum("...td,...id->...ti", k, k)
  inverse = unit_lower_inverse(beta[..., None] * strict_decay * gram)
  gamma = jnp.exp(log_gamma)
  k_scaled = (beta * gamma)[..., None] * k
  v_scaled = beta[..., None] * v
  qk = jnp.einsum("...td,...id->...ti", q, k)
  to_end = jnp.exp(log_gamma[..., -1:] - log_gamma)
  outputs = (inverse @ k_scaled, inverse @ v_scaled, decay * qk, gamma[..., None] * q,
             to_end[..., None] * k, gamma[..., -1])
  return outputs, (q, k, v, beta, gamma, to_end, strict_decay, gram, qk, decay, inverse,
                   k_scaled, v_scaled)


def _within_chunk_bwd(residuals, cotangents):
  (q, k, v, beta, gamma, to_end, strict_decay, gram, qk, decay, inverse, k_scaled,
   v_scaled) = residuals
  dw, du_prime, dattn, dq_decayed, dk_to_end, dgamma_end = cotangents
  rows = lambda x, y: jnp.einsum("...td,...td->...t", x, y)  # sum over the last axis, as a dot
  columns = lambda x, y: jnp.einsum("...ti,...ti->...i", x, y)
  d_inverse = (jnp.einsum("...td,...id->...ti", dw, k_scaled)
               + jnp.einsum("...td,...id->...ti", du_prime, v_scaled))
  inverse_t = jnp.swapaxes(inverse, -1, -2)
  dk_scaled, dv_scaled = inverse_t @ dw, inverse_t @ du_prime
  (da,) = _unit_lower_inverse_bwd(inverse, d_inverse)  # A = beta * strict_decay * gram
  masked_gram = strict_decay * gram
  dbeta = rows(da, masked_gram) + rows(dv_scaled, v)
  da = beta[..., None] * da
  dgram = da * strict_decay
  dqk = dattn * decay
  # d log_gamma_t from the decays exp(log_gamma_t - log_gamma_i): row sums minus column sums.
  decay_terms = (da * masked_gram, dattn * decay * qk)
  dlog_gamma = sum(rows(x, jnp.ones_like(x)) - columns(x, jnp.ones_like(x)) for x in decay_terms)
  dk_scaled_k = rows(dk_scaled, k)
  dbeta = dbeta + gamma * dk_scaled_k
  dk_to_end_k = rows(dk_to_end, k)
  dlog_gamma = (dlog_gamma + beta * gamma * dk_scaled_k + gamma * rows(dq_decayed, q)
                - to_end * dk_to_end_k)
  # log_gamma_t = sum_{j<=t} g_j; the last one (in gamma_end and every to_end) reaches every g_j.
  n = k.shape[-2]
  dg = jnp.einsum("...t,tj->...j", dlog_gamma, jnp.tril(jnp.ones((n, n), dlog_gamma.dtype)))
  dg = dg + (jnp.einsum("...t,...t->...", to_end, dk_to_end_k) + gamma[..., -1] * dgamma_end
             )[..., None]
  dq = jnp.einsum("...ti,...id->...td", dqk, k) + gamma[..., None] * dq_decayed
  dk = (jnp.einsum("...ti,...td->...id", dqk, q)
        + (dgram + jnp.swapaxes(dgram, -1, -2)) @ k
        + (beta * gamma)[..., None] * dk_scaled + to_end[..., None] * dk_to_end)
  return dq, dk, beta[..., None] * dv_scaled, dg, dbeta


_within_chunk.defvjp(_within_chunk_fwd, _within_chunk_bwd)


def gated_delta_rule_chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                             beta: jax.Array, chunk_size: int) -> jax.Array:
  """The gated delta rule in chunked WY/UT form; same arguments as the recurrent one.

  Within a chunk, with gamma_t = prod_{s<=t} alpha_s and S_0 the state entering the chunk, the
  written values u_t = beta_t (v_t - alpha_t S_{t-1} k_t) solve the unit lower-triangular system
  (I + A) U = diag(beta) V - diag(beta gamma) K S_0^T, A_ti = beta_t (gamma_t/gamma_i) k_t.k_i
  for i < t. So U = U' - W S_0^T with U' = T diag(beta) V, W = T diag(beta gamma) K,
  T = (I + A)^-1 (`unit_lower_inverse`), all computed for every chunk at once (`_within_chunk`).
  The state after the chunk,
    S_C = gamma_C S_0 + U^T diag(gamma_C / gamma) K = S_0 M + B,
  is affine in S_0, with M and B for all chunks at once; only S_0 M + B runs chunk by chunk
  (`lax.scan`); then
    O = diag(gamma) Q S_0^T + (tril(Q K^T) * gamma_t/gamma_i) U
  is again computed for every chunk at once. Zero padding at the end (beta = 0) leaves earlier
  outputs unchanged.
  """
  seq = q.shape[1]
  chunk = min(chunk_size, seq)

  def chunks(t):  # [batch, seq, heads, ...] -> [batch, chunks, heads, chunk, ...]
    t = pad_to_multiple(t, chunk)
    return jnp.moveaxis(t.reshape(t.shape[0], -1, chunk, *t.shape[2:]), 3, 2)

  q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
  w, u_prime, attn, q_decayed, k_to_end, gamma_end = _within_chunk(q, k, v, g, beta)
  key_dim = k.shape[-1]
  transition = (gamma_end[..., None, None] * jnp.eye(key_dim, dtype=k.dtype)
                - jnp.einsum("...ck,...cj->...kj", w, k_to_end))
  written = jnp.einsum("...cv,...ck->...vk", u_prime, k_to_end)

  def step(state, chunk_terms):  # state: [batch, heads, value_dim, key_dim], entering the chunk
    chunk_transition, chunk_written = chunk_terms
    return state @ chunk_transition + chunk_written, state

  # One [value_dim, key_dim] @ [key_dim, key_dim] product per chunk in turn. A parallel prefix
  # (lax.associative_scan) does ~3x the products, and its slices, pads and concatenations at each
  # of log2(chunks) levels cost XLA:CPU more than the scan's steps (issue 18: 12% more CPU time
  # for the chunked form's forward and backward at 66 chunks).
  _, states = jax.lax.scan(step, jnp.zeros_like(written[:, 0]),
                           (jnp.moveaxis(transition, 1, 0), jnp.moveaxis(written, 1, 0)))
  states = jnp.moveaxis(states, 0, 1)  # [batch, chunks, heads, value_dim, key_dim]
  # The outputs read the states, for all chunks at once. With U = U' - W S_0^T,
  # O = (diag(gamma) Q - attn W) S_0^T + attn U': a [chunk, key_dim] product in place of U's
  # [chunk, value_dim] one.
  o = jnp.einsum("bnhck,bnhvk->bnhcv", q_decayed - attn @ w, states) + attn @ u_prime
  o = jnp.moveaxis(o, 2, 3).reshape(o.shape[0], -1, o.shape[2], o.shape[-1])
  return o[:, :seq]


class GatedDeltaNet(SequenceMixer):
  """Gated DeltaNet block as in flash-linear-attention: q/k/v projections with short conv and
  SiLU, L2-normalised q/k, Mamba-style decay, sigmoid beta, gated delta rule, per-head RMSNorm
  gated by silu(gate projection), output projection. No projection has a bias."""

  def __init__(self, width: int, num_heads: int, *, head_dim: int | None = None,
               value_head_dim: int | None = None, conv_size: int = 4, chunk_size: int = 64,
               algorithm: str = "chunked", dtype: Any = None, rngs: nnx.Rngs):
    """Args:
      width: model width.
      num_heads: heads.
      head_dim: key/query dimension per head (default width // num_heads).
      value_head_dim: value dimension per head (default 2 * head_dim, fla's expand_v=2).
      conv_size: short causal conv width.
      chunk_size: chunk length of the WY/UT form.
      algorithm: "chunked" (training) or "recurrent" (token by token, the reference).
      dtype: compute dtype of projections and conv (None: promote); the state is float32.
      rngs: parameter initialisation.
    """
    if algorithm not in ("chunked", "recurrent"):
      raise ValueError(f"algorithm must be 'chunked' or 'recurrent', got {algorithm!r}")
    head_dim = width // num_heads if head_dim is None else head_dim
    value_head_dim = 2 * head_dim if value_head_dim is None else value_head_dim
    self.num_heads, self.head_dim, self.value_head_dim = num_heads, head_dim, value_head_dim
    self.chunk_size, self.algorithm = chunk_size, algorithm
    key_width, value_width = num_heads * head_dim, num_heads * value_head_dim

    def proj(features):
      return linear(width, features, ("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs,
                    matmul_vjp=True)

    self.q_proj, self.k_proj = proj(key_width), proj(key_width)
    self.v_proj, self.gate_proj = proj(value_width), proj(value_width)
    self.a_proj, self.b_proj = proj(num_heads), proj(num_heads)
    self.q_conv, self.k_conv = (ShortConv(key_width, conv_size, "heads", use_bias=False,
                                          rngs=rngs) for _ in range(2))
    self.v_conv = ShortConv(value_width, conv_size, "heads", use_bias=False, rngs=rngs)
    self.a_log, self.dt_bias = decay_params(num_heads, rngs)
    self.norm = GatedRMSNorm(value_width, value_head_dim, norm_before_gate=True, rngs=rngs)
    self.out_proj = linear(value_width, width, ("heads", "embed"), use_bias=False, dtype=dtype,
                           rngs=rngs, matmul_vjp=True)

  def mix(self, x: jax.Array) -> jax.Array:
    """x: `[batch, seq, width]` -> `[batch, seq, width]` (dtype of x); causal."""
    batch, seq, _ = x.shape
    f32 = jnp.float32

    def heads(t):
      return t.astype(f32).reshape(batch, seq, self.num_heads, -1)

    # The six projections of x as one product, the three convolutions as one.
    q, k, v, gate, a, b = dense_together(x, (self.q_proj, self.k_proj, self.v_proj,
                                             self.gate_proj, self.a_proj, self.b_proj))
    q, k, v = ShortConv.together((q, k, v), (self.q_conv, self.k_conv, self.v_conv))
    q = l2_normalize(heads(q)) * self.head_dim ** -0.5
    k = l2_normalize(heads(k))
    v = heads(v)
    beta = jax.nn.sigmoid(b.astype(f32))
    g = -jnp.exp(self.a_log[...]) * jax.nn.softplus(a.astype(f32) + self.dt_bias[...])
    if self.algorithm == "chunked":
      o = gated_delta_rule_chunked(q, k, v, g, beta, self.chunk_size)
    else:
      o = gated_delta_rule_recurrent(q, k, v, g, beta)
    o = self.norm(o.reshape(batch, seq, -1), gate)
    return self.out_proj(o).astype(x.dtype)
