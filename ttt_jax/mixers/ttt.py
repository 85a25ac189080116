"""TTT-MLP and TTT-Linear as a sequence mixer: the Flax NNX module around `ttt_scan`
(../shared/PAPER.md, "TTT layer"); the math is ttt_jax/ttt/.

  XQ, XK, XV = x θQ, x θK, x θV            split into heads, [batch, seq, heads, head_dim]
  XQ, XK     = L2-normalised per head, then 3D RoPE on video tokens (through `rope`)
  XV         = XK + w_h ⊙ (T - mean(T)) / (std(T) + eps) + b_h,   T = XV - XK,
                                           if normalize_target (the public reference does this,
                                           with the rotated XK, the inner LN's w_h, b_h, the
                                           unbiased std and eps 1e-8 outside the root)
  η_t        = inner_lr_base · sigmoid(x_t · w_h + b_h) / head_dim, per head
  Z          = ttt_scan(XQ, XK, XV, η / mini_batch_size; W0)
  out        = θO(LayerNorm(Z))            post-norm over the full width, eps 1e-6
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.mixers.common import SequenceMixer, apply_rope, layer_norm, linear
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.ttt import inner as inner_lib
from ttt_jax.ttt.scan import DEFAULT_CHECKPOINT_GROUP_SIZE, ttt_scan

# Paper's training values: mini-batch 64 / inner lr 0.1 for MLP, 16 / 1.0 for Linear.
DEFAULT_MINI_BATCH_SIZE = {"mlp": 64, "linear": 16}
DEFAULT_INNER_LR_BASE = {"mlp": 0.1, "linear": 1.0}


def _at_least_f32(x: jax.Array) -> jax.Array:
  """Statistics in fp32 for bf16 input; float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def normalize_target(target: jax.Array, weight: jax.Array, bias: jax.Array,
                     eps: float) -> jax.Array:
  """The reference's reconstruction-target norm: w ⊙ (x − μ) / (std + eps) + b over head_dim.

  target: [..., heads, head_dim]; weight, bias: [heads, head_dim]. std is the unbiased
  (n − 1) standard deviation, as torch.Tensor.std, and eps sits outside the square root: this is
  not the inner model's LayerNorm (biased variance, rsqrt(var + eps)), which differs from it by
  a factor sqrt(n / (n − 1)), 0.8% at head_dim 64. Computed in at least float32.
  """
  x = _at_least_f32(target)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (x.shape[-1] - 1))
  return centred / (std + eps) * weight + bias


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize in the reference
  (not common.l2_normalize, fla's eps inside the root); the norm in at least float32."""
  norm_sq = jnp.sum(jnp.square(_at_least_f32(x)), axis=-1, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(norm_sq, eps * eps))).astype(x.dtype)


