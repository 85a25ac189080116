"""The toy pipeline's parameter-free autoencoder: exact on keyframes, exact for linear motion."""
import numpy as np
import pytest

from ttt_jax.models.pixel_vae import PixelVAE, PixelVAEConfig
from ttt_jax.models.vae_convert import load_converted_vae, save_pixel_vae


def test_roundtrip_is_exact_for_motion_linear_between_keyframes():
  rng = np.random.default_rng(0)
  keys = rng.uniform(-1, 1, size=(2, 4, 8, 12, 3)).astype(np.float32)  # 4 keyframes
  frames = [keys[:, :1]]
  for j in range(1, 4):
    for r in range(1, 5):  # naive loop: the 4 frames after keyframe j-1, the last is keyframe j
      frames.append((keys[:, j - 1] * (1 - r / 4) + keys[:, j] * (r / 4))[:, None])
  video = np.concatenate(frames, axis=1)
  assert video.shape == (2, 13, 8, 12, 3)
  vae = PixelVAE(PixelVAEConfig(patch=4))
  mean, logvar = vae.encode(video)
  assert mean.shape == (2, 4, 2, 3, 48) and np.all(np.asarray(logvar) == -30.0)
  # Channel order: (row in block, column in block, rgb), block (0, 0) of frame 0.
  np.testing.assert_array_equal(np.asarray(mean)[0, 0, 0, 0].reshape(4, 4, 3),
                                video[0, 0, :4, :4])
  np.testing.assert_allclose(np.asarray(vae.decode(mean)), video, atol=1e-6)


def test_bad_shapes_and_checkpoint_roundtrip(tmp_path):
  vae = PixelVAE(PixelVAEConfig(patch=4))
  with pytest.raises(ValueError, match="1 \\+ 4k"):
    vae.encode(np.zeros((1, 6, 8, 12, 3), np.float32))
  save_pixel_vae(tmp_path, PixelVAEConfig(patch=2, scaling_factor=1.7))
  config, model = load_converted_vae(tmp_path)
  assert (config.patch, config.scaling_factor, config.latent_channels) == (2, 1.7, 12)
  assert config.spatial_compression == 2 and isinstance(model, PixelVAE)
