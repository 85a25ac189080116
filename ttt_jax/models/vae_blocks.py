"""Layers of the CogVideoX 3D causal VAE, following diffusers' `AutoencoderKLCogVideoX`.

Layout: activations are channels-last, [batch, frames, height, width, channels]. Attribute names
mirror the diffusers modules one to one (`resnets`, `downsamplers`, `norm_layer`, `conv`, ...), so
the converter maps a torch key to a parameter path by name alone.

Causal time padding: every 3x3x3 convolution first sees, before its input, the last 2 frames of the
input it saw in the previous frame batch (diffusers' "conv cache") or, at the start of a video,
two copies of the first frame. Each layer takes the cache of the previous frame batch and returns
the one for the next: nested dicts keyed like diffusers' `conv_cache`, `None` at the start.

Group norms (also inside the decoder's spatial norms) take their statistics over all frames of the
current frame batch, as torch's GroupNorm does on [batch, channels, frames, height, width]; the
cache carries convolution context only, so decoding in frame batches is not the same computation
as decoding the whole video at once (diffusers decodes in batches of 2 latent frames, so that is
what the weights were used with).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Cache = dict | None


class Conv(nnx.Module):
  """Convolution over the trailing spatial axes, zero padding; `kernel` [*window, in, out].

  Inputs are [*batch, *spatial, in]; all leading axes count as batch (so a 2D conv runs per frame).
  """

  def __init__(self, in_channels: int, out_channels: int, window: tuple[int, ...], *,
               rngs: nnx.Rngs):
    # torch's default Conv init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(in_channels * math.prod(window))
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (*window, in_channels, out_channels), minval=-bound, maxval=bound))
    self.bias = nnx.Param(jax.random.uniform(
        rngs.params(), (out_channels,), minval=-bound, maxval=bound))

  def __call__(self, x: jax.Array, *, stride: int = 1,
               padding: tuple[tuple[int, int], ...] | None = None) -> jax.Array:
    rank = self.kernel.ndim - 2
    spatial = "DHW"[3 - rank:]
    lead = x.shape[:-rank - 1]
    y = jax.lax.conv_general_dilated(
        x.reshape(-1, *x.shape[-rank - 1:]), self.kernel[...],
        window_strides=(stride,) * rank,
        padding=padding if padding is not None else ((0, 0),) * rank,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    y = y + self.bias[...]
    return y.reshape(*lead, *y.shape[1:])


class CausalConv3d(nnx.Module):
  """diffusers' CogVideoXCausalConv3d: causal in time, zero "same" padding in height and width.

  x [batch, frames, height, width, in] -> ([batch, frames, height, width, out], cache), where
  cache [batch, kernel - 1, height, width, in] is the time context for the next frame batch
  (`None` for a 1x1x1 kernel, which needs none).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs):
    self.kernel_size = kernel_size
    self.conv = Conv(in_channels, out_channels, (kernel_size,) * 3, rngs=rngs)

  def __call__(self, x: jax.Array, cache: jax.Array | None = None):
    k = self.kernel_size
    new_cache = None
    if k > 1:
      context = cache if cache is not None else jnp.repeat(x[:, :1], k - 1, axis=1)
      x = jnp.concatenate([context, x], axis=1)
      new_cache = x[:, -(k - 1):]
    pad = (k - 1) // 2
    return self.conv(x, padding=((0, 0), (pad, pad), (pad, pad))), new_cache


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on video: statistics per (sample, group) over frames, height, width and
  the group's channels. x [batch, frames, height, width, channels]."""

  def __init__(self, channels: int, groups: int, eps: float):
    self.groups = groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, self.groups, c // self.groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
    return xg.reshape(x.shape) * self.scale[...] + self.bias[...]


