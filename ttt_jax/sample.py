"""Generate a multi-segment video from a storyboard in one denoising pass.

  python -m ttt_jax.sample --config=configs/tomjerry_63s.py --checkpoint=DIR \
      --storyboard=FILE.json --out=DIR [--seed=N]

DIR (checkpoint) holds the DiT as `params/` + `config.json` (`python -m ttt_jax.convert
cogvideox` or a training run). The text encoder, its tokenizer and the VAE come from
`config.text.checkpoint`, `config.text.tokenizer` and `config.vae.checkpoint`. The whole video —
every segment — is denoised together by one jax.jit-compiled function (as the paper samples),
then decoded by the VAE in frame batches and written as `video.mp4` (config.fps) and
`contact_sheet.png` (the middle frame of each segment).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from ttt_jax import diffusion
from ttt_jax.data.storyboard import Segment, load_storyboard, segment_prompts
from ttt_jax.data.tokenizer import StoryboardTokenizer
from ttt_jax.data.video_io import contact_sheet, to_uint8, write_mp4, write_png
from ttt_jax.models.dit_convert import load_dit
from ttt_jax.models.t5_convert import load_t5
from ttt_jax.models.vae import Tiling
from ttt_jax.models.vae_convert import load_converted_vae

# Architecture fields the run config and the checkpoint must agree on.
_MUST_MATCH = ("mixer", "num_layers", "num_heads", "head_dim", "in_channels", "text_embed_dim")


class Sampler:
  """Models loaded once; `generate` is compiled once per segment count."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint: str):
    for key, path in (("text.checkpoint", config.text.checkpoint),
                      ("text.tokenizer", config.text.tokenizer),
                      ("vae.checkpoint", config.vae.checkpoint)):
      if not path:
        raise ValueError(f"config.{key} is empty: sampling needs a converted model there")
    self.config = config
    self.dit = load_dit(checkpoint, dtype=config.model.dtype)
    mismatch = {k: (getattr(self.dit.config, k), config.model[k]) for k in _MUST_MATCH
                if getattr(self.dit.config, k) != config.model[k]}
    if mismatch:
      raise ValueError(f"checkpoint {checkpoint} does not match config.model "
                       f"(checkpoint, config): {mismatch}")
    self.tokenizer = StoryboardTokenizer(config.text.tokenizer, max_length=config.text.max_length)
    _, self.t5 = load_t5(config.text.checkpoint)
    self.vae_config, self.vae = load_converted_vae(config.vae.checkpoint)
    self.schedule = diffusion.make_schedule(**config.diffusion)
    self._encode_text = nnx.jit(lambda t5, ids: t5(ids))
    self._generate = jax.jit(self._denoise, static_argnums=(0,))

  def encode_text(self, texts: list[str]) -> jax.Array:
    """Per-segment texts -> [1, segments, max_length, d_model]. As CogVideoX, no attention mask:
    the encoder sees the padding too."""
    ids, _ = self.tokenizer.encode(texts)
    return self._encode_text(self.t5, jnp.asarray(ids))[None]

  def latent_shape(self, segments: int) -> tuple[int, ...]:
    c, f = self.config, self.vae_config.spatial_compression
    return (1, 1 + 12 * segments, c.model.in_channels, c.height // f, c.width // f)

  def _denoise(self, num_steps, dit_state, x_T, cond, uncond, rng):
    graphdef = self._graphdef
    s = self.config.sampling

    def denoise_fn(x, t, text):
      # Fresh Variables at this trace level: the DiT's own nnx.scan refuses ones made outside.
      return nnx.merge(graphdef, dit_state, copy=True)(x, text, t)

    return diffusion.sample(
        denoise_fn, x_T, schedule=self.schedule, num_steps=num_steps, sampler=s.sampler, rng=rng,
        guidance_scale=s.guidance_scale, dynamic_cfg=s.dynamic_cfg, cond=cond, uncond=uncond,
        callback=self._on_step)

  def _on_step(self, index):
    if self._progress is not None:
      self._progress.update(1)

  def generate(self, segments: list[Segment], seed: int, progress: bool = True) -> np.ndarray:
    """Denoised latents [1, frames, channels, h, w] (DiT layout, scaled by the VAE factor)."""
    prompts, negatives = segment_prompts(segments)
    cond, uncond = self.encode_text(prompts), self.encode_text(negatives)
    noise_rng, sampler_rng = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(noise_rng, self.latent_shape(len(segments)), jnp.float32)
    self._graphdef, state = nnx.split(self.dit)
    steps = self.config.sampling.num_steps
    self._progress = tqdm.tqdm(total=steps, desc="denoising", disable=not progress)
    try:
      latents = jax.block_until_ready(
          self._generate(steps, state, x_T, cond, uncond, sampler_rng))
    finally:
      self._progress.close()
      self._progress = None
    latents = np.asarray(latents)
    if not np.isfinite(latents).all():
      raise FloatingPointError("sampling produced NaN/inf latents")
    return latents

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """[1, F, C, h, w] latents -> video [1 + 4(F-1), H, W, 3] in [-1, 1]."""
    z = jnp.asarray(latents).transpose(0, 1, 3, 4, 2) / self.vae_config.scaling_factor
    tiling = Tiling.default(self.vae_config) if self.config.vae.tiling else None
    video = self.vae.decode(z, frame_batch_size=self.config.vae.frame_batch_size, tiling=tiling)
    return np.asarray(video[0])


def segment_frame_indices(num_frames: int, segments: int, fps: int) -> list[int]:
  """The middle frame of each 3-second segment (frame 0 is the shared first frame)."""
  per_segment = 3 * fps
  return [min(num_frames - 1, 1 + i * per_segment + per_segment // 2) for i in range(segments)]


def run(config: ml_collections.ConfigDict, checkpoint: str, storyboard: str, out: str,
        seed: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Samples, decodes and writes `out/video.mp4`, `out/contact_sheet.png`, `out/sample.json`."""
  segments = load_storyboard(storyboard)
  seed = config.seed if seed is None else seed
  sampler = Sampler(config, checkpoint)
  video = to_uint8(sampler.decode(sampler.generate(segments, seed, progress)))
  os.makedirs(out, exist_ok=True)
  paths = {"video": os.path.join(out, "video.mp4"),
           "contact_sheet": os.path.join(out, "contact_sheet.png")}
  write_mp4(paths["video"], video, fps=config.fps)
  write_png(paths["contact_sheet"],
            contact_sheet(video, segment_frame_indices(len(video), len(segments), config.fps)))
  info = dict(stage=config.stage, seed=seed, segments=len(segments), frames=len(video),
              height=video.shape[1], width=video.shape[2], fps=config.fps,
              storyboard=os.path.abspath(storyboard), checkpoint=os.path.abspath(checkpoint),
              **paths)
  with open(os.path.join(out, "sample.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  print(json.dumps(run(f.config, f.checkpoint, f.storyboard, f.out, f.seed)))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "DiT checkpoint directory (params/ + config.json)")
  flags.DEFINE_string("storyboard", None, "storyboard JSON file")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_integer("seed", None, "sampling seed (default: config.seed)")
  flags.mark_flags_as_required(["config", "checkpoint", "storyboard", "out"])
  app.run(main)
