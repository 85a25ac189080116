"""Pieces shared by the mixers (and the models above them): the call signature, the linear and
LayerNorm factories with logical axis names, RoPE, the parameter count, the short causal
convolution, gated RMSNorm and the Mamba-style decay parameters.

The product, the convolution, the L2 normalisation and the norm's scale have written-out VJPs
(tested against autodiff): autodiff's versions put reductions and transposes where XLA:CPU fuses
them with elementwise work into loops 5-30x slower than the same math as einsums (issue 18).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.parallel.mesh import partitioned  # re-exported: the mixers import it from here


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x `[..., in]` @ kernel `[in, out]` -> `[..., out]`, with a kernel gradient laid out for CPU.

  Left to autodiff, the kernel gradient x^T dy makes XLA:CPU transpose dy, fused with whatever
  produced it (silu', the gated norm), which ran ~5x slower than the whole product (issue 18).
  The written-out VJP transposes x, materialised, instead.
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  x_transposed = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1])).T
  dkernel = x_transposed @ dy.reshape(-1, dy.shape[-1])
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _matmul_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                        precision: Any = None, out_sharding: Any = None) -> jax.Array:
  """`matmul` in the signature nnx.Linear calls its `dot_general` with."""
  if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None
      or out_sharding is not None):
    raise NotImplementedError(f"only x @ kernel: {dimension_numbers}, {precision}, "
                              f"{out_sharding}")
  return matmul(lhs, rhs)


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, use_bias: bool = True, dtype: Any = None,
           param_dtype: Any = jnp.float32,
           kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
           matmul_vjp: bool = False) -> nnx.Linear:
  """The one linear-layer factory: `nnx.Linear` whose kernel `[in, out]` is named `axes` and
  whose bias `[out]` is named `axes[1:]`.

  matmul_vjp: the product is `matmul`, whose kernel gradient XLA:CPU runs faster (the baseline
  mixers, issue 18); otherwise lax.dot_general, nnx's default.
  """
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      dot_general=_matmul_dot_general if matmul_vjp else jax.lax.dot_general,
      kernel_init=partitioned(kernel_init, axes),
      bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs)


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, affine: bool = True,
               axis_name: str = "embed", dtype: Any = None,
               param_dtype: Any = jnp.float32) -> nnx.LayerNorm:
  """The one LayerNorm factory: torch.nn.LayerNorm (biased variance) over the last axis of
  `features`, its scale and bias `[features]` (if `affine`) named `axis_name`."""
  return nnx.LayerNorm(
      features, epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype,
      param_dtype=param_dtype,
      scale_init=partitioned(nnx.initializers.ones_init(), (axis_name,)),
      bias_init=partitioned(nnx.initializers.zeros_init(), (axis_name,)),
      rngs=rngs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x0, x1), (x2, x3), ... of the last axis (diffusers' CogVideoX
  convention).

  Args:
    x: [batch, seq, heads, head_dim].
    cos, sin: [seq, head_dim], each value repeated for the two members of a pair; rows with
      cos=1, sin=0 (text tokens) leave a token unchanged.

  Returns:
    [batch, seq, heads, head_dim], dtype of x. The rotation runs in at least float32, so a bf16
    x is rounded once, at the end, whatever the tables' dtype.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = xf * cos[:, None, :] + rotated * sin[:, None, :]
  return out.astype(x.dtype)


def count_params(module: nnx.Module | None) -> int:
  """Number of trainable parameters (`nnx.Param` entries) of a module; 0 for None.

  Works on abstract modules from `nnx.eval_shape` too.
  """
  if module is None:
    return 0
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def dense_together(x: jax.Array, layers: tuple[nnx.Linear, ...]) -> list[jax.Array]:
  """Bias-free `dense` layers of the same input applied as one `matmul`: their outputs.

  x: `[..., in]`. One product, and in the backward one transposed x, instead of one per layer;
  on CPU each op has a cost of its own that dominated at short lengths (issue 18).
  """
  if any(layer.bias is not None for layer in layers):
    raise ValueError("dense_together takes bias-free layers")
  kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1)
  x, kernel = layers[0].promote_dtype((x, kernel), dtype=layers[0].dtype)
  sizes = [layer.kernel.shape[1] for layer in layers]
  return jnp.split(matmul(x, kernel), np.cumsum(sizes)[:-1].tolist(), axis=-1)


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 1) -> jax.Array:
  """Zero-pads `axis` at the end up to the next multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def sum_of_squares(x: jax.Array) -> jax.Array:
  """sum(x^2) over the last axis, keeping it: `[..., d] -> [..., 1]`.

  An einsum (a dot) rather than jnp.sum(x * x): XLA:CPU fuses the square into a reduction over
  the minor axis that it runs as a scalar loop, ~30x slower at [4216, 512].
  """
  return jnp.einsum("...d,...d->...", x, x)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """y = x r, r = 1 / sqrt(sum(x^2) + eps) over the last axis (the eps placement of fla's l2norm).

  The gradient is written out, dx = r (dy - y <y, dy>): autodiff's chain through the rsqrt and
  the einsum's transpose (a dot without contraction) ran ~3x slower on XLA:CPU (issue 18).
  """
  return _l2_normalize_fwd(x, eps)[0]


