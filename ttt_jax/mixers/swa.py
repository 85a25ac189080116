"""Sliding-window attention over the global sequence (the paper's baseline, window 8192 tokens).

Non-causal and symmetric: token i attends to token j iff |i - j| <= window // 2, so each token
sees window // 2 tokens on either side plus itself. Computed blockwise: the sequence is cut into
blocks of window // 2 tokens and each query block attends only to itself and its neighbouring
key blocks, so memory is O(seq * window), never O(seq^2).

Positions: q and k are rotated by the `rope` the DiT passes to every mixer (3D RoPE by global
latent-frame index, identity on text), after the QK-LayerNorm as in CogVideoX's attention. RoPE
makes a logit depend on the offset between two tokens, so inside the window the layer knows how
many frames (and rows, columns) apart they are; without it a window over several frames would
see a bag of tokens.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.mixers.common import (SequenceMixer, apply_rope, layer_norm, linear,
                                   pad_to_multiple)


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             window: int) -> jax.Array:
  """Softmax attention restricted to |i - j| <= window // 2, computed block by block.

  Args:
    q, k, v: `[batch, seq, heads, head_dim]`.
    window: window width in tokens.

  Returns:
    `[batch, seq, heads, head_dim]` in the dtype of `v`; logits and softmax in float32.
  """
  seq, head_dim = q.shape[1], q.shape[-1]
  half = window // 2
  block = max(1, min(half, seq))
  num_blocks = math.ceil(seq / block)
  # Key blocks on each side a query block needs; with block == half that is one.
  reach = min(math.ceil(half / block), num_blocks - 1)
  span = (2 * reach + 1) * block

  def blocks(x):
    return x.reshape(x.shape[0], num_blocks, block, *x.shape[2:])

  q = blocks(pad_to_multiple(q, block))

  def neighbours(x):
    x = jnp.pad(pad_to_multiple(x, block), ((0, 0), (reach * block, reach * block), (0, 0), (0, 0)))
    shifted = [blocks(x[:, o * block:(o + num_blocks) * block]) for o in range(2 * reach + 1)]
    return jnp.concatenate(shifted, axis=2)  # [batch, blocks, span, heads, head_dim]

  k, v = neighbours(k), neighbours(v)
  q_pos = jnp.arange(num_blocks * block).reshape(num_blocks, block)
  k_pos = (jnp.arange(num_blocks)[:, None] - reach) * block + jnp.arange(span)
  mask = ((jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]) <= half)
          & (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] < seq))  # [blocks, block, span]

  logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(head_dim)
  # A finite fill keeps padded query rows (no valid key) NaN-free; they are sliced off below.
  logits = jnp.where(mask[None, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(out.shape[0], num_blocks * block, *out.shape[3:])[:, :seq].astype(v.dtype)


class SlidingWindowAttention(SequenceMixer):
  """Multi-head sliding-window attention with q/k/v/o projections (with bias) and
  QK-LayerNorm over head_dim (affine, eps 1e-6, shared across heads, as in CogVideoX)."""

  uses_rope = True

  def __init__(self, width: int, num_heads: int, *, window: int = 8192, dtype: Any = None,
               rngs: nnx.Rngs):
    """Args:
      width: model width; num_heads must divide it.
      num_heads: attention heads.
      window: window width in tokens (each side sees window // 2).
      dtype: compute dtype of the projections (None: promote input and parameters).
      rngs: parameter initialisation.
    """
    if width % num_heads:
      raise ValueError(f"width {width} not a multiple of num_heads {num_heads}")
    if window < 1:
      raise ValueError(f"window must be positive, got {window}")
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.window = window
    self.q_proj, self.k_proj, self.v_proj = (
        linear(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs, matmul_vjp=True)
        for _ in range(3))
    self.o_proj = linear(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs,
                         matmul_vjp=True)
    self.q_norm, self.k_norm = (layer_norm(self.head_dim, 1e-6, axis_name="head_dim",
                                           dtype=dtype, rngs=rngs) for _ in range(2))

  def mix(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """x: `[batch, seq, width]`; rope (cos, sin) `[seq, head_dim]` or None -> `[batch, seq,
    width]` (dtype of x)."""
    heads = (*x.shape[:2], self.num_heads, self.head_dim)
    q = self.q_norm(self.q_proj(x).reshape(heads))
    k = self.k_norm(self.k_proj(x).reshape(heads))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    v = self.v_proj(x).reshape(heads)
    out = sliding_window_attention(q, k, v, self.window)
    return self.o_proj(out.reshape(x.shape[:2] + (-1,))).astype(x.dtype)
