"""Generate a multi-segment video from a storyboard in one denoising pass.

  python -m ttt_jax.sample --config=configs/tomjerry_63s.py --checkpoint=DIR \
      --storyboard=FILE.json --out=DIR [--seed=N] [--overwrite] [--verbose]

DIR (checkpoint) holds the DiT as `params/` + `config.json` (`python -m ttt_jax.convert
cogvideox`, or a training run's `model/`; a finished training workdir is accepted for its
`model/`). The text encoder, its tokenizer and the VAE come from `config.text.checkpoint`,
`config.text.tokenizer` and `config.vae.checkpoint`. The whole video — every segment — is
denoised together by one jax.jit-compiled function (as the paper samples), then decoded by the
VAE in frame batches and written as `video.mp4` (config.fps) and `contact_sheet.png` (the middle
frame of each segment), with `sample.json` and a copy of the storyboard.

--out is checked before anything is loaded: an existing non-empty folder is refused unless
--overwrite. The files are written into a sibling `OUT.incomplete-*` folder renamed to OUT at the
end, so a crash leaves the previous result, whole, or nothing. A segment whose text is longer than
config.text.max_length tokens (it is cut, which can drop its <end_scene>), and a storyboard with
more segments than the stage was trained on, are reported as warnings naming the segment.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from ttt_jax import cli, diffusion
from ttt_jax.data import features
from ttt_jax.data.encoders import Encoders, require_paths
from ttt_jax.data.storyboard import Segment, load_storyboard, segment_prompts
from ttt_jax.data.tokenizer import SCENE_END
from ttt_jax.data.video_io import contact_sheet, to_uint8, write_mp4, write_png
from ttt_jax.models.dit_convert import load_dit
from ttt_jax.models.vae import Tiling

# Architecture fields the run config and the checkpoint must agree on.
_MUST_MATCH = ("mixer", "num_layers", "num_heads", "head_dim", "in_channels", "text_embed_dim")


class Sampler:
  """Models loaded once; `generate` is compiled once per segment count."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint: str):
    require_paths(config, "sampling")
    self.config = config
    self.dit = load_dit(resolve_checkpoint(checkpoint), dtype=config.model.dtype)
    mismatch = {k: (getattr(self.dit.config, k), config.model[k]) for k in _MUST_MATCH
                if getattr(self.dit.config, k) != config.model[k]}
    if mismatch:
      raise ValueError(f"checkpoint {checkpoint} does not match config.model "
                       f"(checkpoint, config): {mismatch}")
    self.encoders = Encoders(config, "sampling")
    self.tokenizer, self.vae_config, self.vae = (self.encoders.tokenizer,
                                                 self.encoders.vae_config, self.encoders.vae)
    multiple = self.vae_config.spatial_compression * self.dit.config.patch_size
    if config.height % multiple or config.width % multiple:
      raise ValueError(f"config.height x config.width = {config.height} x {config.width} pixels: "
                       f"each must be a multiple of {multiple} (VAE spatial compression "
                       f"{self.vae_config.spatial_compression} x DiT patch_size "
                       f"{self.dit.config.patch_size})")
    self.schedule = diffusion.make_schedule(**config.diffusion)
    self._generate = jax.jit(self._denoise, static_argnums=(0,))

  def encode_text(self, texts: list[str]) -> jax.Array:
    """Per-segment texts -> [1, segments, max_length, d_model]. As CogVideoX, no attention mask:
    the encoder sees the padding too."""
    ids, _ = self.tokenizer.encode(texts)
    return self.encoders.encode_ids(ids)[None]

  def storyboard_warnings(self, segments: list[Segment]) -> list[str]:
    """One line per problem that does not stop sampling: text cut to config.text.max_length
    tokens, more segments than the stage was trained on."""
    warnings = []
    prompts, _ = segment_prompts(segments)
    room = self.config.text.max_length - 1  # EOS takes the last position
    for i, prompt in enumerate(prompts):
      n = len(self.tokenizer.tokenize(prompt))
      if n > room:
        warnings.append(f"storyboard segment {i}: its text is {n} tokens with scene tokens, "
                        f"config.text.max_length {self.config.text.max_length} keeps {room} "
                        f"(+ EOS): the last {n - room} are cut"
                        + (", <end_scene> among them" if prompt.endswith(SCENE_END) else ""))
    if len(segments) > self.config.segments:
      warnings.append(f"storyboard has {len(segments)} segments; stage {self.config.stage} was "
                      f"trained on {self.config.segments}: segments from {self.config.segments} "
                      "on go past the trained context")
    return warnings

  def latent_shape(self, segments: int) -> tuple[int, ...]:
    c, f = self.config, self.vae_config.spatial_compression
    frames = features.latent_frames(segments, c.fps, self.vae_config.temporal_compression_ratio)
    return (1, frames, c.model.in_channels, c.height // f, c.width // f)

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


def resolve_checkpoint(checkpoint: str) -> str:
  """The DiT directory (params/ + config.json) of `checkpoint`, which may also be a training
  workdir (its model/)."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
  if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a training workdir
    model = os.path.join(checkpoint, "model")
    if not os.path.isdir(model):
      raise ValueError(f"--checkpoint {checkpoint} is a training workdir without model/ (the "
                       "run has not finished); finish it, or pass a converted model folder")
    return model
  if not os.path.isdir(os.path.join(checkpoint, "params")):
    raise ValueError(f"--checkpoint {checkpoint}: expected a model folder with params/ and "
                     "config.json (python -m ttt_jax.convert, or a training workdir's model/)")
  return checkpoint


def run(config: ml_collections.ConfigDict, checkpoint: str, storyboard: str, out: str,
        seed: int | None = None, progress: bool = True, overwrite: bool = False
        ) -> dict[str, Any]:
  """Samples, decodes and writes `out/{video.mp4, contact_sheet.png, sample.json,
  storyboard.json}`, atomically (module docstring). `out` must not be a non-empty folder unless
  `overwrite`; it is checked before any model is loaded."""
  out = cli.check_output_dir(out, "--out", overwrite=overwrite)
  segments = load_storyboard(storyboard)
  checkpoint = resolve_checkpoint(checkpoint)
  seed = config.seed if seed is None else seed
  sampler = Sampler(config, checkpoint)
  warnings = sampler.storyboard_warnings(segments)
  for warning in warnings:
    logging.warning("%s", warning)
  video = to_uint8(sampler.decode(sampler.generate(segments, seed, progress)))
  names = {"video": "video.mp4", "contact_sheet": "contact_sheet.png",
           "storyboard": "storyboard.json"}
  info = dict(stage=config.stage, seed=seed, segments=len(segments), frames=len(video),
              height=video.shape[1], width=video.shape[2], fps=config.fps,
              storyboard_source=os.path.abspath(storyboard),
              checkpoint=os.path.abspath(checkpoint), warnings=warnings,
              **{k: os.path.join(out, name) for k, name in names.items()})
  with cli.atomic_output_dir(out, overwrite=overwrite) as tmp:
    write_mp4(os.path.join(tmp, names["video"]), video, fps=config.fps)
    write_png(os.path.join(tmp, names["contact_sheet"]),
              contact_sheet(video, segment_frame_indices(len(video), len(segments), config.fps)))
    shutil.copyfile(storyboard, os.path.join(tmp, names["storyboard"]))
    with open(os.path.join(tmp, "sample.json"), "w") as f:
      json.dump(info, f, indent=2)
  return info


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  print(json.dumps(run(f.config, f.checkpoint, f.storyboard, f.out, f.seed,
                       overwrite=f.overwrite)))


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "DiT checkpoint directory (params/ + config.json)")
  flags.DEFINE_string("storyboard", None, "storyboard JSON file")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_integer("seed", None, "sampling seed (default: config.seed)")
  flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --out")
  flags.mark_flags_as_required(["config", "checkpoint", "storyboard", "out"])
  cli.run_absl(main)