def _l2_normalize_fwd(x, eps):
  r = jax.lax.rsqrt(sum_of_squares(x) + eps)
  y = x * r
  return y, (y, r)


def _l2_normalize_bwd(eps, residuals, dy):
  del eps
  y, r = residuals
  return (r * (dy - y * jnp.einsum("...d,...d->...", y, dy)[..., None]),)


l2_normalize.defvjp(_l2_normalize_fwd, _l2_normalize_bwd)


@jax.custom_vjp
def scale_channels(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x `[..., c]` * scale `[c]`, whose scale gradient is an einsum: left to autodiff it is a sum
  over tokens fused with its elementwise inputs, which XLA:CPU ran ~5x slower (issue 18)."""
  return x * scale


def _scale_channels_fwd(x, scale):
  return x * scale, (x, scale)


def _scale_channels_bwd(residuals, dy):
  x, scale = residuals
  return dy * scale, jnp.einsum("...c,...c->c", x, dy).astype(scale.dtype)


scale_channels.defvjp(_scale_channels_fwd, _scale_channels_bwd)


@jax.custom_vjp
def causal_depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y_t = sum_i kernel_i * x_{t-K+1+i}, per channel; x `[batch, seq, c]`, kernel `[K, c]`."""
  size, seq = kernel.shape[0], x.shape[1]
  padded = jnp.pad(x, ((0, 0), (size - 1, 0), (0, 0)))
  return sum(padded[:, i:i + seq] * kernel[i] for i in range(size))


def _causal_depthwise_conv_fwd(x, kernel):
  return causal_depthwise_conv(x, kernel), (x, kernel)


def _causal_depthwise_conv_bwd(residuals, dy):
  # Written out because autodiff's kernel gradient (a sum over batch and seq of shifted products)
  # becomes fused reductions that XLA:CPU runs ~10x slower than these einsums (issue 18).
  x, kernel = residuals
  size, seq = kernel.shape[0], x.shape[1]
  padded_x = jnp.pad(x, ((0, 0), (size - 1, 0), (0, 0)))
  padded_dy = jnp.pad(dy, ((0, 0), (0, size - 1), (0, 0)))
  dx = sum(padded_dy[:, size - 1 - i:size - 1 - i + seq] * kernel[i] for i in range(size))
  dkernel = jnp.stack([jnp.einsum("bsc,bsc->c", padded_x[:, i:i + seq], dy)
                       for i in range(size)])
  return dx, dkernel.astype(kernel.dtype)


causal_depthwise_conv.defvjp(_causal_depthwise_conv_fwd, _causal_depthwise_conv_bwd)


class SequenceMixer(nnx.Module):
  """Base class giving every mixer the one call signature of `ttt_jax.mixers`.

  Subclasses define `mix(x)`: `[batch, seq, width] -> [batch, seq, width]`; those that set
  `uses_rope` define `mix(x, rope)` with rope (cos, sin) `[seq, head_dim]` or None, and have a
  `head_dim`.
  """

  # Whether `mix` rotates q and k by `rope`; the others see positions through token order
  # (recurrence, convolution), not rotary embeddings.
  uses_rope = False

  def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
               reverse: bool = False) -> jax.Array:
    """x: `[batch, seq, width]`; rope: (cos, sin) `[seq, head_dim]` or None (no positions),
    ignored unless `uses_rope`.

    `reverse` runs the same parameters right to left and returns the output in the original
    order; each token keeps its own rotation (rope is flipped with x).
    """
    if not self.uses_rope:
      rope, mix = None, lambda x, _: self.mix(x)
    else:
      mix = self.mix
      if rope is not None and rope[0].shape != (x.shape[1], self.head_dim):
        raise ValueError(f"rope cos/sin must be [seq, head_dim] = {(x.shape[1], self.head_dim)}, "
                         f"got {rope[0].shape}")
    if not reverse:
      return mix(x, rope)
    rope = None if rope is None else tuple(jnp.flip(r, axis=0) for r in rope)
    return jnp.flip(mix(jnp.flip(x, axis=1), rope), axis=1)


