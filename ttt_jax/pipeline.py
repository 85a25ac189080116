"""The toy main job (configs/toy.py): data -> text encoder and autoencoder -> precompute -> five
training stages with hand-off -> a one-minute sample -> metrics. Run through
`python -m ttt_jax.train --config=configs/toy.py --workdir=DIR`.

What is trained, and what is not:
  * the tokenizer: a sentencepiece model trained on the training stories' texts;
  * the text encoder: NOT trained. A T5 v1.1 encoder with random weights, frozen, as the paper
    freezes its T5. A random transformer is a fixed featuriser that keeps different token
    sequences apart, and the DiT's text projection (trained in stage 1) learns to read it;
    training a text encoder would need an objective of its own (captioning or contrastive), a
    project beyond a toy;
  * the autoencoder: a linear patch autoencoder fitted by PCA (closed form) to training frames,
    not the CogVideoX VAE (ttt_jax/models/pixel_vae.py has the measurements behind that choice);
  * the DiT: trained, five stages, 3 -> 9 -> 18 -> 30 -> 63 s, each from the previous one's
    parameters (the paper's recipe; configs/toy.py).

Everything lands under DIR: data/ (toy_toons), text/ (spiece.model, t5/), vae/, latents/<stage>/,
stages/<stage>/ (train.py workdirs), sample/ (video.mp4, contact_sheet.png, storyboard.json),
summary.json. Each piece is skipped when already complete, so a rerun resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from configs.tomjerry_common import STAGES


def _stage_configs(config: ml_collections.ConfigDict) -> list[tuple[int, Any]]:
  return [(s, config.stages[f"s{s}"]) for s in STAGES]


def _log(message: str) -> None:
  logging.info(message)
  print(f"[toy] {message}", flush=True)


def build_datasets(config, workdir: str) -> dict[int, Any]:
  from ttt_jax.data.builders import toy_toons as builder  # pylint: disable=g-import-not-at-top
  out = {}
  for seconds, _ in _stage_configs(config):
    out[seconds] = builder.build(
        os.path.join(workdir, "data"), segments=seconds // 3,
        num_train=config.toy.num_train[f"s{seconds}"], num_test=config.toy.num_test, height=config.height,
        width=config.width, fps=config.fps, seed=config.toy.dataset_seed)
  return out


def _stories(dataset, split: str):
  from ttt_jax.data import toy_toons  # pylint: disable=g-import-not-at-top
  source = dataset.as_data_source()[split]
  return [toy_toons.Story.from_json(source[i]["story"]) for i in range(len(source))]


def build_text_encoder(config, workdir: str, datasets) -> tuple[str, str]:
  """(tokenizer path, T5 directory); trained tokenizer, frozen random T5."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from ttt_jax.data import toy_toons  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.tokenizer import StoryboardTokenizer, segment_text  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.t5 import T5Config, T5Encoder  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.t5_convert import save_t5  # pylint: disable=g-import-not-at-top

  text_dir = os.path.join(workdir, "text")
  spm, t5_dir = os.path.join(text_dir, "spiece.model"), os.path.join(text_dir, "t5")
  if os.path.exists(os.path.join(t5_dir, "config.json")):
    return spm, t5_dir
  os.makedirs(text_dir, exist_ok=True)
  corpus = [t for ds in datasets.values() for story in _stories(ds, "train")
            for t in toy_toons.story_texts(story)]
  # Word pieces: the toy vocabulary is a few dozen words, and a sub-word model of that corpus
  # splits the first segment's facts into so many pieces that max_length would cut them off.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=os.path.join(text_dir, "spiece"),
      vocab_size=1000, hard_vocab_limit=False, model_type="word", pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, minloglevel=2)
  tokenizer = StoryboardTokenizer(spm, max_length=config.text.max_length)
  longest = max(len(tokenizer.tokenize(segment_text(t, True, True))) + 1 for t in corpus)
  if longest > config.text.max_length:
    raise ValueError(f"toy texts need {longest} tokens with scene tokens and EOS; "
                     f"config.text.max_length={config.text.max_length} would truncate them")
  t5_config = T5Config(vocab_size=tokenizer.vocab_size, d_model=config.text.d_model,
                       d_kv=config.text.d_kv, d_ff=config.text.d_ff,
                       num_layers=config.text.num_layers, num_heads=config.text.num_heads,
                       relative_attention_num_buckets=8, relative_attention_max_distance=32)
  save_t5(t5_dir, t5_config, T5Encoder(t5_config, rngs=nnx.Rngs(config.seed)))
  return spm, t5_dir


