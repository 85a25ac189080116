"""The toy pipeline's autoencoder: a linear patch autoencoder with temporal keyframes.

  encode: video [b, 1 + rk, H, W, 3] -> latent [b, 1 + k, H/p, W/p, C]: frame 0 and every r-th
    frame after it (the keyframes; r = temporal_compression_ratio, CogVideoX's 4 by default, 8
    in the toy job); each p x p x 3 pixel block, as a vector, minus `mean`, projected on the C
    rows of `basis` (C = 3p² and no basis: the block itself), divided by `channel_std` (when set);
  decode: the block from `(latent * channel_std) @ basis + mean`, the r - 1 frames between two
    keyframes linearly interpolated.

`fit_linear` fits `mean` and `basis` to data by PCA: the least-squares optimal linear autoencoder
with C latent channels (a closed-form training, seconds on a CPU), and each channel's std. Exact
for motion linear over r frames (1/2 s at r = 8 and 16 fps); `logvar` is a constant -30 (a point
posterior).

Per-channel whitening (`channel_std`, what the toy job uses) rather than one global
`scaling_factor`: the PCA channels' stds span more than 10x (3.02 down to 0.24 under one global
scale, measured on 20 stories), so under one scale the diffusion noise drowns the weak (edge)
channels long before the strong ones, and an error in a weak channel reaches the pixels at full
size. Whitened, every channel meets the noise at the same signal-to-noise ratio, and the decoder
scales each channel's errors down by its std.

Why not a trained CogVideoX VAE: on this 2-core CPU a 3-block (16, 32, 32)-channel CogVideoX VAE
trained at about 2 s a step on 4 clips of 9 frames at 32x48; after 200 steps (7 minutes) its
reconstructions of held-out toy cartoons kept the stated facts in only 48% of segments
(toy_metrics.persistence_score). The 16-channel PCA autoencoder keeps them in 100% (5 of 5 stories
measured), and its 4x4 blocks under a 2x2 DiT patch give 64-dim tokens: no wider than the toy
DiT, which must predict every dimension of the noise to remove it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KIND = "pixel"


@dataclasses.dataclass(frozen=True)
class PixelVAEConfig:
  patch: int = 4
  in_channels: int = 3
  temporal_compression_ratio: int = 4
  scaling_factor: float = 1.0
  kind: str = KIND
  mean: tuple[float, ...] | None = None                # [3p²]
  basis: tuple[tuple[float, ...], ...] | None = None  # [C, 3p²], orthonormal rows
  # [C]: each channel's std on the fitting data; latents are divided by it (per-channel
  # whitening), so the diffusion noise meets every channel at the same signal-to-noise ratio.
  channel_std: tuple[float, ...] | None = None

  @property
  def spatial_compression(self) -> int:
    return self.patch

  @property
  def block_dim(self) -> int:
    return self.in_channels * self.patch ** 2

  @property
  def latent_channels(self) -> int:
    return len(self.basis) if self.basis is not None else self.block_dim

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PixelVAEConfig:
    d = dict(d)
    if d.get("mean") is not None:
      d["mean"] = tuple(d["mean"])
    if d.get("basis") is not None:
      d["basis"] = tuple(tuple(row) for row in d["basis"])
    if d.get("channel_std") is not None:
      d["channel_std"] = tuple(d["channel_std"])
    return cls(**d)


def to_blocks(frames: np.ndarray | jax.Array, patch: int):
  """[..., H, W, c] -> [..., H/p, W/p, p·p·c], (row in block, column in block, channel) order."""
  *lead, h, w, c = frames.shape
  x = frames.reshape(*lead, h // patch, patch, w // patch, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, h // patch, w // patch, patch * patch * c)


def from_blocks(blocks, patch: int, channels: int):
  """Inverse of `to_blocks`."""
  *lead, h, w, _ = blocks.shape
  n = len(lead)
  x = blocks.reshape(*lead, h, w, patch, patch, channels)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, h * patch, w * patch, channels)


def fit_linear(frames: np.ndarray, patch: int, latent_channels: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PCA of the p x p blocks of `frames` (float [..., H, W, 3] in [-1, 1]).

  Returns (mean [3p²], basis [latent_channels, 3p²] with orthonormal rows, channel_std
  [latent_channels]: the std of each projection, the singular value over sqrt(blocks)).
  """
  x = to_blocks(np.asarray(frames, np.float64), patch)
  x = x.reshape(-1, x.shape[-1])
  if not 0 < latent_channels <= x.shape[-1]:
    raise ValueError(f"latent_channels must be in 1..{x.shape[-1]}, got {latent_channels}")
  mean = x.mean(0)
  _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
  std = sv[:latent_channels] / np.sqrt(len(x))
  return (mean.astype(np.float32), vt[:latent_channels].astype(np.float32),
          np.maximum(std, 1e-6).astype(np.float32))


class PixelVAE:
  """encode / decode with the signature of `CogVideoXVAE`'s (frame batches and tiling ignored:
  every keyframe is coded on its own)."""

  def __init__(self, config: PixelVAEConfig):
    self.config = config
    c = config
    self._mean = (jnp.asarray(c.mean, jnp.float32) if c.mean is not None
                  else jnp.zeros(c.block_dim, jnp.float32))
    self._basis = (jnp.asarray(c.basis, jnp.float32) if c.basis is not None
                   else jnp.eye(c.block_dim, dtype=jnp.float32))
    self._std = (jnp.asarray(c.channel_std, jnp.float32) if c.channel_std is not None
                 else jnp.ones(len(self._basis), jnp.float32))

  def encode(self, video: jax.Array, *, frame_batch_size: int | None = None,
             tiling: Any = None) -> tuple[jax.Array, jax.Array]:
    """video [b, 1 + rk, H, W, c] -> (mean, logvar), each [b, 1 + k, H/p, W/p, C]."""
    del frame_batch_size, tiling
    r, p = self.config.temporal_compression_ratio, self.config.patch
    _, t, h, w, _ = video.shape
    if (t - 1) % r or h % p or w % p:
      raise ValueError(f"video {video.shape}: frames must be 1 + {r}k and height/width "
                       f"multiples of {p}")
    blocks = to_blocks(jnp.asarray(video, jnp.float32)[:, ::r], p)
    mean = (blocks - self._mean) @ self._basis.T / self._std
    return mean, jnp.full_like(mean, -30.0)

  def decode(self, latents: jax.Array, *, frame_batch_size: int | None = None,
             tiling: Any = None) -> jax.Array:
    """latents [b, F, h, w, C] -> video [b, 1 + r(F - 1), h p, w p, c]."""
    del frame_batch_size, tiling
    c = self.config
    keys = from_blocks((jnp.asarray(latents, jnp.float32) * self._std) @ self._basis + self._mean,
                       c.patch, c.in_channels)
    b, f, height, width, _ = keys.shape
    if f == 1:
      return keys
    r = c.temporal_compression_ratio
    weights = jnp.arange(1, r + 1, dtype=keys.dtype)[:, None, None, None] / r  # [r, 1, 1, 1]
    between = keys[:, :-1, None] * (1 - weights) + keys[:, 1:, None] * weights
    return jnp.concatenate([keys[:, :1], between.reshape(b, (f - 1) * r, height, width, -1)],
                           axis=1)