class ShortConv(nnx.Module):
  """Causal depthwise conv1d then SiLU: y_t = silu(bias + sum_i w_i * x_{t-K+1+i}).

  The kernel is `[kernel_size, channels]`, initialised like PyTorch's Conv1d (uniform with
  bound 1/sqrt(kernel_size)); `name` is the logical axis of the channels.
  """

  def __init__(self, channels: int, kernel_size: int, name: str | None, *, use_bias: bool,
               rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    self.kernel = nnx.Param(partitioned(init, (None, name))(
        rngs.params(), (kernel_size, channels), jnp.float32))
    self.bias = (nnx.Param(partitioned(nnx.initializers.zeros_init(), (name,))(
        rngs.params(), (channels,), jnp.float32)) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: `[batch, seq, channels]` -> `[batch, seq, channels]`."""
    return self.together((x,), (self,))[0]

  @staticmethod
  def together(xs: tuple[jax.Array, ...], convs: tuple[ShortConv, ...]) -> list[jax.Array]:
    """`convs[i](xs[i])` for all i as one convolution over the concatenated channels."""
    x = jnp.concatenate(xs, axis=-1)
    y = causal_depthwise_conv(
        x, jnp.concatenate([conv.kernel[...] for conv in convs], axis=1).astype(x.dtype))
    if any(conv.bias is not None for conv in convs):
      y = y + jnp.concatenate([conv.bias[...] if conv.bias is not None else
                               jnp.zeros(conv.kernel.shape[1]) for conv in convs]).astype(x.dtype)
    sizes = [t.shape[-1] for t in xs]
    return jnp.split(jax.nn.silu(y), np.cumsum(sizes)[:-1].tolist(), axis=-1)


class GatedRMSNorm(nnx.Module):
  """RMSNorm over groups of `group_size` channels with a learned scale, gated by silu(gate).

  norm_before_gate=True: y = norm(x) * silu(gate) (Gated DeltaNet);
  norm_before_gate=False: y = norm(x * silu(gate)) (Mamba-2's RMSNormGated).
  Computed in float32, returned in the dtype of `x`.
  """

  def __init__(self, features: int, group_size: int, *, norm_before_gate: bool,
               epsilon: float = 1e-5, rngs: nnx.Rngs):
    if features % group_size:
      raise ValueError(f"features {features} not a multiple of group_size {group_size}")
    self.group_size = group_size
    self.norm_before_gate = norm_before_gate
    self.epsilon = epsilon
    self.scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ("heads",))(
        rngs.params(), (features,), jnp.float32))

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    """x, gate: `[..., features]` -> `[..., features]`."""
    y = x.astype(jnp.float32)
    gate = jax.nn.silu(gate.astype(jnp.float32))
    if not self.norm_before_gate:
      y = y * gate
    grouped = y.reshape(*y.shape[:-1], -1, self.group_size)
    grouped = grouped * jax.lax.rsqrt(sum_of_squares(grouped) / self.group_size + self.epsilon)
    y = scale_channels(grouped.reshape(y.shape), self.scale[...])
    if self.norm_before_gate:
      y = y * gate
    return y.astype(x.dtype)


def decay_params(num_heads: int, rngs: nnx.Rngs, *, dt_min: float = 1e-3,
                 dt_max: float = 0.1) -> tuple[nnx.Param, nnx.Param]:
  """Mamba-2's per-head decay parameters (a_log, dt_bias), each `[heads]`.

  The decay rate is A = -exp(a_log) with A initialised uniform in [-16, -1]; the step is
  dt = softplus(raw + dt_bias) with dt_bias the inverse softplus of a log-uniform sample in
  [dt_min, dt_max], so a fresh layer keeps memory over ~1/(|A| dt) tokens.
  """
  def a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))

  def dt_bias_init(key, shape, dtype):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
    return dt + jnp.log(-jnp.expm1(-dt))

  a_log = nnx.Param(partitioned(a_log_init, ("heads",))(
      rngs.params(), (num_heads,), jnp.float32))
  dt_bias = nnx.Param(partitioned(dt_bias_init, ("heads",))(
      rngs.params(), (num_heads,), jnp.float32))
  return a_log, dt_bias
