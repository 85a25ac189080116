"""Building blocks of the CogVideoX transformer (Flax NNX), named after their diffusers modules.

Parameters carry logical axis names ('embed', 'heads', 'head_dim', 'mlp', ...); activations
carry their own ('activation_batch', 'activation_length', ...) through `constrain`, a sharding
constraint while a step is traced under `ttt_jax.parallel.activation_rules`, a no-op otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# The one linear and LayerNorm factories and RoPE sit with the mixers, which use them too.
from ttt_jax.mixers.common import apply_rope, layer_norm, linear
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.parallel.mesh import constrain

Rope = tuple[jax.Array, jax.Array]


def select_by_type(is_text: jax.Array, text: jax.Array, video: jax.Array) -> jax.Array:
  """Per-token choice between a text and a video vector.

  Args:
    is_text: [seq] bool.
    text, video: [batch, width] or [width].

  Returns:
    [batch, seq, width] (or [1, seq, width] for unbatched vectors).
  """
  text, video = jnp.atleast_2d(text), jnp.atleast_2d(video)
  return jnp.where(is_text[None, :, None], text[:, None, :], video[:, None, :])


class TimestepEmbedding(nnx.Module):
  """diffusers TimestepEmbedding: linear -> SiLU -> linear."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=None):
    self.linear_1 = linear(in_features, out_features, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.linear_2 = linear(out_features, out_features, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, in] -> [batch, out]."""
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ExpertAdaLN(nnx.Module):
  """CogVideoXLayerNormZero: one shared LayerNorm, separate shift/scale/gate for text and video.

  The modulation linear's output is [shift, scale, gate, text_shift, text_scale, text_gate].
  """

  def __init__(self, cond_dim: int, width: int, eps: float, affine: bool, *,
               rngs: nnx.Rngs, dtype=None):
    self.linear = linear(cond_dim, 6 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.norm = layer_norm(width, eps, affine=affine, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, temb: jax.Array,
               is_text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Modulated norm and gate.

    Args:
      x: [batch, seq, width]; temb: [batch, cond_dim]; is_text: [seq] bool.

    Returns:
      normed: [batch, seq, width]; gate: [batch, seq, width].
    """
    shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(
        self.linear(jax.nn.silu(temb)), 6, axis=-1)
    scale = select_by_type(is_text, t_scale, scale)
    shift = select_by_type(is_text, t_shift, shift)
    return self.norm(x) * (1 + scale) + shift, select_by_type(is_text, t_gate, gate)


IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v: q [b, sq, h, d], k, v [b, sk, h, d] -> [b, sq, h, d].

  An explicit softmax in float32 or wider (jax.nn.dot_product_attention's XLA path always uses
  float32, which breaks float64 gradient checks).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.promote_types(q.dtype, jnp.float32)), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      query_chunk: int) -> jax.Array:
  """`attention`, `query_chunk` queries at a time: [b, sq, h, d] -> [b, sq, h, d].

  Each chunk's [b, h, query_chunk, sk] scores live only inside a checkpointed map body, so the
  forward and backward hold one chunk's scores at a time: temp memory O(query_chunk x sk), not
  O(sq x sk). The queries are padded to whole chunks; keys are not, so nothing is masked.
  """
  batch, seq, heads, dim = q.shape
  chunks = -(-seq // query_chunk)
  padded = jnp.pad(q, ((0, 0), (0, chunks * query_chunk - seq), (0, 0), (0, 0)))
  blocks = padded.reshape(batch, chunks, query_chunk, heads, dim).swapaxes(0, 1)
  out = jax.lax.map(jax.checkpoint(lambda qc: attention(qc, k, v)), blocks)
  return out.swapaxes(0, 1).reshape(batch, chunks * query_chunk, heads, dim)[:, :seq]


@dataclasses.dataclass(frozen=True)
class _KeysBefore(splash.Mask):
  """Splash mask of shape [q_len, kv_len]: every query sees the keys before `length`; the keys
  from `length` on are padding. Evaluated block by block, never as a dense [q_len, kv_len]
  array (a 63 s segment padded to 17920 tokens would be 321 MB of bools per trace)."""
  size: tuple[int, int]
  length: int

  @property
  def shape(self) -> tuple[int, int]:
    return self.size

  def __getitem__(self, idx) -> np.ndarray:
    rows, cols = (range(*s.indices(n)) for s, n in zip(idx, self.size))
    return np.broadcast_to(np.arange(cols.start, cols.stop) < self.length,
                           (len(rows), len(cols)))


# Splash's tiles are multiples of the TPU's 128 lanes; larger ones amortise the per-tile work
# (512: maxtext's default).
_SPLASH_BLOCK = 512


def _splash_per_device(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`splash_attention` on one device's heads: [b, s, h, d] -> [b, s, h, d]. Mosaic when the
  program compiles for TPU devices (mesh.compile_platform), the Pallas interpreter elsewhere."""
  interpret = mesh_lib.compile_platform() != "tpu"
  batch, seq, heads, dim = q.shape
  block = min(_SPLASH_BLOCK, -(-seq // 128) * 128)
  padded = -(-seq // block) * block
  mask = (splash.FullMask((padded, padded)) if padded == seq
          else _KeysBefore((padded, padded), seq))
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask((mask,) * heads),
      block_sizes=splash.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
      head_shards=1, q_seq_shards=1, interpret=interpret)
  # [b, s, h, d] -> [b, h, padded, d]; splash does not scale the logits.
  to_kernel = lambda a: jnp.pad(a.swapaxes(1, 2), ((0, 0), (0, 0), (0, padded - seq), (0, 0)))
  out = jax.vmap(kernel)(to_kernel(q * (1 / np.sqrt(dim)).astype(q.dtype)), to_kernel(k),
                         to_kernel(v))
  return out[:, :, :seq].swapaxes(1, 2)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attention` with the TPU splash (flash) kernels: q, k, v [b, s, h, d] -> [b, s, h, d].

  Bidirectional, no mask beyond padding: tiles of 512 tokens (or one tile of the sequence
  rounded up to 128, splash's tiles being multiples of the 128 lanes), the sequence padded to
  whole tiles and the padded keys masked off (a 3 s segment of 18048 tokens runs as 18432, 2%
  more). Under `activation_rules` it runs inside `mesh.sequence_to_heads`' shard_map, each
  device on its batch and heads with the whole sequence (splash cannot split the keys); the
  DiT's `Attention` calls the per-device kernel inside its own. Compiled (Mosaic) when the
  program is for TPU devices (mesh.compile_platform), the Pallas interpreter elsewhere (tests
  on CPU).
  """
  run = lambda qkv, _, __: _splash_per_device(*qkv)
  return mesh_lib.sequence_to_heads(run)((q, k, v))


class Attention(nnx.Module):
  """Self-attention with QK-LayerNorm (eps 1e-6) and RoPE on the video tokens (diffusers
  Attention + CogVideoXAttnProcessor2_0).

  implementation "xla" materialises the [seq, seq] scores (fine for tests and short
  segments); "chunked" takes `query_chunk` queries at a time against all keys and recomputes
  each chunk's scores in the backward pass, so its memory grows linearly in seq (a 63 s
  segment of 17.8k tokens x 48 heads has ~30 GB of bf16 scores); "cudnn" is the fused flash
  kernel on NVIDIA GPUs; "splash" the flash kernels on TPU (`splash_attention`; interpreted,
  slowly, elsewhere).
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, *, qkv_bias: bool,
               rngs: nnx.Rngs, qk_norm: bool = True, implementation: str = "xla",
               query_chunk: int = 512, dtype=None):
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    self.num_heads, self.head_dim = num_heads, head_dim
    self.implementation, self.query_chunk = implementation, query_chunk
    inner = num_heads * head_dim
    self.to_q = linear(width, inner, ("embed", "heads"), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.to_k = linear(width, inner, ("embed", "heads"), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.to_v = linear(width, inner, ("embed", "heads"), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.to_out = linear(inner, width, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.norm_q = layer_norm(head_dim, 1e-6, axis_name="head_dim", rngs=rngs,
                             dtype=dtype) if qk_norm else None
    self.norm_k = layer_norm(head_dim, 1e-6, axis_name="head_dim", rngs=rngs,
                             dtype=dtype) if qk_norm else None

  def __call__(self, x: jax.Array, rope: Rope | None, segments: Any = None) -> jax.Array:
    """Full (unmasked) attention over x, or over each segment of it.

    Args:
      x: [batch, seq, width].
      rope: (cos, sin) [seq, head_dim] (or [segment_len, head_dim] with `segments`) with
        identity rows on text tokens, or None.
      segments: None, or the segment layout of x (models.dit.Layout): `split` [b, seq, ...] ->
        [b, S, segment_len, ...] (overlap tokens copied) and `merge` back (copies averaged);
        each segment attends within itself.

    Returns:
      [batch, seq, width].

    The projections, QK-norms and the output projection work per token on the residual
    stream's layout (sequence split over context); between them q, k, v go through
    `mesh.sequence_to_heads` (Ulysses): each device gets whole sequences of its heads, so the
    segment gather, RoPE, attention and merge are local.
    """
    batch, seq, _ = x.shape
    heads = lambda y: constrain(y.reshape(batch, seq, self.num_heads, self.head_dim),
                                ("activation_batch", "activation_length", "activation_heads",
                                 None))
    q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)

    def per_device(qkv, _, rope):
      q, k, v = qkv
      local_batch = q.shape[0]
      if segments is not None:
        # [b, seq, h, d] -> [b, S, segment_len, h, d] -> [b * S, segment_len, h, d]
        q, k, v = (segments.split(a) for a in (q, k, v))
        q, k, v = (a.reshape(-1, *a.shape[2:]) for a in (q, k, v))
      if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
      out = self._attention(q, k, v)
      if segments is not None:
        out = segments.merge(out.reshape(local_batch, -1, *out.shape[1:]))
      return out

    out = mesh_lib.sequence_to_heads(per_device)((q, k, v), (), rope)
    return self.to_out(out.reshape(batch, seq, self.num_heads * self.head_dim))

  def _attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The attention of `implementation` on one device's whole sequences: [b, s, h, d] ->
    [b, s, h, d]. Splash runs unwrapped: `sequence_to_heads` already maps it per device."""
    if self.implementation == "cudnn":
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if self.implementation == "splash":
      return _splash_per_device(q, k, v)
    if self.implementation == "chunked":
      return chunked_attention(q, k, v, self.query_chunk)
    return attention(q, k, v)


class FeedForward(nnx.Module):
  """diffusers FeedForward with GELU-tanh: net.0.proj -> gelu(tanh) -> net.2."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
    self.proj_in = linear(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.proj_out = linear(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, seq, width] -> [batch, seq, width]."""
    h = constrain(jax.nn.gelu(self.proj_in(x), approximate=True),
                  ("activation_batch", "activation_length", "activation_mlp"))
    return self.proj_out(h)
