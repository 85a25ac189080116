"""Position tables of CogVideoX: 3D RoPE, 3D sin-cos embeddings, sinusoidal timesteps.

The tables are static (they depend only on shapes), so they are built with numpy in float64
and cast once; the rotation that runs on device is `ttt_jax.mixers.common.apply_rope`, shared
with the mixers. Every function follows the diffusers function named in its docstring, including
its quirks, so converted CogVideoX weights see exactly the positions they were trained with.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _rope_1d(dim: int, pos: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin [len(pos), dim], each frequency repeated twice (interleaved pairs)."""
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  angles = np.outer(pos.astype(np.float64), freqs)
  return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def resize_crop_region(grid: tuple[int, int], base_width: int,
                       base_height: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """diffusers' `get_resize_crop_region_for_grid`: where a grid sits in the trained grid."""
  h, w = grid
  if h / w > base_height / base_width:
    resize_h, resize_w = base_height, int(round(base_height / h * w))
  else:
    resize_w, resize_h = base_width, int(round(base_width / w * h))
  top = int(round((base_height - resize_h) / 2.0))
  left = int(round((base_width - resize_w) / 2.0))
  return (top, left), (top + resize_h, left + resize_w)


def rope_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int,
            *, slice_grid: bool = False, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """CogVideoX 3D RoPE tables, as the diffusers pipelines build them.

  head_dim is split into time (head_dim/4) and height, width (3·head_dim/8 each).
  CogVideoX 1.0 (`slice_grid=False`) places the grid by linspace inside the crop of the trained
  grid (`get_3d_rotary_pos_embed(grid_type="linspace")`); CogVideoX 1.5 (`slice_grid=True`) uses
  integer positions (`grid_type="slice"`).

  Args:
    head_dim: attention head size.
    frames: token frames (latent frames / patch_size_t).
    grid_h, grid_w: token grid (latent size / patch_size).
    base_h, base_w: token grid the model was trained at (sample_height / patch_size, ...).
    slice_grid: CogVideoX 1.5 positions.
    theta: RoPE base.

  Returns:
    cos, sin: [frames * grid_h * grid_w, head_dim] float32, tokens in (frame, h, w) order.
  """
  if head_dim % 16:
    raise ValueError(f"3D RoPE needs head_dim divisible by 16, got {head_dim}")
  if slice_grid:
    pos_h, pos_w = np.arange(grid_h), np.arange(grid_w)
    pos_t = np.arange(frames)
  else:
    (top, left), (bottom, right) = resize_crop_region((grid_h, grid_w), base_w, base_h)
    # float32 linspace, as diffusers computes it, so positions match bit for bit.
    pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
    pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
  dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
  tables = []
  for part in range(2):  # cos, then sin
    t = _rope_1d(dim_t, pos_t, theta)[part][:, None, None, :]
    h = _rope_1d(dim_hw, pos_h, theta)[part][None, :, None, :]
    w = _rope_1d(dim_hw, pos_w, theta)[part][None, None, :, :]
    shape = (frames, grid_h, grid_w)
    table = np.concatenate([np.broadcast_to(t, shape + t.shape[-1:]),
                            np.broadcast_to(h, shape + h.shape[-1:]),
                            np.broadcast_to(w, shape + w.shape[-1:])], axis=-1)
    tables.append(table.reshape(frames * grid_h * grid_w, -1).astype(np.float32))
  return tables[0], tables[1]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(width: int, frames: int, grid_h: int, grid_w: int, spatial_scale: float,
              temporal_scale: float) -> np.ndarray:
  """diffusers' `get_3d_sincos_pos_embed` (CogVideoX-2B's fixed positional embedding).

  Channels: [time (width/4) | w-coordinate (3·width/8) | h-coordinate (3·width/8)] (diffusers
  names the halves the other way round but feeds the w grid first).

  Returns:
    [frames * grid_h * grid_w, width] float32, tokens in (frame, h, w) order.
  """
  dim_s, dim_t = 3 * width // 4, width // 4
  grid_w_pos, grid_h_pos = np.meshgrid(
      np.arange(grid_w, dtype=np.float32) / spatial_scale,
      np.arange(grid_h, dtype=np.float32) / spatial_scale, indexing="xy")
  spatial = np.concatenate([_sincos_1d(dim_s // 2, grid_w_pos),
                            _sincos_1d(dim_s // 2, grid_h_pos)], axis=1)
  temporal = _sincos_1d(dim_t, np.arange(frames, dtype=np.float32) / temporal_scale)
  hw = grid_h * grid_w
  table = np.concatenate([np.repeat(temporal[:, None, :], hw, axis=1),
                          np.repeat(spatial[None, :, :], frames, axis=0)], axis=-1)
  return table.reshape(frames * hw, width).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: [batch] -> [batch, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
