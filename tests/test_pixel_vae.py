"""The toy pipeline's linear patch autoencoder: block layout, exact for linear motion, PCA fit
against numpy's SVD reconstruction, checkpoint round trip."""
import dataclasses

import numpy as np
import pytest

from ttt_jax.models.pixel_vae import PixelVAE, PixelVAEConfig, fit_linear
from ttt_jax import checkpoint
from ttt_jax.models.vae_convert import load_converted_vae


def _linear_motion_video(keys, ratio=4):
  """Naive loop: after each keyframe, `ratio` frames interpolated towards the next (the last is
  it)."""
  frames = [keys[:, :1]]
  for j in range(1, keys.shape[1]):
    for r in range(1, ratio + 1):
      frames.append((keys[:, j - 1] * (1 - r / ratio) + keys[:, j] * (r / ratio))[:, None])
  return np.concatenate(frames, axis=1)


@pytest.mark.parametrize("ratio", [4, 8])  # CogVideoX's temporal compression; the toy job's
def test_full_rank_roundtrip_is_exact_for_linear_motion(ratio):
  rng = np.random.default_rng(0)
  video = _linear_motion_video(rng.uniform(-1, 1, size=(2, 4, 8, 12, 3)).astype(np.float32),
                               ratio)
  assert video.shape == (2, 1 + 3 * ratio, 8, 12, 3)
  vae = PixelVAE(PixelVAEConfig(patch=4, temporal_compression_ratio=ratio))
  mean, logvar = vae.encode(video)
  assert mean.shape == (2, 4, 2, 3, 48) and np.all(np.asarray(logvar) == -30.0)
  # Channel order (row in block, column in block, rgb): block (0, 1) of keyframe 1 = frame ratio.
  np.testing.assert_array_equal(np.asarray(mean)[0, 1, 0, 1].reshape(4, 4, 3),
                                video[0, ratio, :4, 4:8])
  np.testing.assert_allclose(np.asarray(vae.decode(mean)), video, atol=1e-6)


def test_pca_fit_matches_svd_reconstruction():
  rng = np.random.default_rng(1)
  frames = rng.uniform(-1, 1, size=(5, 8, 12, 3)).astype(np.float32)
  mean, basis, std = fit_linear(frames, patch=4, latent_channels=6)
  np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-5)
  # Independent reference: rank-6 truncated SVD of the centred 48-dim block vectors.
  blocks = frames.reshape(5, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
  centred = blocks - blocks.mean(0)
  u, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
  want = (u[:, :6] * s[:6]) @ vt[:6] + blocks.mean(0)
  want_frame = want.reshape(5, 2, 3, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(5, 8, 12, 3)[0]
  # Whitened or not, decoding undoes the scale: the same rank-6 reconstruction.
  for channel_std in (None, tuple(std.tolist())):
    config = PixelVAEConfig(patch=4, mean=tuple(mean.tolist()),
                            basis=tuple(map(tuple, basis.tolist())), channel_std=channel_std)
    vae = PixelVAE(config)
    z, _ = vae.encode(frames[None, :1])
    got = np.asarray(vae.decode(z))[0, 0]
    np.testing.assert_allclose(got, want_frame, atol=1e-4)
    assert config.latent_channels == 6
  # channel_std is each projection's std over the fitted blocks: whitened latents have unit
  # variance per channel.
  np.testing.assert_allclose(std, (u[:, :6] * s[:6]).std(0), rtol=1e-4)
  z, _ = PixelVAE(config).encode(frames[:, None])  # every frame as a one-frame video
  np.testing.assert_allclose(np.asarray(z).reshape(-1, 6).std(0), np.ones(6), rtol=1e-4)


def test_bad_shapes_and_checkpoint_roundtrip(tmp_path):
  vae = PixelVAE(PixelVAEConfig(patch=4))
  with pytest.raises(ValueError, match="1 \\+ 4k"):
    vae.encode(np.zeros((1, 6, 8, 12, 3), np.float32))
  with pytest.raises(ValueError, match="latent_channels must be in 1..12"):
    fit_linear(np.zeros((1, 4, 4, 3), np.float32), patch=2, latent_channels=13)
  mean, basis, std = fit_linear(np.random.default_rng(2).uniform(size=(2, 4, 4, 3)), 2, 3)
  config = PixelVAEConfig(patch=2, scaling_factor=1.7, mean=tuple(mean.tolist()),
                          basis=tuple(map(tuple, basis.tolist())), channel_std=tuple(std.tolist()))
  checkpoint.save_model(tmp_path, config)
  loaded, model = load_converted_vae(tmp_path)
  assert loaded == config and isinstance(model, PixelVAE)
  assert (loaded.latent_channels, loaded.spatial_compression) == (3, 2)
  assert dataclasses.asdict(loaded)["kind"] == "pixel"