def resize_nearest(x: jax.Array, size: tuple[int, int, int]) -> jax.Array:
  """torch F.interpolate(mode="nearest", size=...) over the frames, height and width axes of
  [batch, frames, height, width, channels], for whole-number scale factors (all the decoder
  needs): each entry repeated out/in times."""
  for axis, out in zip((1, 2, 3), size):
    if out % x.shape[axis]:
      raise ValueError(f"cannot resize {x.shape} to {size}: not a whole-number scale")
    x = jnp.repeat(x, out // x.shape[axis], axis=axis)
  return x


class SpatialNorm3D(nnx.Module):
  """diffusers' CogVideoXSpatialNorm3D: group norm of `f`, then a per-pixel scale and shift
  computed (1x1x1 convs) from the latents `zq`, resized to `f`'s frames, height and width."""

  def __init__(self, f_channels: int, zq_channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm_layer = GroupNorm(f_channels, groups, eps=1e-6)
    self.conv_y = CausalConv3d(zq_channels, f_channels, 1, rngs=rngs)
    self.conv_b = CausalConv3d(zq_channels, f_channels, 1, rngs=rngs)

  def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
    t, h, w = f.shape[1:4]
    if t > 1 and t % 2 == 1:
      # The first latent frame stands for one video frame, the others for several each.
      zq = jnp.concatenate([resize_nearest(zq[:, :1], (1, h, w)),
                            resize_nearest(zq[:, 1:], (t - 1, h, w))], axis=1)
    else:
      zq = resize_nearest(zq, (t, h, w))
    return self.norm_layer(f) * self.conv_y(zq)[0] + self.conv_b(zq)[0]


class ResnetBlock3D(nnx.Module):
  """diffusers' CogVideoXResnetBlock3D (no time embedding, no dropout at inference).

  With `spatial_norm_dim` (decoder) its norms are SpatialNorm3D conditioned on the latents.
  """

  def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
               spatial_norm_dim: int | None, *, rngs: nnx.Rngs):
    if spatial_norm_dim is None:
      self.norm1 = GroupNorm(in_channels, groups, eps)
      self.norm2 = GroupNorm(out_channels, groups, eps)
    else:
      self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups, rngs=rngs)
      self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups, rngs=rngs)
    self.conv1 = CausalConv3d(in_channels, out_channels, 3, rngs=rngs)
    self.conv2 = CausalConv3d(out_channels, out_channels, 3, rngs=rngs)
    self.conv_shortcut = (Conv(in_channels, out_channels, (1, 1, 1), rngs=rngs)
                          if in_channels != out_channels else None)

  def _norm(self, norm, x, zq):
    return norm(x) if zq is None else norm(x, zq)

  def __call__(self, x: jax.Array, zq: jax.Array | None, cache: Cache):
    cache = cache or {}
    new_cache = {}
    h = jax.nn.silu(self._norm(self.norm1, x, zq))
    h, new_cache["conv1"] = self.conv1(h, cache.get("conv1"))
    h = jax.nn.silu(self._norm(self.norm2, h, zq))
    h, new_cache["conv2"] = self.conv2(h, cache.get("conv2"))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return h + x, new_cache


def _resnet_stack(resnets, x, zq, cache: Cache):
  cache = cache or {}
  new_cache = {}
  for i, resnet in enumerate(resnets):
    x, new_cache[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
  return x, new_cache


class Downsample3D(nnx.Module):
  """diffusers' CogVideoXDownsample3D: optional 2x average pooling in time (the first frame of an
  odd count kept alone), then a stride-2 3x3 conv per frame after padding bottom/right by one."""

  def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv(channels, channels, (3, 3), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.compress_time:
      b, t, h, w, c = x.shape
      first, rest = (x[:, :1], x[:, 1:]) if t % 2 == 1 else (x[:, :0], x)
      rest = rest.reshape(b, rest.shape[1] // 2, 2, h, w, c).mean(axis=2)
      x = jnp.concatenate([first, rest], axis=1)
    return self.conv(x, stride=2, padding=((0, 1), (0, 1)))


class Upsample3D(nnx.Module):
  """diffusers' CogVideoXUpsample3D: nearest 2x in height and width and, with `compress_time`,
  in time (the first frame of an odd count > 1 kept single), then a 3x3 conv per frame."""

  def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv(channels, channels, (3, 3), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[1]
    if self.compress_time and t > 1:
      if t % 2 == 1:
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
      else:
        x = jnp.repeat(x, 2, axis=1)
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return self.conv(x, padding=((1, 1), (1, 1)))


class DownBlock3D(nnx.Module):
  """diffusers' CogVideoXDownBlock3D: resnets, then (except in the last block) a Downsample3D."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               eps: float, add_downsample: bool, compress_time: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, None,
                      rngs=rngs) for i in range(num_layers)])
    # A list of one, as in diffusers, so parameter paths match its keys.
    self.downsamplers = (nnx.List([Downsample3D(out_channels, compress_time, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x: jax.Array, cache: Cache):
    x, new_cache = _resnet_stack(self.resnets, x, None, cache)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x, new_cache


class MidBlock3D(nnx.Module):
  """diffusers' CogVideoXMidBlock3D: two resnets at the lowest resolution."""

  def __init__(self, channels: int, groups: int, eps: float, spatial_norm_dim: int | None, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock3D(channels, channels, groups, eps, spatial_norm_dim, rngs=rngs)
        for _ in range(2)])

  def __call__(self, x: jax.Array, zq: jax.Array | None, cache: Cache):
    return _resnet_stack(self.resnets, x, zq, cache)


class UpBlock3D(nnx.Module):
  """diffusers' CogVideoXUpBlock3D: spatially normed resnets, then (except last) an Upsample3D."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               eps: float, spatial_norm_dim: int, add_upsample: bool, compress_time: bool, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                      spatial_norm_dim, rngs=rngs) for i in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample3D(out_channels, compress_time, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x: jax.Array, zq: jax.Array, cache: Cache):
    x, new_cache = _resnet_stack(self.resnets, x, zq, cache)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x, new_cache
