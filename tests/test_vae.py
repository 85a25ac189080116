"""CogVideoX VAE: parity with diffusers' AutoencoderKLCogVideoX (torch, CPU, fp32) on a tiny
random model with the real structure: 4 blocks, so 8x spatial and 4x temporal compression, one
spatial-only resampler, channel changes (conv shortcuts) in encoder and decoder.

Compile time dominates (XLA CPU, a few seconds per input shape), so the tests share shapes:
latents are 4 x 4 wherever tiles allow, and frame batches are 3 + 2 + ... latent frames.
"""
import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from flax import nnx
from safetensors.numpy import load_file, save_file

from ttt_jax.models import vae_convert
from ttt_jax.models.vae import CogVideoXVAE, Tiling, VAEConfig, frame_batches
from ttt_jax.models.vae_blocks import CausalConv3d

TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
            norm_num_groups=4, temporal_compression_ratio=4, sample_height=64, sample_width=64,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4)
# CogVideoX-5B's VAE config.json (diffusers format).
COGVIDEOX_5B = {
    "_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.30.0",
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["CogVideoXDownBlock3D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 3,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_height": 480,
    "sample_width": 720, "scaling_factor": 0.7, "shift_factor": None,
    "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False}
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def torch_vae_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = AutoencoderKLCogVideoX(**TINY).eval()
  with torch.no_grad():  # move every weight (norm scales included) off its init
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("cogvideox_vae")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def vae(torch_vae_dir):
  _, path = torch_vae_dir
  return vae_convert.load_diffusers_vae(path)[1]


def _ncthw(x):  # ours [b, t, h, w, c] -> torch [b, c, t, h, w]
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def _nthwc(x):
  return x.numpy().transpose(0, 2, 3, 4, 1)


def _latents(frames, height, width, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randn(1, frames, height, width, 4), jnp.float32)


def _video(frames, height, width, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (1, frames, height, width, 3)),
                     jnp.float32)


def _torch_decode(model, latents, **settings):
  model = copy.deepcopy(model)
  for name, value in settings.items():
    if name == "tiling":
      model.enable_tiling(**value)
    else:
      setattr(model, name, value)
  with torch.no_grad():
    return _nthwc(model.decode(_ncthw(latents)).sample)


def _torch_encode(model, video, tiling=None):
  model = copy.deepcopy(model)
  if tiling:
    model.enable_tiling(**tiling)
  with torch.no_grad():
    dist = model.encode(_ncthw(video)).latent_dist
  return _nthwc(dist.mean), _nthwc(dist.logvar)


def test_config_from_diffusers():
  config = VAEConfig.from_diffusers(COGVIDEOX_5B)
  assert config == VAEConfig()
  assert (config.spatial_compression, config.temporal_compress_level) == (8, 2)
  with pytest.raises(ValueError, match="unknown"):
    VAEConfig.from_diffusers({**COGVIDEOX_5B, "mystery": 1})
  with pytest.raises(ValueError, match="quant"):
    VAEConfig.from_diffusers({**COGVIDEOX_5B, "use_quant_conv": True})
  with pytest.raises(ValueError, match="_class_name"):
    VAEConfig.from_diffusers({**COGVIDEOX_5B, "_class_name": "AutoencoderKL"})


def test_5b_parameters_match_diffusers_keys_and_shapes():
  """Every CogVideoX-5B parameter maps to a diffusers key of the right (transposed) shape."""
  with torch.device("meta"):
    reference = AutoencoderKLCogVideoX.from_config(COGVIDEOX_5B)
  want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  abstract = nnx.eval_shape(lambda: CogVideoXVAE(VAEConfig(), rngs=nnx.Rngs(0)))
  have = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = variable.shape
    if path[-1] == "kernel":  # ours [*window, in, out] -> torch [out, in, *window]
      shape = (shape[-1], shape[-2], *shape[:-2])
    have[vae_convert.torch_key(path)] = shape
  assert have == want


def test_frame_batches_follow_diffusers():
  assert frame_batches(13, 2) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
  assert frame_batches(253, 2)[:2] == [(0, 3), (3, 5)] and len(frame_batches(253, 2)) == 126
  assert frame_batches(49, 8) == [(0, 9)] + [(i, i + 8) for i in range(9, 49, 8)]
  assert frame_batches(1, 2) == [(0, 1)]
  assert frame_batches(7, None) == [(0, 7)]


def test_causal_conv_cache_makes_chunks_exact():
  """Carrying the cache, a causal conv over chunks equals the conv over the whole clip."""
  conv = jax.jit(CausalConv3d(3, 5, 3, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.RandomState(0).randn(2, 7, 6, 5, 3), jnp.float32)
  whole, _ = conv(x, None)
  parts, cache = [], None
  for start, end in ((0, 3), (3, 5), (5, 7)):
    y, cache = conv(x[:, start:end], cache)
    parts.append(y)
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("frames", [9, 17])  # one encoder frame batch; two (9 + 8 frames)
def test_encode_matches_diffusers(torch_vae_dir, vae, frames):
  model, _ = torch_vae_dir
  video = _video(frames, 32, 32)
  mean, logvar = vae.encode(video)
  ref_mean, ref_logvar = _torch_encode(model, video)
  assert mean.shape == (1, 1 + (frames - 1) // 4, 4, 4, 4)
  np.testing.assert_allclose(mean, ref_mean, **TOL)
  np.testing.assert_allclose(logvar, ref_logvar, **TOL)


def test_decode_matches_diffusers_frame_batched(torch_vae_dir, vae):
  """7 latent frames decode as batches of 3, 2, 2 carrying the conv cache, like diffusers."""
  model, _ = torch_vae_dir
  latents = _latents(7, 4, 4)
  video = vae.decode(latents)
  assert video.shape == (1, 25, 32, 32, 3)
  np.testing.assert_allclose(video, _torch_decode(model, latents), **TOL)
  # Streaming hands out the same frames, batch by batch: 9, then 8 per 2 latent frames.
  parts = list(vae.iter_decode(latents))
  assert [p.shape[1] for p in parts] == [9, 8, 8]
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), video, rtol=0, atol=0)


def test_decode_matches_diffusers_whole(torch_vae_dir, vae):
  """All latent frames in one batch. This is NOT the frame-batched result: group norms take their
  statistics over the frames of a batch, which the conv cache does not carry."""
  model, _ = torch_vae_dir
  latents = _latents(7, 4, 4)
  whole = vae.decode(latents, frame_batch_size=None)
  np.testing.assert_allclose(
      whole, _torch_decode(model, latents, num_latent_frames_batch_size=7), **TOL)
  assert np.abs(whole - vae.decode(latents)).max() > 1e-2


# Tiles of 32 x 32 pixels (4 x 4 latents) overlapping by a quarter: 7 x 7 latents make 3 x 3 tiles.
TILING = Tiling(32, 32, 0.25, 0.25)
TORCH_TILING = dict(tile_sample_min_height=32, tile_sample_min_width=32,
                    tile_overlap_factor_height=0.25, tile_overlap_factor_width=0.25)


def test_tiled_decode_matches_diffusers(torch_vae_dir, vae):
  model, _ = torch_vae_dir
  latents = _latents(3, 7, 7, seed=2)  # 3 x 3 tiles of 4, 4, 1 latents
  video = vae.decode(latents, tiling=TILING)
  assert video.shape == (1, 9, 56, 56, 3)
  np.testing.assert_allclose(video, _torch_decode(model, latents, tiling=TORCH_TILING), **TOL)


def test_tiled_encode_matches_diffusers(torch_vae_dir, vae):
  """2 frame batches (9 + 8 frames) x 3 x 2 tiles, each tile with its own conv cache: rows at 0,
  24, 48 (32, 32, 8 high), columns at 0, 24 (32, 8 wide; diffusers tiles both axes once either
  exceeds a tile)."""
  model, _ = torch_vae_dir
  video = _video(17, 56, 32, seed=3)
  mean, logvar = vae.encode(video, tiling=TILING)
  ref_mean, ref_logvar = _torch_encode(model, video, tiling=TORCH_TILING)
  assert mean.shape == (1, 5, 7, 4, 4)
  np.testing.assert_allclose(mean, ref_mean, **TOL)
  np.testing.assert_allclose(logvar, ref_logvar, **TOL)


def test_default_tiling_is_aligned_and_misaligned_tiling_raises(vae):
  """diffusers' default tiles (240 x 360 pixels) fit 480 x 720 video; other overlaps may not."""
  default = Tiling.default(VAEConfig())
  for decoding, (height, width) in ((True, (60, 90)), (False, (480, 720))):
    rows, cols = vae._tiles(height, width, default, decoding)
    assert (rows.starts, cols.starts) == (((0, 25, 50), (0, 36, 72)) if decoding
                                          else ((0, 200, 400), (0, 288, 576)))
  with pytest.raises(ValueError, match="misaligned"):
    vae.decode(_latents(1, 7, 7), tiling=Tiling(32, 32, 0.2, 0.25))


def _rewrite_checkpoint(src, dst, edit):
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  tensors = edit(load_file(os.path.join(src, vae_convert.WEIGHTS_NAME)))
  save_file(tensors, os.path.join(dst, vae_convert.WEIGHTS_NAME))


def test_mismatched_checkpoint_raises(torch_vae_dir, tmp_path):
  _, path = torch_vae_dir
  key = "decoder.up_blocks.1.resnets.0.norm2.conv_b.conv.weight"

  def drop_and_add(tensors):
    tensors = dict(tensors)
    tensors["encoder.extra.weight"] = tensors.pop(key)
    return tensors

  _rewrite_checkpoint(path, tmp_path / "bad", drop_and_add)
  with pytest.raises(ValueError) as error:
    vae_convert.load_diffusers_vae(tmp_path / "bad")
  message = str(error.value)
  assert "missing from checkpoint: ['" + key in message
  assert "unexpected in checkpoint: ['encoder.extra.weight']" in message

  def reshape(tensors):
    return {**tensors, "decoder.conv_in.conv.bias": np.zeros(3, np.float32)}

  _rewrite_checkpoint(path, tmp_path / "bad_shape", reshape)
  with pytest.raises(ValueError, match="decoder.conv_in.conv.bias"):
    vae_convert.load_diffusers_vae(tmp_path / "bad_shape")


def test_convert_round_trip(torch_vae_dir, vae, tmp_path):
  _, path = torch_vae_dir
  vae_convert.convert_vae(path, tmp_path / "converted")
  config, restored = vae_convert.load_converted_vae(tmp_path / "converted")
  assert config == vae.config
  assert dataclasses.asdict(config)["block_out_channels"] == (8, 8, 16, 16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               nnx.to_pure_dict(nnx.state(vae, nnx.Param)),
               nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
