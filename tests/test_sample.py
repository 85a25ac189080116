"""End-to-end sampling at the 63 s local size: 21 segments, 253 latent frames, one jit'd pass.

The test builds every model it needs: a sentencepiece tokenizer it trains, a tiny random
transformers T5 and diffusers CogVideoX VAE it converts with our converters, a random DiT.
"""
import json

import numpy as np
import pytest
import sentencepiece
import torch
from diffusers import AutoencoderKLCogVideoX
from flax import nnx
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from configs import tomjerry_63s
from ttt_jax import checkpoint
from ttt_jax.data.tokenizer import StoryboardTokenizer
from ttt_jax.data.video_io import read_mp4
from ttt_jax.models.dit import DiT, DiTConfig
from ttt_jax.models.t5_convert import convert_t5
from ttt_jax.models.vae_convert import convert_vae
from ttt_jax.sample import Sampler, run

CORPUS = ["Tom chases Jerry around the red kitchen.", "Jerry hides in a blue teacup.",
          "The cat slips on a banana peel and crashes.", "A mouse laughs at the cat."] * 20


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_assets")
  config = tomjerry_63s.get_config("runlocal")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(root / "spiece"), vocab_size=40,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  tokenizer = StoryboardTokenizer(root / "spiece.model", max_length=config.text.max_length)

  torch.manual_seed(0)
  t5 = T5EncoderModel(HFT5Config(
      vocab_size=tokenizer.vocab_size, d_model=config.model.text_embed_dim, d_kv=8, d_ff=64,
      num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8, relative_attention_max_distance=16))
  t5.save_pretrained(root / "t5_hf")
  convert_t5(root / "t5_hf", root / "t5")

  vae = AutoencoderKLCogVideoX(
      block_out_channels=(8, 8, 8, 8), layers_per_block=1,
      latent_channels=config.model.in_channels, norm_num_groups=4,
      temporal_compression_ratio=4, sample_height=config.height, sample_width=config.width,
      down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4)
  vae.save_pretrained(root / "vae_hf")
  convert_vae(root / "vae_hf", root / "vae")

  dit = DiT(DiTConfig.from_dict(config.model.to_dict()), rngs=nnx.Rngs(0))
  checkpoint.save_params(root / "dit" / "params", nnx.state(dit, nnx.Param).to_pure_dict())
  (root / "dit" / "config.json").write_text(json.dumps(dit.config.to_dict()))

  config.text.checkpoint, config.text.tokenizer = str(root / "t5"), str(root / "spiece.model")
  config.vae.checkpoint = str(root / "vae")
  story = [{"text": f"Segment {i}: Tom chases Jerry.", "scene_transition": i % 7 == 0,
            "negative_text": "blurry"} for i in range(config.segments)]
  (root / "story.json").write_text(json.dumps(story))
  return config, root


def test_sample_63s_runlocal_writes_video(assets, tmp_path):
  config, root = assets
  info = run(config, str(root / "dit"), str(root / "story.json"), str(tmp_path), progress=False)
  frames, fps = read_mp4(tmp_path / "video.mp4")
  # 253 latent frames -> 1 + 4 * 252 = 1009 frames = 63 s at 16 fps, 32 x 48 pixels.
  assert frames.shape == (1 + 4 * (config.latent_frames - 1), config.height, config.width, 3)
  assert fps == config.fps == 16
  assert info["frames"] == 1009 and info["segments"] == 21
  assert (tmp_path / "contact_sheet.png").exists()


def test_fixed_seed_is_deterministic_and_seeds_differ(assets):
  config, root = assets
  config = config.copy_and_resolve_references()
  config.sampling.num_steps = 2
  sampler = Sampler(config, str(root / "dit"))
  from ttt_jax.data.storyboard import load_storyboard
  segments = load_storyboard(root / "story.json")[:2]
  a = sampler.generate(segments, seed=1, progress=False)
  b = sampler.generate(segments, seed=1, progress=False)
  c = sampler.generate(segments, seed=2, progress=False)
  assert a.shape == (1, 25, config.model.in_channels, 4, 6)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_config_checkpoint_mismatch_is_an_error(assets):
  config, root = assets
  config = config.copy_and_resolve_references()
  config.model.mixer = "mamba2"
  with pytest.raises(ValueError, match="does not match config.model.*mixer"):
    Sampler(config, str(root / "dit"))
