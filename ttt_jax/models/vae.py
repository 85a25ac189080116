"""CogVideoX's 3D causal VAE (diffusers `AutoencoderKLCogVideoX`) in Flax NNX, channels-last.

video [batch, 1 + 4k frames, 8h, 8w, 3] in [-1, 1]  --encode-->  mean, logvar
[batch, 1 + k, h, w, 16]  --decode-->  video. Like diffusers, `encode`/`decode` do not apply
`scaling_factor`: the diffusion model sees `mean * scaling_factor`, and `decode` takes
`latents / scaling_factor`.

Long videos run in frame batches that carry each causal convolution's time context (the "conv
cache") from one batch to the next, exactly as diffusers does: 8 video frames per encoder batch,
2 latent frames per decoder batch, the remainder joining the first batch (13 latent frames decode
as 3, 2, 2, 2, 2, 2 -> 9 + 5 * 8 = 49 frames). Optionally each batch is also split into
overlapping spatial tiles whose outputs are blended linearly (diffusers' tiled_encode /
tiled_decode). Memory then depends on the batch and tile sizes, not on the video length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.models.vae_blocks import (CausalConv3d, DownBlock3D, GroupNorm, MidBlock3D,
                                       SpatialNorm3D, UpBlock3D)

# diffusers config.json keys that do not change the network (latent statistics for pipelines,
# precision hints, bookkeeping).
_IGNORED_DIFFUSERS_KEYS = frozenset({
    "force_upcast", "shift_factor", "latents_mean", "latents_std", "invert_scale_latents"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of the VAE; the defaults are CogVideoX-5B's."""
  in_channels: int = 3  # video channels (RGB)
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)  # one down/up block each
  latent_channels: int = 16
  layers_per_block: int = 3  # resnets per encoder block; decoder blocks have one more
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: int = 4  # the first log2(ratio) blocks also halve time
  sample_height: int = 480  # default tiles are half of this (diffusers)
  sample_width: int = 720
  scaling_factor: float = 0.7  # latent std; CogVideoX-2B uses 1.15258426

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def temporal_compress_level(self) -> int:
    return int(np.log2(self.temporal_compression_ratio))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
    return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"])})

  @classmethod
  def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
    """From diffusers' AutoencoderKLCogVideoX config.json; keys it lacks take our defaults.

    Raises:
      ValueError: on a config this model cannot reproduce (another class, block types, act_fn,
        quant convs) or a key it does not know.
    """
    if d.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
      raise ValueError(f"not an AutoencoderKLCogVideoX config: _class_name={d['_class_name']}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d
                     if not k.startswith("_") and k not in fields
                     and k not in _IGNORED_DIFFUSERS_KEYS
                     and k not in ("down_block_types", "up_block_types", "act_fn",
                                   "use_quant_conv", "use_post_quant_conv"))
    if unknown:
      raise ValueError(f"unknown AutoencoderKLCogVideoX config keys: {unknown}")
    config = cls.from_dict({**dataclasses.asdict(cls()), **{k: d[k] for k in d if k in fields}})
    n = len(config.block_out_channels)
    for key, block in (("down_block_types", "CogVideoXDownBlock3D"),
                       ("up_block_types", "CogVideoXUpBlock3D")):
      if list(d.get(key, [block] * n)) != [block] * n:
        raise ValueError(f"{key} must be {n} x {block}, got {d[key]}")
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"act_fn must be silu, got {d['act_fn']}")
    if d.get("use_quant_conv") or d.get("use_post_quant_conv"):
      raise ValueError("use_quant_conv / use_post_quant_conv are not supported (CogVideoX "
                       "checkpoints use neither)")
    ratio = config.temporal_compression_ratio
    if ratio < 1 or 2 ** int(np.log2(ratio)) != ratio:
      raise ValueError(f"temporal_compression_ratio must be a power of two, got {ratio}")
    return dataclasses.replace(
        config, temporal_compression_ratio=int(config.temporal_compression_ratio))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Spatial tiling, as diffusers' `enable_tiling(...)`.

  Tiles are `sample_height` x `sample_width` video pixels (their latent size is that divided by
  the spatial compression); neighbouring tiles overlap by the given fraction of a tile and are
  cross-faded linearly over it. Inputs no larger than a tile are not tiled.
  """
  sample_height: int
  sample_width: int
  overlap_factor_height: float = 1 / 6
  overlap_factor_width: float = 1 / 5

  @classmethod
  def default(cls, config: VAEConfig) -> Tiling:
    """diffusers' defaults: half the sample size (240 x 360 for 480 x 720 video)."""
    return cls(config.sample_height // 2, config.sample_width // 2)


class Encoder3D(nnx.Module):
  """diffusers' CogVideoXEncoder3D: video [b, t, H, W, in] -> moments [b, t', h, w, 2 * latent]."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    c = config
    channels = c.block_out_channels
    self.conv_in = CausalConv3d(c.in_channels, channels[0], 3, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock3D(channels[max(i - 1, 0)], channels[i], c.layers_per_block, c.norm_num_groups,
                    c.norm_eps, add_downsample=i < len(channels) - 1,
                    compress_time=i < c.temporal_compress_level, rngs=rngs)
        for i in range(len(channels))])
    self.mid_block = MidBlock3D(channels[-1], c.norm_num_groups, c.norm_eps, None, rngs=rngs)
    self.norm_out = GroupNorm(channels[-1], c.norm_num_groups, eps=1e-6)
    self.conv_out = CausalConv3d(channels[-1], 2 * c.latent_channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array, cache: dict | None):
    cache = cache or {}
    new_cache = {}
    x, new_cache["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    for i, block in enumerate(self.down_blocks):
      x, new_cache[f"down_block_{i}"] = block(x, cache.get(f"down_block_{i}"))
    x, new_cache["mid_block"] = self.mid_block(x, None, cache.get("mid_block"))
    x = jax.nn.silu(self.norm_out(x))
    x, new_cache["conv_out"] = self.conv_out(x, cache.get("conv_out"))
    return x, new_cache


class Decoder3D(nnx.Module):
  """diffusers' CogVideoXDecoder3D: latents [b, t, h, w, latent] -> video [b, t', H, W, out];
  every norm is a SpatialNorm3D conditioned on the latents."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    c = config
    channels = c.block_out_channels[::-1]
    zq = c.latent_channels
    self.conv_in = CausalConv3d(zq, channels[0], 3, rngs=rngs)
    self.mid_block = MidBlock3D(channels[0], c.norm_num_groups, c.norm_eps, zq, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock3D(channels[max(i - 1, 0)], channels[i], c.layers_per_block + 1,
                  c.norm_num_groups, c.norm_eps, zq, add_upsample=i < len(channels) - 1,
                  compress_time=i < c.temporal_compress_level, rngs=rngs)
        for i in range(len(channels))])
    self.norm_out = SpatialNorm3D(channels[-1], zq, c.norm_num_groups, rngs=rngs)
    self.conv_out = CausalConv3d(channels[-1], c.out_channels, 3, rngs=rngs)

  def __call__(self, z: jax.Array, cache: dict | None):
    cache = cache or {}
    new_cache = {}
    x, new_cache["conv_in"] = self.conv_in(z, cache.get("conv_in"))
    x, new_cache["mid_block"] = self.mid_block(x, z, cache.get("mid_block"))
    for i, block in enumerate(self.up_blocks):
      x, new_cache[f"up_block_{i}"] = block(x, z, cache.get(f"up_block_{i}"))
    x = jax.nn.silu(self.norm_out(x, z))
    x, new_cache["conv_out"] = self.conv_out(x, cache.get("conv_out"))
    return x, new_cache


