"""Mamba-2 (Dao & Gu 2024): the SSD state-space layer, chunked and recurrent.

Per head h with state H_t `[head_dim, state]`:
  H_t = exp(dt_t A_h) H_{t-1} + dt_t x_t B_t^T,   y_t = H_t C_t + D_h x_t,
with scalar-times-identity A_h < 0, dt_t = softplus(raw_t + dt_bias_h) from the input, and B, C
shared by the heads of a group. The mixer is causal; the bidirectional DiT block gets the other
direction by running it over its reverse-ordered sequence (models/dit.py); reverse=True runs it
right to left over a plain sequence.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.mixers.common import (GatedRMSNorm, SequenceMixer, ShortConv, decay_params,
                                   linear, pad_to_multiple, partitioned)


def ssd_recurrent(x: jax.Array, dt: jax.Array, a: jax.Array, b: jax.Array,
                  c: jax.Array) -> jax.Array:
  """Token-by-token SSD recurrence (the reference).

  Args:
    x: `[batch, seq, heads, head_dim]`.
    dt: `[batch, seq, heads]`, positive steps.
    a: `[heads]`, negative decay rates.
    b, c: `[batch, seq, heads, state]`.

  Returns:
    y: `[batch, seq, heads, head_dim]` (without the D skip).
  """
  def step(h, inputs):
    x_t, dt_t, b_t, c_t = inputs
    h = (jnp.exp(dt_t * a)[..., None, None] * h
         + jnp.einsum("bhp,bhn->bhpn", x_t * dt_t[..., None], b_t))
    return h, jnp.einsum("bhpn,bhn->bhp", h, c_t)

  batch, _, heads, head_dim = x.shape
  h0 = jnp.zeros((batch, heads, head_dim, b.shape[-1]), x.dtype)
  _, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, b, c)))
  return jnp.moveaxis(y, 0, 1)


def ssd_chunked(x: jax.Array, dt: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array,
                chunk_size: int) -> jax.Array:
  """The SSD recurrence in chunked (state-space dual) form; same arguments as `ssd_recurrent`.

  Inside a chunk the output is a masked, decay-weighted attention (C_i . B_j) exp(sum a dt)
  computed with matmuls; between chunks only the `[heads, head_dim, state]` states are carried,
  by a scan over chunks. Zero padding at the end (dt = 0) leaves earlier outputs unchanged.
  """
  seq = x.shape[1]
  chunk = min(chunk_size, seq)

  def chunks(t):
    t = pad_to_multiple(t, chunk)
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])

  x, dt, b, c = chunks(x), chunks(dt), chunks(b), chunks(c)  # [batch, chunks, chunk, ...]
  log_decay = jnp.cumsum(dt * a, axis=2)  # [batch, chunks, chunk, heads]
  x_dt = x * dt[..., None]

  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  # exp only where i >= j: the masked differences are positive and could overflow.
  diff = log_decay[:, :, :, None] - log_decay[:, :, None, :]  # [batch, chunks, i, j, heads]
  decay = jnp.exp(jnp.where(causal[:, :, None], diff, -jnp.inf))
  scores = jnp.einsum("bnihs,bnjhs->bnijh", c, b) * decay
  y_diag = jnp.einsum("bnijh,bnjhp->bnihp", scores, x_dt)

  to_end = jnp.exp(log_decay[:, :, -1:] - log_decay)  # decay from token j to the chunk's end
  chunk_states = jnp.einsum("bnjhs,bnjh,bnjhp->bnhps", b, to_end, x_dt)
  chunk_decay = jnp.exp(log_decay[:, :, -1])  # [batch, chunks, heads]

  def carry_state(h, inputs):
    state, decay_c = inputs
    return decay_c[..., None, None] * h + state, h

  h0 = jnp.zeros_like(chunk_states[:, 0])
  _, h_in = jax.lax.scan(carry_state, h0, (jnp.moveaxis(chunk_states, 1, 0),
                                           jnp.moveaxis(chunk_decay, 1, 0)))
  h_in = jnp.moveaxis(h_in, 0, 1)  # state entering each chunk: [batch, chunks, heads, p, s]
  y_off = jnp.einsum("bnihs,bnhps,bnih->bnihp", c, h_in, jnp.exp(log_decay))
  y = y_diag + y_off
  return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :seq]


class Mamba2(SequenceMixer):
  """Mamba-2 block: projections -> short conv on x/B/C -> SSD -> gated RMSNorm -> projection.

  The fused in-projection of the reference is split into x, z (gate), B/C and dt projections
  (the same parameters, mathematically) so each can carry its own logical axis names.
  """

  def __init__(self, width: int, num_heads: int, *, inner_width: int | None = None,
               state_size: int = 64, num_groups: int = 1, conv_size: int = 4,
               chunk_size: int = 64, algorithm: str = "chunked", dtype: Any = None,
               rngs: nnx.Rngs):
    """Args:
      width: model width.
      num_heads: SSD heads; head_dim = inner_width // num_heads.
      inner_width: expanded width (default 2 * width, Mamba's expand=2); a multiple of num_heads.
      state_size: N, the state size per head dimension.
      num_groups: B/C groups (heads per group share B and C); divides num_heads.
      conv_size: short causal conv width.
      chunk_size: SSD chunk length.
      algorithm: "chunked" (training) or "recurrent" (token by token, the reference).
      dtype: compute dtype of projections and conv (None: promote); the SSD runs in float32.
      rngs: parameter initialisation.
    """
    inner_width = 2 * width if inner_width is None else inner_width
    if inner_width % num_heads or num_heads % num_groups:
      raise ValueError(f"need num_heads | inner_width and num_groups | num_heads, got "
                       f"{inner_width=}, {num_heads=}, {num_groups=}")
    if algorithm not in ("chunked", "recurrent"):
      raise ValueError(f"algorithm must be 'chunked' or 'recurrent', got {algorithm!r}")
    self.num_heads, self.head_dim = num_heads, inner_width // num_heads
    self.state_size, self.num_groups = state_size, num_groups
    self.chunk_size, self.algorithm = chunk_size, algorithm
    bc_width = 2 * num_groups * state_size
    self.x_proj = linear(width, inner_width, ("embed", "heads"), use_bias=False, dtype=dtype,
                         rngs=rngs, matmul_vjp=True)
    self.z_proj = linear(width, inner_width, ("embed", "heads"), use_bias=False, dtype=dtype,
                         rngs=rngs, matmul_vjp=True)
    self.bc_proj = linear(width, bc_width, ("embed", None), use_bias=False, dtype=dtype,
                          rngs=rngs, matmul_vjp=True)
    self.dt_proj = linear(width, num_heads, ("embed", "heads"), use_bias=False, dtype=dtype,
                          rngs=rngs, matmul_vjp=True)
    self.x_conv = ShortConv(inner_width, conv_size, "heads", use_bias=True, rngs=rngs)
    self.bc_conv = ShortConv(bc_width, conv_size, None, use_bias=True, rngs=rngs)
    self.a_log, self.dt_bias = decay_params(num_heads, rngs)
    self.skip = nnx.Param(partitioned(nnx.initializers.ones_init(), ("heads",))(
        rngs.params(), (num_heads,), jnp.float32))
    self.norm = GatedRMSNorm(inner_width, inner_width // num_groups, norm_before_gate=False,
                             rngs=rngs)
    self.out_proj = linear(inner_width, width, ("heads", "embed"), use_bias=False, dtype=dtype,
                           rngs=rngs, matmul_vjp=True)

  def mix(self, x: jax.Array) -> jax.Array:
    """x: `[batch, seq, width]` -> `[batch, seq, width]` (dtype of x); causal."""
    batch, seq, _ = x.shape
    f32 = jnp.float32
    xs = self.x_conv(self.x_proj(x)).reshape(batch, seq, self.num_heads, self.head_dim)
    bc = self.bc_conv(self.bc_proj(x)).reshape(batch, seq, 2, self.num_groups, self.state_size)
    # Heads of a group share its B and C.
    bc = jnp.repeat(bc.astype(f32), self.num_heads // self.num_groups, axis=3)
    dt = jax.nn.softplus(self.dt_proj(x).astype(f32) + self.dt_bias[...])
    a = -jnp.exp(self.a_log[...])
    if self.algorithm == "chunked":
      y = ssd_chunked(xs.astype(f32), dt, a, bc[:, :, 0], bc[:, :, 1], self.chunk_size)
    else:
      y = ssd_recurrent(xs.astype(f32), dt, a, bc[:, :, 0], bc[:, :, 1])
    y = y + self.skip[...][:, None] * xs.astype(f32)
    y = self.norm(y.reshape(batch, seq, -1), self.z_proj(x))
    return self.out_proj(y).astype(x.dtype)