def build_autoencoder(config, workdir: str, datasets) -> str:
  """Fits the linear patch autoencoder (PCA) to training frames of the 3 s stage."""
  from ttt_jax.models import pixel_vae  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.vae_convert import save_pixel_vae  # pylint: disable=g-import-not-at-top
  vae_dir = os.path.join(workdir, "vae")
  if os.path.exists(os.path.join(vae_dir, "config.json")):
    return vae_dir
  if config.vae.kind != pixel_vae.KIND:
    raise ValueError(f"config.vae.kind={config.vae.kind!r}: the toy pipeline has only 'pixel'")
  source = datasets[3].as_data_source()["train"]
  frames = np.concatenate([source[i]["video"][::6] for i in range(len(source))])
  frames = frames.astype(np.float32) / 127.5 - 1.0
  mean, basis = pixel_vae.fit_linear(frames, config.vae.patch, config.vae.latent_channels)
  vae_config = pixel_vae.PixelVAEConfig(patch=config.vae.patch, mean=tuple(mean.tolist()),
                                        basis=tuple(map(tuple, basis.tolist())))
  latents, _ = pixel_vae.PixelVAE(vae_config).encode(frames[None, :1 + 4 * ((len(frames) - 1)
                                                                           // 4)])
  std = float(np.std(np.asarray(latents)))
  save_pixel_vae(vae_dir, dataclasses.replace(vae_config, scaling_factor=1.0 / max(std, 1e-3)))
  return vae_dir


def _with_models(stage, spm: str, t5_dir: str, vae_dir: str):
  stage = ml_collections.ConfigDict(stage.to_dict())
  stage.text.tokenizer, stage.text.checkpoint, stage.vae.checkpoint = spm, t5_dir, vae_dir
  return stage


def _read_losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["loss"] for l in f if l.strip()]


def _summarise_losses(losses: list[float]) -> dict[str, float]:
  k = min(max(5, len(losses) // 10), max(1, len(losses) // 2))
  return {"steps": len(losses), "first_loss": float(np.mean(losses[:k])),
          "last_loss": float(np.mean(losses[-k:]))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the toy pipeline; returns and writes DIR/summary.json."""
  from ttt_jax import sample, train  # pylint: disable=g-import-not-at-top
  from ttt_jax.data import toy_toons  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.precompute import precompute  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.video_io import read_mp4  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _log("building toy_toons for the five stages")
  datasets = build_datasets(config, workdir)
  spm, t5_dir = build_text_encoder(config, workdir, datasets)
  vae_dir = build_autoencoder(config, workdir, datasets)

  summary: dict[str, Any] = {"workdir": workdir, "stages": {}}
  previous = ""
  for seconds, stage in _stage_configs(config):
    stage = _with_models(stage, spm, t5_dir, vae_dir)
    latents = os.path.join(workdir, "latents", stage.stage)
    if not os.path.exists(os.path.join(latents, "precompute.json")):
      _log(f"{stage.stage}: encoding {datasets[seconds].info.splits['train'].num_examples} "
           "training videos and their texts")
      precompute(stage, datasets[seconds].data_path, latents, "train")
    stage.data.latents = latents
    stage.init_from = previous
    _log(f"{stage.stage}: training {stage.train.steps} steps"
         + (f", from {os.path.basename(previous)}" if previous else ""))
    out = train.train(stage, os.path.join(workdir, "stages", stage.stage),
                      mesh=_mesh(stage))
    summary["stages"][stage.stage] = {**_summarise_losses(_read_losses(out["workdir"])),
                                      "initialised_fresh": len(out["initialised_fresh"])}
    _log(f"{stage.stage}: loss {summary['stages'][stage.stage]['first_loss']:.4f} -> "
         f"{summary['stages'][stage.stage]['last_loss']:.4f}")
    previous = out["workdir"]

  # One minute from a held-out storyboard (the 63 s test split was never trained on).
  seconds, stage = _stage_configs(config)[-1]
  stage = _with_models(stage, spm, t5_dir, vae_dir)
  story = _stories(datasets[seconds], "test")[config.toy.sample_story]
  sample_dir = os.path.join(workdir, "sample")
  os.makedirs(sample_dir, exist_ok=True)
  storyboard = os.path.join(sample_dir, "storyboard.json")
  with open(storyboard, "w") as f:
    json.dump(toy_toons.story_to_storyboard(story), f, indent=2)
  _log(f"sampling {story.segments} segments ({story.segments * 3} s) from {storyboard}")
  info = sample.run(stage, os.path.join(previous, "model"), storyboard, sample_dir,
                    progress=False)
  video, _ = read_mp4(info["video"])
  truth = toy_toons.render(story)
  summary["sample"] = {
      **{k: info[k] for k in ("video", "contact_sheet", "frames", "segments")},
      "persistence": _metric(toy_toons.persistence_score(video, story)),
      "text_following": toy_toons.text_following_score(video, story)["mean"],
      # The same metrics on the held-out story's own rendering: what a perfect model scores.
      "reference": {"persistence": _metric(toy_toons.persistence_score(truth, story)),
                    "text_following": toy_toons.text_following_score(truth, story)["mean"]},
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _log(f"persistence {summary['sample']['persistence']['overall']:.3f} (reference "
       f"{summary['sample']['reference']['persistence']['overall']:.3f}), text-following "
       f"{summary['sample']['text_following']:.3f}; video: {info['video']}")
  return summary


def _metric(score: dict) -> dict[str, float]:
  return {k: float(score[k]) for k in ("overall", "room_later", "color_later", "shape_later")}


def _mesh(stage):
  from ttt_jax import train  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  # The batch must split evenly over the data axes; small toy batches run on one device.
  return train.mesh_from_config(
      stage, devices[:1] if stage.train.batch_size % len(devices) else devices)
