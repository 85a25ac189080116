"""A fixed, parameter-free "VAE" for the toy pipeline: space-to-depth plus temporal keyframes.

Why not a trained CogVideoX VAE: on this 2-core CPU a 3-block (16, 32, 32)-channel CogVideoX VAE
trains at about 2 s a step on 4 clips of 9 frames at 32x48; after 200 steps (7 minutes) its
reconstructions of held-out toy cartoons kept the stated facts in only 48% of segments
(toy_toons.persistence_score), so the toy main job could not tell the DiT's memory from the
VAE's losses. This autoencoder has the CogVideoX VAE's interface and latent geometry instead:

  encode: video [b, 1 + 4k, H, W, 3] -> latent [b, 1 + k, H/p, W/p, 3p²]: frame 0 and every
    4th frame after it (the keyframes), each p x p pixel block folded into channels;
  decode: the inverse fold, with the 3 frames between two keyframes linearly interpolated.

Spatially exact; temporally exact for motion linear over 4 frames (1/4 s at 16 fps). `logvar`
is a constant -30 (a point posterior). `scaling_factor` maps pixel values to unit variance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

KIND = "pixel"


@dataclasses.dataclass(frozen=True)
class PixelVAEConfig:
  patch: int = 4
  in_channels: int = 3
  temporal_compression_ratio: int = 4
  scaling_factor: float = 1.0
  kind: str = KIND

  @property
  def spatial_compression(self) -> int:
    return self.patch

  @property
  def latent_channels(self) -> int:
    return self.in_channels * self.patch ** 2

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PixelVAEConfig:
    return cls(**d)


class PixelVAE:
  """encode / decode with the signature of `CogVideoXVAE`'s (frame batches and tiling ignored:
  every frame is independent of the others but for the interpolation)."""

  def __init__(self, config: PixelVAEConfig):
    self.config = config

  def encode(self, video: jax.Array, *, frame_batch_size: int | None = None,
             tiling: Any = None) -> tuple[jax.Array, jax.Array]:
    """video [b, 1 + 4k, H, W, c] -> (mean, logvar), each [b, 1 + k, H/p, W/p, c p²]."""
    del frame_batch_size, tiling
    r, p = self.config.temporal_compression_ratio, self.config.patch
    b, t, h, w, c = video.shape
    if (t - 1) % r or h % p or w % p:
      raise ValueError(f"video {video.shape}: frames must be 1 + {r}k and height/width "
                       f"multiples of {p}")
    keys = jnp.asarray(video)[:, ::r]
    z = keys.reshape(b, keys.shape[1], h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    mean = z.reshape(b, keys.shape[1], h // p, w // p, p * p * c)
    return mean, jnp.full_like(mean, -30.0)

  def decode(self, latents: jax.Array, *, frame_batch_size: int | None = None,
             tiling: Any = None) -> jax.Array:
    """latents [b, F, h, w, c p²] -> video [b, 1 + 4(F - 1), h p, w p, c]."""
    del frame_batch_size, tiling
    r, p, c = self.config.temporal_compression_ratio, self.config.patch, self.config.in_channels
    b, f, h, w, _ = latents.shape
    keys = latents.reshape(b, f, h, w, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    keys = keys.reshape(b, f, h * p, w * p, c)
    if f == 1:
      return keys
    weights = jnp.arange(1, r + 1, dtype=keys.dtype)[:, None, None, None] / r  # [r, 1, 1, 1]
    between = (keys[:, :-1, None] * (1 - weights) + keys[:, 1:, None] * weights)
    return jnp.concatenate([keys[:, :1], between.reshape(b, (f - 1) * r, h * p, w * p, c)],
                           axis=1)