# The frame-batch loop is a Python loop over jitted per-batch steps rather than a lax.scan with
# the cache as carry: (1) the first batch has another shape (3 latent frames, and first-frame
# padding instead of a cache) and edge tiles are smaller, so a scan could not cover all batches
# anyway; (2) a loop hands every batch back as soon as it is done (`iter_decode`), so a
# 253-latent-frame (1009-frame) video never has to sit on the accelerator whole, where a scan
# stacks all outputs on device; (3) a batch is a full conv stack, so per-call dispatch is noise.
# Each distinct (window shape, first batch or not) compiles once.
@functools.partial(jax.jit, static_argnums=0)
def _encode_step(graphdef, state, video, cache):
  return nnx.merge(graphdef, state).encoder(video, cache)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, latents, cache):
  return nnx.merge(graphdef, state).decoder(latents, cache)


def frame_batches(num_frames: int, batch_size: int | None) -> list[tuple[int, int]]:
  """diffusers' split of `num_frames` into [start, end) batches of `batch_size`; the remainder
  joins the first batch. `None` means one batch."""
  if batch_size is None:
    return [(0, num_frames)]
  n, rem = max(num_frames // batch_size, 1), num_frames % batch_size
  return [(0 if i == 0 else batch_size * i + rem, min(batch_size * (i + 1) + rem, num_frames))
          for i in range(n)]


@dataclasses.dataclass(frozen=True)
class _AxisTiles:
  """Tiles along one spatial axis: input windows, and how their outputs are blended and cut."""
  starts: tuple[int, ...]  # input offsets of the tiles
  size: int  # input tile size (the last tiles may be cut short by the input's edge)
  blend: int  # output pixels cross-faded with the previous tile
  keep: int | None  # output pixels each tile contributes (the last: what it has); None: all

  @classmethod
  def whole(cls, length: int) -> _AxisTiles:
    return cls((0,), length, 0, None)

  def windows(self, length: int) -> list[tuple[int, int]]:
    return [(start, min(self.size, length - start)) for start in self.starts]


def _axis_tiles(length: int, tile_in: int, tile_out: int, overlap_factor: float,
                in_units: int, out_units: int) -> _AxisTiles:
  """diffusers' tile arithmetic for one axis; `in_units` input pixels make `out_units` output
  pixels (decode: 1 latent -> 8 pixels, encode: 8 pixels -> 1 latent)."""
  stride = int(tile_in * (1 - overlap_factor))
  blend = int(tile_out * overlap_factor)
  keep = tile_out - blend
  if stride < 1 or keep * in_units != stride * out_units:
    # diffusers would silently return a video of the wrong size.
    raise ValueError(f"tiling misaligned: tiles of {tile_in} step by {stride} input pixels but "
                     f"keep {keep} output pixels (overlap factor {overlap_factor})")
  return _AxisTiles(tuple(range(0, length, stride)), tile_in, blend, keep)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """diffusers' blend_v / blend_h: cross-fade the first `extent` rows of `b` from the last of
  `a` along `axis`."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent == 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = (np.arange(extent) / extent).astype(np.float32).reshape(shape)
  head = (jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - w)
          + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w)
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)],
                         axis=axis)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _assemble(rows: _AxisTiles, cols: _AxisTiles, tiles: tuple[tuple[jax.Array, ...], ...]):
  """Blends each tile's output with the (already blended) tiles above and to its left, as
  diffusers does in place, keeps each one's top-left `keep` pixels and joins them."""
  out = {}
  for i in range(len(rows.starts)):
    for j in range(len(cols.starts)):
      y = tiles[i][j]
      if i > 0:
        y = _blend(out[i - 1, j], y, rows.blend, axis=2)
      if j > 0:
        y = _blend(out[i, j - 1], y, cols.blend, axis=3)
      out[i, j] = y
  return jnp.concatenate([
      jnp.concatenate([out[i, j][:, :, :rows.keep, :cols.keep]
                       for j in range(len(cols.starts))], axis=3)
      for i in range(len(rows.starts))], axis=2)


def _stream(step: Callable, x: jax.Array, frame_batch_size: int | None,
            tiles: tuple[_AxisTiles, _AxisTiles]) -> Iterator[jax.Array]:
  """Runs `step(x_window, cache) -> (output, cache)` over frame batches (outer) and tiles
  (inner), one cache per tile, and yields each frame batch's blended output.

  diffusers loops over tiles outside frame batches; blending acts per frame, so the result is the
  same, and this order lets a frame batch be handed on as soon as it is done.
  """
  x = jnp.asarray(x)  # once, not once per window, if it comes from the host
  rows, cols = tiles
  b, _, height, width, c = x.shape
  caches = {}
  for start, end in frame_batches(x.shape[1], frame_batch_size):
    outputs = [[None] * len(cols.starts) for _ in rows.starts]
    for i, (top, h) in enumerate(rows.windows(height)):
      for j, (left, w) in enumerate(cols.windows(width)):
        # dynamic_slice: compiled once per window size, not once per window position.
        window = jax.lax.dynamic_slice(x, (0, start, top, left, 0), (b, end - start, h, w, c))
        outputs[i][j], caches[i, j] = step(window, caches.get((i, j)))
    yield _assemble(rows, cols, tuple(map(tuple, outputs)))


class CogVideoXVAE(nnx.Module):
  """diffusers' AutoencoderKLCogVideoX (no quant convs), channels-last."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder3D(config, rngs=rngs)
    self.decoder = Decoder3D(config, rngs=rngs)

  def _tiles(self, height: int, width: int, tiling: Tiling | None, decoding: bool):
    """The (rows, cols) tile grid for an input of `height` x `width`; one tile if not tiled."""
    s = self.config.spatial_compression
    if tiling is not None:
      sample = (tiling.sample_height, tiling.sample_width)
      latent = (int(tiling.sample_height / s), int(tiling.sample_width / s))
      tile_in, tile_out = (latent, sample) if decoding else (sample, latent)
      if height > tile_in[0] or width > tile_in[1]:
        units = (1, s) if decoding else (s, 1)
        factors = (tiling.overlap_factor_height, tiling.overlap_factor_width)
        return tuple(_axis_tiles(n, tile_in[a], tile_out[a], factors[a], *units)
                     for a, n in enumerate((height, width)))
    return _AxisTiles.whole(height), _AxisTiles.whole(width)

  def _stream(self, step_fn, x, frame_batch_size, tiling, decoding):
    graphdef, state = nnx.split(self)
    return _stream(functools.partial(step_fn, graphdef, state), x, frame_batch_size,
                   self._tiles(x.shape[2], x.shape[3], tiling, decoding))

  def encode(self, video: jax.Array, *, frame_batch_size: int | None = 8,
             tiling: Tiling | None = None) -> tuple[jax.Array, jax.Array]:
    """video [batch, frames, height, width, in_channels] in [-1, 1] ->
    (mean, logvar), each [batch, latent_frames, height / 8, width / 8, latent_channels].

    With the default batches of 8 frames, frames should be 1, 8k or 8k + 1 (49 for CogVideoX),
    as in diffusers; `frame_batch_size=None` encodes all frames in one batch. logvar is clipped
    to [-30, 20] as in diffusers.
    """
    return _gaussian(tuple(self._stream(_encode_step, video, frame_batch_size, tiling, False)))

  def iter_decode(self, latents: jax.Array, *, frame_batch_size: int | None = 2,
                  tiling: Tiling | None = None) -> Iterator[jax.Array]:
    """Like `decode`, yielding the video one frame batch at a time (copy each to the host, or
    write it out, to keep accelerator memory independent of the video's length)."""
    return self._stream(_decode_step, latents, frame_batch_size, tiling, True)

  def decode(self, latents: jax.Array, *, frame_batch_size: int | None = 2,
             tiling: Tiling | None = None) -> jax.Array:
    """latents [batch, latent_frames, h, w, latent_channels] (unscaled: divide the diffusion
    model's latents by `scaling_factor` first) -> video [batch, frames, 8h, 8w, out_channels],
    frames = 1 + 4 (latent_frames - 1) for an odd latent count.

    `frame_batch_size` latent frames per batch (diffusers: 2; `None`: all at once, which changes
    the group-norm statistics and so the output); `tiling` splits each batch spatially.
    """
    return jnp.concatenate(
        list(self.iter_decode(latents, frame_batch_size=frame_batch_size, tiling=tiling)),
        axis=1)


@jax.jit
def _gaussian(moments: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
  """Encoder outputs of all frame batches -> (mean, logvar clipped like diffusers)."""
  mean, logvar = jnp.split(jnp.concatenate(moments, axis=1), 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)