class TTTLayer(SequenceMixer):
  """TTT-MLP / TTT-Linear sequence mixer.

  Call: `layer(x, rope=None, reverse=False)` with x [batch, seq, width] -> [batch, seq, width]
  (SequenceMixer). `reverse=True` runs the same parameters over the reversed sequence (and
  reversed rope) and returns the output in the original order.
  """

  uses_rope = True
  # Takes `order` (__call__): the DiT's reverse pass permutes after the all-to-all.
  takes_order = True

  def __init__(self, width: int, num_heads: int, *, inner: str = "mlp",
               mini_batch_size: int | None = None, inner_lr_base: float | None = None,
               normalize_target: bool = True, inner_eps: float = inner_lib.DEFAULT_EPS,
               post_norm_eps: float = 1e-6, impl: str = "dual",
               checkpoint_group_size: int | None = DEFAULT_CHECKPOINT_GROUP_SIZE,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    inner_lib.check_inner(inner)
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.width, self.num_heads, self.head_dim = width, num_heads, width // num_heads
    self.inner = inner
    self.mini_batch_size = mini_batch_size or DEFAULT_MINI_BATCH_SIZE[inner]
    self.inner_lr_base = (DEFAULT_INNER_LR_BASE[inner] if inner_lr_base is None
                          else inner_lr_base)
    self.normalize_target, self.inner_eps = normalize_target, inner_eps
    self.impl, self.checkpoint_group_size = impl, checkpoint_group_size
    self.dtype = dtype

    normal = nnx.initializers.normal(0.02)
    proj = lambda axes: linear(width, width, axes, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=normal, rngs=rngs)
    self.wq = proj(("embed", "heads"))
    self.wk = proj(("embed", "heads"))
    self.wv = proj(("embed", "heads"))
    self.wo = proj(("heads", "embed"))
    self.post_norm = layer_norm(width, post_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    # Per-head inner learning-rate gate: η_t = base · sigmoid(x_t · w_h + b_h) / head_dim.
    self.lr_weight = nnx.Param(normal(rngs.params(), (width, num_heads), param_dtype),
                               sharding=("embed", "heads"), eager_sharding=False)
    self.lr_bias = nnx.Param(jnp.zeros((num_heads,), param_dtype), sharding=("heads",),
                             eager_sharding=False)
    w0 = inner_lib.init_params(inner, rngs.params(), num_heads, self.head_dim, dtype=param_dtype)
    # W0 is learned and shared across the batch; one Param per weight so each can be named.
    self.inner_weights = nnx.Dict({
        k: nnx.Param(w0[k], sharding=("heads", None, None), eager_sharding=False)
        for k in inner_lib.WEIGHT_KEYS[inner]})
    self.ttt_norm_weight = nnx.Param(w0["ln_weight"], sharding=("heads", "head_dim"),
                                     eager_sharding=False)
    self.ttt_norm_bias = nnx.Param(w0["ln_bias"], sharding=("heads", "head_dim"),
                                   eager_sharding=False)

  def _split_heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def inner_lr(self, x: jax.Array) -> jax.Array:
    """Per-token, per-head step η_t / mini_batch_size: x [batch, seq, width] ->
    [batch, heads, seq]."""
    logits = _at_least_f32(x) @ _at_least_f32(self.lr_weight[...]) + self.lr_bias[...]
    eta = self.inner_lr_base * jax.nn.sigmoid(logits) / self.head_dim / self.mini_batch_size
    return jnp.swapaxes(eta, 1, 2)

  def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
               reverse: bool = False, order: tuple[np.ndarray, np.ndarray] | None = None
               ) -> jax.Array:
    """SequenceMixer's call, plus `order`: (perm, inverse), int [seq] permutations; the scan
    then runs over x[:, perm] with rope by position in that order, and the output comes back
    in x's order: `unpermute(mix(x[:, perm], rope))`, without gathering x (see `mix`)."""
    if order is None:
      return super().__call__(x, rope=rope, reverse=reverse)
    if reverse:
      raise ValueError("TTTLayer takes reverse or order, not both")
    return self.mix(x, rope, order)

  def mix(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
          order: tuple[np.ndarray, np.ndarray] | None = None) -> jax.Array:
    """x [batch, seq, width], rope (cos, sin) [seq, head_dim] or None, order as `__call__`'s
    -> [batch, seq, width].

    Everything but the scan is per token and runs on x's layout (under `activation_rules`,
    the sequence split over context); xq, xk, xv, η [batch, seq, heads, ...] then go through
    `mesh.sequence_to_heads` (Ulysses all-to-all), so that each device scans whole sequences
    of its heads, permuted by `order` there, locally.
    """
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"TTTLayer expects [batch, seq, {self.width}], got {x.shape}")
    heads = lambda y: mesh_lib.constrain(
        y, ("activation_batch", "activation_length", "activation_heads", None))
    xq = _l2_normalize(heads(self._split_heads(self.wq(x))))
    xk = _l2_normalize(heads(self._split_heads(self.wk(x))))
    xv = heads(self._split_heads(self.wv(x)))
    if rope is not None:
      if order is not None:  # token j is scanned at position inverse[j]
        rope = tuple(r[order[1]] for r in rope)
      xq, xk = apply_rope(xq, *rope), apply_rope(xk, *rope)
    ln_w, ln_b = self.ttt_norm_weight[...], self.ttt_norm_bias[...]
    if self.normalize_target:
      # As the public reference: normalise against the rotated XK.
      xv = (xk + normalize_target(xv - xk, ln_w, ln_b, self.inner_eps)).astype(xv.dtype)
    params = {k: v[...] for k, v in self.inner_weights.items()}
    params.update(ln_weight=ln_w, ln_bias=ln_b)
    eta = jnp.swapaxes(self.inner_lr(x), 1, 2)  # [batch, seq, heads]
    z = mesh_lib.sequence_to_heads(functools.partial(self._scan, order=order))(
        (xq, xk, xv, eta), params)
    return self.wo(self.post_norm(z.reshape(x.shape)))

  def _scan(self, tokens: tuple[jax.Array, ...], params: dict[str, jax.Array], _,
            order: tuple[np.ndarray, np.ndarray] | None) -> jax.Array:
    """`ttt_scan` on whole sequences: xq, xk, xv [b, seq, h, d], eta [b, seq, h] and the
    inner weights of those h heads -> z [b, seq, h, d]."""
    if order is not None:
      tokens = tuple(t[:, order[0]] for t in tokens)
    xq, xk, xv, eta = (jnp.swapaxes(t, 1, 2) for t in tokens)
    platform = mesh_lib.compile_platform() if self.impl == "pallas" else None
    z, _ = ttt_scan(self.inner, params, xq, xk, xv, eta, mini_batch_size=self.mini_batch_size,
                    impl=self.impl, checkpoint_group_size=self.checkpoint_group_size,
                    eps=self.inner_eps, platform=platform)
    z = jnp.swapaxes(z, 1, 2)
    return z if order is None else z[:, order[1]]
