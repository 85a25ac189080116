"""End-to-end sampling at the 63 s local size: 21 segments, 253 latent frames, one jit'd pass.

The test builds every model it needs: a sentencepiece tokenizer it trains, a tiny random
transformers T5 and diffusers CogVideoX VAE it converts with our converters, a random DiT.
"""
import json
import os

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
from ttt_jax.data.storyboard import parse_storyboard
from ttt_jax.data.tokenizer import StoryboardTokenizer, segment_text
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
  out = tmp_path / "out"
  info = run(config, str(root / "dit"), str(root / "story.json"), str(out), progress=False)
  frames, fps = read_mp4(out / "video.mp4")
  # 253 latent frames -> 1 + 4 * 252 = 1009 frames = 63 s at 16 fps, 32 x 48 pixels.
  assert frames.shape == (1 + 4 * (config.latent_frames - 1), config.height, config.width, 3)
  assert fps == config.fps == 16
  assert info["frames"] == 1009 and info["segments"] == 21
  # The local text length (config.text.max_length) cuts these texts: one warning per segment.
  assert [w.split(":")[0] for w in info["warnings"]] == [
      f"storyboard segment {i}" for i in range(21)]
  assert sorted(os.listdir(out)) == ["contact_sheet.png", "sample.json", "storyboard.json",
                                     "video.mp4"]
  assert os.listdir(tmp_path) == ["out"]  # written in a sibling folder, renamed
  # A second run into the same folder is refused before anything is loaded; nothing changes.
  before = {f: (out / f).read_bytes() for f in os.listdir(out)}
  with pytest.raises(FileExistsError, match=r"--out .*/out exists and is not empty"):
    run(config, str(root / "dit"), str(root / "story.json"), str(out), seed=5, progress=False)
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_storyboard_warnings_name_the_segment_and_the_count(assets):
  config, root = assets
  sampler = Sampler(config, str(root / "dit"))
  long = "Tom chases Jerry around the red kitchen. " * 20
  k = config.segments
  segments = parse_storyboard([{"text": "Tom."}] * k + [{"text": long}])  # "Tom." fits
  n = len(sampler.tokenizer.tokenize(segment_text(long.strip(), False, True)))
  keep = config.text.max_length - 1
  assert n > keep
  assert sampler.storyboard_warnings(segments) == [
      f"storyboard segment {k}: its text is {n} tokens with scene tokens, config.text.max_length "
      f"{config.text.max_length} keeps {keep} (+ EOS): the last {n - keep} are cut, <end_scene> "
      "among them",
      f"storyboard has {k + 1} segments; stage {config.stage} was trained on {k}: segments "
      f"from {k} on go past the trained context"]
  assert sampler.storyboard_warnings(segments[:k]) == []


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
