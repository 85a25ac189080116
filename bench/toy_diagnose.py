"""Why the toy does or does not learn: stage-1 runs, an overfit check, and the x0 error.

  python bench/toy_diagnose.py stage1 --workdir=/tmp/d/base [--set train.steps=800 ...] [--images]
  python bench/toy_diagnose.py overfit --workdir=/tmp/d/overfit [--set train.steps=600]
  python bench/toy_diagnose.py x0 --workdir=/tmp/d/base
  python bench/toy_diagnose.py guidance --workdir=runs/toy [--scales 1 3]
  python bench/toy_diagnose.py memory --workdir=runs/toy
  python bench/toy_diagnose.py stage2 --workdir=/tmp/d/s2 --from_run=runs/toy [--fresh_mixer]
  python bench/toy_diagnose.py decoder --workdir=runs/toy [--eval 6] [--decoder_steps 1500]
  python bench/toy_diagnose.py facts --workdir=runs/toy [--stage toy_9s]
  python bench/toy_diagnose.py keyframes --workdir=runs/toy [--ratios 4 8 16] [--eval 8]

stage1: configs/toy.py:images=false's 3 s stage alone (data, tokenizer, text encoder, autoencoder,
precompute, training; `--images`: configs/toy.py's image and 3 s stages, the job's), with
`--set key=value` overrides of the 3 s stage config, `--image_set` of the image stage's and
`--top key=value` of the job's (e.g. `--top vae.normalize='global'`); then samples `--eval`
held-out 3 s storyboards and scores each: persistence's room/colour/shape (segment 1: its text
states the facts), text following, toy_metrics.frame_statistics (flatness, stability) and PSNR
against the rendering.
overfit: the same with ONE training story and batch 1, sampled from that story's own storyboard:
a model and conditioning that work reproduce it (PSNR well above the held-out stories'); one that
does not points at the model, not at the amount of training.
x0: after a stage1 or overfit run (or on a toy job's workdir: its stage 1), noises a training latent to t = 200, 500, 900, takes one model
prediction and reports the x0 MSE per channel, with the text and with the null text, beside the
best guess that ignores the model (sqrt(a_t) x_t, the posterior mean for unit-variance latents),
and the training loss (snr+1-weighted) at t = 0 ... 999.
guidance: samples a toy job's held-out 63 s storyboard from its last stage at each guidance scale
and scores it (persistence, text following, frame statistics), beside the rendering's scores.
memory: how much of what segment 1's text says reaches later segments, for each stage of a toy
job and for a fresh model: the mean change of the model's output on segment k's own frames when
only segment 1's text changes (two held-out first-segment texts; a 3-segment video of noise at
t = 900, where the stated facts must come from the text), relative to the change on segment 1,
and the mixer gates tanh(alpha), tanh(beta) (video and text rows). Local attention cannot carry
text 1 past segment 2 in a two-block model, so segment 3's number is the mixer's memory path.
stage2: configs/toy.py's 9 s stage alone (the first stage that can learn memory), from a toy
job's trained 3 s stage (`--from_run`; its text encoder and autoencoder are reused), on
`--stories` training stories, with `--set` overrides; `--fresh_mixer` drops the mixer and gates
from the 3 s parameters so that they start fresh, as the paper's start on a pretrained backbone.
`--init_from=STAGE_DIR` starts from that trained stage instead (e.g. a previous stage2 run's
train/, to run a second phase). Samples `--eval` held-out 9 s storyboards and reports room /
colour / shape / text following per segment (segments 2 and 3: what memory must carry), the loss
curve, and the memory gap: on 12 held-out 9 s stories, the v-loss on segments 2-3's own frames
when segment 1's text is another story's minus when it is the story's own, at t = 990 ... 800
(0 when nothing crosses from segment 1; "seg1" is the same on segment 1, what knowing the facts
is worth there).
decoder: is the linear decoder what loses the characters? Trains a convolutional decoder on the
run's autoencoder latents of 96 training stories (the two keyframes around a frame and its phase
between them -> the frame, a correction added to the linear decode; latents noised by sigma ~
U(0, --decoder_sigma) in whitened units, L1 loss), then decodes the same sampled latents of
`--eval` held-out 63 s storyboards (the run's last stage, its sampling config and seed) both
ways, and the stories' own latents both ways, and scores all four.

keyframes: the ceiling the autoencoder's keyframe spacing sets. The run's fitted autoencoder, with
its keyframes every `--ratios` frames, encodes and decodes `--eval` 63 s stories (seeds 10000 +
k), and each round trip is scored as a generated minute would be: persistence, text following,
flatness, stability (means over the stories).

facts: which of segment 1's facts the memory path carries. On 8 held-out 9 s stories, at t = 999
(pure noise: a later segment's facts can only come from segment 1's text), the model's x0
prediction is decoded twice, with segment 1's text stating one fact two ways (the floor black or
brown, the wall blue or gray, the first character's colour its own or an unused one), and the
difference of the two decodes' median colour over the fact's pixels (the floor band, the top
rows, the character's box at its stated start), projected on the difference of the two palette
colours, is reported per segment: 1 when the fact is fully drawn as stated, 0 when nothing of
it reaches that segment.

One JSON object on stdout. Runs on a CPU: the default stage1 run takes a few minutes.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import toy
from ttt_jax import sample, toy_job, training
from ttt_jax.data import toy_metrics, toy_toons
from ttt_jax.data.builders import toy_toons as builder
from ttt_jax.data.precompute import precompute
from ttt_jax.data.video_io import read_mp4


def _set(config, assignment: str) -> None:
  key, value = assignment.split("=", 1)
  *path, last = key.split(".")
  for part in path:
    config = config[part]
  config[last] = ast.literal_eval(value)


def _psnr(video: np.ndarray, truth: np.ndarray) -> float:
  mse = np.mean((video.astype(np.float64) - truth.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def _train_with_curve(stage, workdir: str, points: int) -> tuple[dict, list[float], list[float]]:
  """Trains `stage` in WORKDIR/train; (train's result, the losses, their means in `points` parts)."""
  out = training.train(stage, os.path.join(workdir, "train"), mesh=toy_job._mesh(stage))  # pylint: disable=protected-access
  losses = toy_job._read_losses(out["workdir"])  # pylint: disable=protected-access
  k = max(1, len(losses) // points)
  return out, losses, [round(float(np.mean(losses[i:i + k])), 4) for i in range(0, len(losses), k)]


def stage1(args, overfit: bool) -> dict:
  config = toy.get_config("images" if args.images else "images=false")
  for item in args.top:
    _set(config, item)
  stage = config.stages.s3
  if overfit:
    stage.train.update(dict(batch_size=1, steps=600, warmup_steps=20, lr=2e-3, mixer_lr=3e-3))
    stage.train.text_dropout = 0.0
  for item in args.set:
    _set(stage, item)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  train_stories = 1 if overfit else config.toy.num_train.s3
  dataset = builder.build(os.path.join(workdir, "data"), segments=1, num_train=train_stories,
                          num_test=max(args.eval, 1), height=config.height, width=config.width,
                          fps=config.fps, seed=config.toy.dataset_seed)
  datasets = {3: dataset}
  spm, t5_dir = toy_job.build_text_encoder(config, workdir, datasets)
  vae_dir = toy_job.build_autoencoder(config, workdir, datasets)
  stage = toy_job._with_models(stage, spm, t5_dir, vae_dir)  # pylint: disable=protected-access
  latents = os.path.join(workdir, "latents")
  if not os.path.exists(os.path.join(latents, "precompute.json")):
    precompute(stage, dataset.data_path, latents, "train")
  stage.data.latents = latents
  prepared = time.perf_counter()
  image_curve = None
  if args.images and not overfit:  # configs/toy.py's image stage first
    images = toy_job._with_models(config.stages.images, spm, t5_dir, vae_dir)  # pylint: disable=protected-access
    for item in args.image_set:
      _set(images, item)
    images.data.latents = latents
    image_out, _, image_curve = _train_with_curve(images, os.path.join(workdir, "images"), 8)
    stage.init_from = image_out["workdir"]
  imaged = time.perf_counter()
  out, losses, curve = _train_with_curve(stage, workdir, 8)
  trained = time.perf_counter()
  stories = (toy_job._stories(dataset, "train") if overfit  # pylint: disable=protected-access
             else toy_job._stories(dataset, "test")[:args.eval])  # pylint: disable=protected-access
  scores = []
  for i, story in enumerate(stories):
    storyboard = os.path.join(workdir, f"storyboard_{i}.json")
    with open(storyboard, "w") as f:
      json.dump(toy_toons.story_to_storyboard(story), f)
    info = sample.run(stage, os.path.join(out["workdir"], "model"), storyboard,
                      os.path.join(workdir, f"sample_{i}"), progress=False, overwrite=True)
    video, _ = read_mp4(info["video"])
    truth = toy_toons.render(story)
    p = toy_metrics.persistence_score(video, story)
    scores.append(dict(room=p["room"][0], color=p["color"][0], shape=p["shape"][0],
                       text_following=toy_metrics.text_following_score(video, story)["mean"],
                       **toy_metrics.frame_statistics(video), psnr=_psnr(video, truth)))
  mean = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
  return dict(mode="overfit" if overfit else "stage1", workdir=workdir, set=args.set,
              top=args.top, steps=len(losses), loss_curve=curve, mean=mean, per_story=scores,
              image_curve=image_curve, image_s=round(imaged - prepared, 1),
              prepare_s=round(prepared - start, 1), train_s=round(trained - imaged, 1),
              sample_s=round(time.perf_counter() - trained, 1))


def _score_per_segment(stage, model_dir: str, stories, workdir: str) -> dict:
  """Samples each story's storyboard; room/color/shape/text following per segment, averaged."""
  scores = []
  for i, story in enumerate(stories):
    storyboard = os.path.join(workdir, f"storyboard_{i}.json")
    with open(storyboard, "w") as f:
      json.dump(toy_toons.story_to_storyboard(story), f)
    info = sample.run(stage, model_dir, storyboard, os.path.join(workdir, f"sample_{i}"),
                      progress=False, overwrite=True)
    video, _ = read_mp4(info["video"])
    p = toy_metrics.persistence_score(video, story)
    scores.append(dict(room=p["room"], color=p["color"], shape=p["shape"],
                       text_following=toy_metrics.text_following_score(video, story)["per_segment"]))
  return {k: np.round(np.mean([s[k] for s in scores], axis=0), 3).tolist() for k in scores[0]}


def stage2(args) -> dict:
  from ttt_jax import checkpoint
  from ttt_jax.models.dit_convert import is_new_param
  source = os.path.abspath(args.from_run)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  stage = toy.get_config().stages.s9
  for item in args.set:
    _set(stage, item)
  dataset = builder.build(os.path.join(workdir, "data"), segments=3, num_train=args.stories,
                          num_test=args.eval, height=stage.height, width=stage.width,
                          fps=stage.fps, seed=0)
  stage = toy_job._with_models(  # pylint: disable=protected-access
      stage, os.path.join(source, "text", "spiece.model"), os.path.join(source, "text", "t5"),
      os.path.join(source, "vae"))
  latents = os.path.join(workdir, "latents")
  if not os.path.exists(os.path.join(latents, "precompute.json")):
    precompute(stage, dataset.data_path, latents, "train")
  stage.data.latents = latents
  stage.init_from = os.path.abspath(args.init_from or os.path.join(source, "stages", "toy_3s"))
  if args.fresh_mixer:  # the 3 s backbone alone: the hand-off initialises mixer and gates
    backbone = os.path.join(workdir, "backbone")
    if not os.path.isdir(os.path.join(backbone, "params")):
      params = checkpoint.load_params(checkpoint.params_dir(stage.init_from))
      params["blocks"] = {k: v for k, v in params["blocks"].items()
                          if not is_new_param(("blocks", k))}
      checkpoint.save_params(os.path.join(backbone, "params"), params)
    stage.init_from = backbone
  start = time.perf_counter()
  out, losses, curve = _train_with_curve(stage, workdir, 5)
  trained = time.perf_counter()
  per_segment = _score_per_segment(stage, os.path.join(out["workdir"], "model"),
                                   toy_job._stories(dataset, "test"), workdir)  # pylint: disable=protected-access
  return dict(mode="stage2", workdir=workdir, from_run=source, init_from=stage.init_from,
              fresh_mixer=args.fresh_mixer, set=args.set, stories=args.stories,
              steps=len(losses), loss_curve=curve, per_segment=per_segment,
              memory_gap=memory_gap(out["workdir"]), train_s=round(trained - start, 1),
              sample_s=round(time.perf_counter() - trained, 1))


def _encode_story(sampler, first: str, story) -> jax.Array:
  """The story's segment texts with segment 1's replaced by `first`, encoded:
  [1, segments, max_length, d_model]."""
  from ttt_jax.data.storyboard import Segment, segment_prompts  # pylint: disable=g-import-not-at-top
  texts = [first] + toy_toons.story_texts(story)[1:]
  return sampler.encode_text(segment_prompts(
      [Segment(t, s) for t, s in zip(texts, story.scene_start)])[0])


def memory_gap(stage_dir: str, stories: int = 12, timesteps=(990, 950, 900, 800)) -> dict:
  """What segment 1's text is worth to segments 2-3 (module docstring, stage2): per t, the mean
  v-loss with another story's first text minus with the story's own, on segment 1's frames and
  on segments 2-3's, over `stories` held-out 9 s stories x 2 noise draws."""
  import jax
  import jax.numpy as jnp

  from configs import saved
  from ttt_jax import diffusion
  sampler = sample.Sampler(saved.get_config(stage_dir), os.path.join(stage_dir, "model"))
  schedule = diffusion.make_schedule(**sampler.config.diffusion)
  frame_batch = sampler.config.vae.frame_batch_size * sampler.vae_config.temporal_compression_ratio
  dit = jax.jit(lambda x, text, t: sampler.dit(x, text, t))
  # Seeds far from the builder's: never trained on.
  held_out = [toy_toons.generate_story(2 * 10**7 + i, 3) for i in range(stories)]
  gaps = {t: [] for t in timesteps}
  for i, story in enumerate(held_out):
    x = toy_toons.render(story).astype(np.float32) / 127.5 - 1
    mean, _ = sampler.vae.encode(jnp.asarray(x[None]), frame_batch_size=frame_batch)
    x0 = (mean * sampler.vae_config.scaling_factor).transpose(0, 1, 4, 2, 3)
    texts = toy_toons.story_texts(story)
    other = toy_toons.story_texts(held_out[(i + 1) % stories])[0]
    own, swapped = (_encode_story(sampler, first, story) for first in (texts[0], other))
    per = (x0.shape[1] - 1) // 3
    for t in timesteps:
      for draw in range(2):
        noise = jax.random.normal(jax.random.key(100 * i + draw), x0.shape)
        tt = jnp.full((1,), t, jnp.int32)
        x_t, v = diffusion.add_noise(schedule, x0, noise, tt), diffusion.v_target(
            schedule, x0, noise, tt)
        err = [np.asarray(jnp.mean((dit(x_t, text, tt.astype(jnp.float32)) - v) ** 2,
                                   axis=(0, 2, 3, 4))) for text in (swapped, own)]
        gaps[t].append([e[:per].mean() for e in err] + [e[per + 1:].mean() for e in err])
  out = {}
  for t, rows in gaps.items():
    seg1_swapped, seg1_own, later_swapped, later_own = np.mean(rows, axis=0)
    out[str(t)] = dict(later=round(float(later_swapped - later_own), 4),
                       seg1=round(float(seg1_swapped - seg1_own), 4),
                       later_loss=round(float(later_own), 4))
  return out


def x0_error(args) -> dict:
  import jax
  import jax.numpy as jnp

  from ttt_jax import diffusion
  from ttt_jax.data.loader import LatentLoader
  from ttt_jax.models.dit_convert import load_dit
  workdir = os.path.abspath(args.workdir)
  # A stage1/overfit run of this script, or a toy job's workdir (its stage 1).
  latents, run = os.path.join(workdir, "latents"), os.path.join(workdir, "train")
  if os.path.isdir(os.path.join(workdir, "stages")):
    latents, run = os.path.join(latents, "toy_3s"), os.path.join(workdir, "stages", "toy_3s")
  loader = LatentLoader(latents, batch_size=1, seed=0, shuffle=False, prefetch=0)
  batch = loader.batch(0)
  x0, text = jnp.asarray(batch["latents"]), jnp.asarray(batch["text"])
  null = jnp.broadcast_to(jnp.asarray(loader.null_text), text.shape)
  dit = load_dit(os.path.join(run, "model"))
  with open(os.path.join(run, "config.json")) as f:
    schedule = diffusion.make_schedule(**json.load(f)["diffusion"])
  per_channel = lambda e: jnp.mean(e, axis=(0, 1, 3, 4))  # latents [b, F, C, h, w]
  report = {"x0_std_per_channel": np.round(np.asarray(jnp.std(x0, axis=(0, 1, 3, 4))), 3).tolist()}
  # The training loss (v-space MSE, CogVideoX's snr+1 weighting of the x0 error) at the two ends
  # of the zero-terminal-SNR schedule, where the weight runs from 1 (t=999) to ~1/(1-a_0).
  for t in (0, 200, 500, 900, 999):
    tt = jnp.full((x0.shape[0],), t)
    noise = jax.random.normal(jax.random.key(t), x0.shape)
    v = dit(diffusion.add_noise(schedule, x0, noise, tt), text, tt)
    report.setdefault("training_loss_by_t", {})[t] = round(float(
        diffusion.v_prediction_loss(schedule, v, x0, noise, tt)), 4)
  for t in (200, 500, 900):
    tt = jnp.full((x0.shape[0],), t)
    noise = jax.random.normal(jax.random.key(t), x0.shape)
    x_t = diffusion.add_noise(schedule, x0, noise, tt)
    pred = {name: diffusion.x0_from_v(schedule, x_t, dit(x_t, c, tt), tt)
            for name, c in (("text", text), ("null_text", null))}
    a = float(schedule.alphas_cumprod[t])
    shrink = jnp.sqrt(a) * x_t
    err = per_channel((pred["text"] - x0) ** 2)
    report[f"t={t}"] = {
        "alpha_bar": round(a, 4),
        "x0_mse": round(float(err.mean()), 4),
        "x0_mse_null_text": round(float(jnp.mean((pred["null_text"] - x0) ** 2)), 4),
        "x0_mse_sqrt_a_x_t": round(float(jnp.mean((shrink - x0) ** 2)), 4),
        "x0_mse_per_channel": np.round(np.asarray(err), 3).tolist()}
  return report


def guidance(args) -> dict:
  """Samples a toy job's held-out storyboard from its last stage at each --scales guidance."""
  from configs import saved
  workdir = os.path.abspath(args.workdir)
  stage_dir = sorted(os.listdir(os.path.join(workdir, "stages")),
                     key=lambda s: int(s.split("_")[1][:-1]))[-1]
  stage_dir = os.path.join(workdir, "stages", stage_dir)
  storyboard = os.path.join(workdir, "storyboard.json")
  with open(os.path.join(workdir, "summary.json")) as f:
    reference = json.load(f)["sample"]["reference"]
  job = toy.get_config()
  story = toy_job.held_out_story(job, toy_job.build_datasets(job, workdir))  # found built
  out = {"reference": reference}
  for scale in args.scales:
    config = saved.get_config(stage_dir)
    config.sampling.guidance_scale = scale
    info = sample.run(config, os.path.join(stage_dir, "model"), storyboard,
                      os.path.join(workdir, "diagnose", f"guidance_{scale:g}"), progress=False,
                      overwrite=True)
    video, _ = read_mp4(info["video"])
    out[f"guidance_{scale:g}"] = dict(
        persistence=toy_metrics.persistence_score(video, story)["overall"],
        text_following=toy_metrics.text_following_score(video, story)["mean"],
        **toy_metrics.frame_statistics(video))
  return out


def memory(args) -> dict:
  """Segment-1 text -> segment-k output change, per stage and fresh (module docstring)."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from configs import saved
  from ttt_jax.data.storyboard import Segment, segment_prompts
  from ttt_jax.models.dit import DiT
  workdir = os.path.abspath(args.workdir)
  job = toy.get_config()
  stories = toy_job._stories(toy_job.build_datasets(job, workdir)[9], "test")  # pylint: disable=protected-access
  texts = [toy_toons.story_texts(s) for s in stories[:2]]
  stage_dirs = sorted(os.listdir(os.path.join(workdir, "stages")),
                      key=lambda s: int(s.split("_")[1][:-1]))
  out = {}
  for name in ["fresh"] + stage_dirs:
    stage_dir = os.path.join(workdir, "stages", stage_dirs[0] if name == "fresh" else name)
    sampler = sample.Sampler(saved.get_config(stage_dir), os.path.join(stage_dir, "model"))
    dit = sampler.dit
    if name == "fresh":
      dit = DiT(dataclasses.replace(dit.config), rngs=nnx.Rngs(job.seed))
    def encode(first):
      segments = [Segment(t, i == 0) for i, t in enumerate([first] + texts[0][1:3])]
      return sampler.encode_text(segment_prompts(segments)[0])
    x = jax.random.normal(jax.random.key(0), sampler.latent_shape(3))
    t = jnp.full((1,), 900.0)
    change = np.asarray(jnp.abs(dit(x, encode(texts[0][0]), t) - dit(x, encode(texts[1][0]), t)))
    change = change.mean(axis=(0, 2, 3, 4))  # per latent frame
    per = (len(change) - 1) // 3  # segment k spans frames k*per .. (k+1)*per
    own = [change[:per], change[per + 1:2 * per], change[2 * per + 1:]]  # overlaps left out
    first = float(own[0].mean())
    blocks = nnx.state(dit, nnx.Param).to_pure_dict()["blocks"]
    gates = {g: np.round(np.abs(np.tanh(np.asarray(blocks[g]))).mean(-1), 4).tolist()
             for g in ("alpha", "beta") if g in blocks}
    out[name] = dict(segment_1_change=round(first, 5),
                     relative_change=[round(float(o.mean()) / first, 6) for o in own[1:]],
                     gates_layer_by_video_text=gates)
  return out


def facts(args) -> dict:
  """Share of a segment-1 fact's colour change that reaches each segment (module docstring)."""
  import jax
  import jax.numpy as jnp

  from configs import saved
  from ttt_jax import diffusion
  workdir = os.path.abspath(args.workdir)
  names = ([args.stage] if args.stage else
           sorted((n for n in os.listdir(os.path.join(workdir, "stages")) if n != "toy_3s"),
                  key=lambda s: int(s.split("_")[1][:-1])))
  out = {}
  for name in names:
    stage_dir = os.path.join(workdir, "stages", name)
    sampler = sample.Sampler(saved.get_config(stage_dir), os.path.join(stage_dir, "model"))
    schedule = diffusion.make_schedule(**sampler.config.diffusion)
    dit = jax.jit(lambda x, text, t: sampler.dit(x, text, t))
    t = jnp.full((1,), 999, jnp.int32)
    per_fact = {"floor": [], "wall": [], "character": []}
    for i in range(8):
      story = toy_toons.generate_story(2 * 10**7 + i, 3, sampler.config.fps,
                                       sampler.config.height, sampler.config.width)
      texts = toy_toons.story_texts(story)
      g = toy_toons.geometry(story.height, story.width)
      first = story.characters[0]
      unused = next(c for c in toy_toons.CHARACTER_COLORS
                    if c not in {ch.color for ch in story.characters})
      # fact: (palette, the story's value, the two values stated, the text's word pattern,
      # segment k -> (pixel rows, columns))
      swaps = {
          "floor": (toy_toons.FLOOR_COLORS, story.floor, ("black", "brown"), "{} floor",
                    lambda k: (slice(story.height - g.floor // 2, None), slice(None))),
          "wall": (toy_toons.ROOM_COLORS, story.room, ("blue", "gray"), "{} room",
                   lambda k: (slice(0, g.floor), slice(None))),
          # The character's box at its stated start of segment k, inset from the edges.
          "character": (toy_toons.CHARACTER_COLORS, first.color, (first.color, unused),
                        f"{first.name} is a {{}}",
                        lambda k: (slice(story.starts[k][0][1] + 2,
                                         story.starts[k][0][1] + g.sprite - 2),
                                   slice(story.starts[k][0][0] + 2,
                                         story.starts[k][0][0] + g.sprite - 2)))}
      noise = jax.random.normal(jax.random.key(i), sampler.latent_shape(story.segments))
      per = toy_toons.frames_per_segment(story.fps)
      for fact, (palette, stated, values, pattern, region) in swaps.items():
        decoded = []
        for value in values:
          text = texts[0].replace(pattern.format(stated), pattern.format(value))
          if value != stated and text == texts[0]:
            raise ValueError(f"story {i}: {pattern.format(stated)!r} not in {texts[0]!r}")
          emb = _encode_story(sampler, text, story)
          x0 = diffusion.x0_from_v(schedule, noise, dit(noise, emb, t.astype(jnp.float32)), t)
          decoded.append((sampler.decode(np.asarray(x0)) + 1) * 127.5)
        direction = np.subtract(palette[values[1]], palette[values[0]], dtype=np.float64)
        shares = []
        for k in range(story.segments):
          frames = slice(1 + k * per, 1 + (k + 1) * per)
          if fact == "character":  # it moves: the first quarter of the segment, near its start
            frames = slice(1 + k * per, 1 + k * per + per // 4)
          rows, cols = region(k)
          medians = [np.median(d[frames, rows, cols].reshape(-1, 3), 0) for d in decoded]
          shares.append(float((medians[1] - medians[0]) @ direction / (direction @ direction)))
        per_fact[fact].append(shares)
    out[name] = {fact: np.round(np.mean(v, 0), 3).tolist() for fact, v in per_fact.items()}
  return out


def _conv(x, w, b):
  import jax
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def _decoder_init(key, channels: int, width: int = 96, hi: int = 24, patch: int = 4) -> dict:
  import jax
  ks = jax.random.split(key, 6)
  he = lambda k, side, i, o, s=1.0: (s * jax.random.normal(k, (side, side, i, o))
                                     * (2 / (side * side * i)) ** 0.5, np.zeros(o, np.float32))
  return {"c1": he(ks[0], 3, 2 * channels + 1, width), "c2": he(ks[1], 3, width, width),
          "c3": he(ks[2], 3, width, width), "up": he(ks[3], 1, width, patch * patch * hi),
          "h1": he(ks[4], 3, hi, hi), "h2": he(ks[5], 3, hi, 3, 0.1)}


def _decoder_apply(params, before, after, phase, linear):
  """before, after [B, h, w, C]: the keyframe latents around each frame; phase [B] in [0, 1];
  linear [B, H, W, 3]: their linear decode, blended -> frames [B, H, W, 3]."""
  import jax
  import jax.numpy as jnp

  from ttt_jax.models.pixel_vae import from_blocks
  b, h, w, _ = before.shape
  x = jnp.concatenate([before, after, jnp.broadcast_to(phase[:, None, None, None], (b, h, w, 1))],
                      -1)
  x = jax.nn.gelu(_conv(x, *params["c1"]))
  x = x + jax.nn.gelu(_conv(x, *params["c2"]))
  x = x + jax.nn.gelu(_conv(x, *params["c3"]))
  x = _conv(x, *params["up"])
  x = jax.nn.gelu(_conv(from_blocks(x, 4, x.shape[-1] // 16), *params["h1"]))
  return linear + _conv(x, *params["h2"])


def _keyframe_pairs(latents: np.ndarray, ratio: int = 4):
  """[F, h, w, C] keyframe latents -> (before, after, phase) of each of the 1 + ratio (F - 1)
  frames, as PixelVAE.decode blends them."""
  frames = len(latents)
  before = [0] + [k for k in range(frames - 1) for _ in range(ratio)]
  after = [0] + [k + 1 for k in range(frames - 1) for _ in range(ratio)]
  phase = [0.0] + [j / ratio for _ in range(frames - 1) for j in range(1, ratio + 1)]
  return latents[before], latents[after], np.array(phase, np.float32)


def decoder(args) -> dict:
  """A trained conv decoder against the linear one, on sampled and on true latents."""
  import jax
  import jax.numpy as jnp
  import optax

  from configs import saved
  from ttt_jax import evaluate
  from ttt_jax.data.storyboard import parse_storyboard
  from ttt_jax.data.video_io import to_uint8
  from ttt_jax.models import pixel_vae
  workdir = os.path.abspath(args.workdir)
  with open(os.path.join(workdir, "vae", "config.json")) as f:
    vae = pixel_vae.PixelVAE(pixel_vae.PixelVAEConfig.from_dict(json.load(f)))

  def blend(before, after, phase):
    keys = [vae.decode(z[:, None])[:, 0] for z in (before, after)]
    return keys[0] * (1 - phase[:, None, None, None]) + keys[1] * phase[:, None, None, None]

  videos = np.stack([toy_toons.render(toy_toons.generate_story(
      builder.story_seed(0, "train", i), 3)) for i in range(96)]).astype(np.float32) / 127.5 - 1
  pairs = [_keyframe_pairs(z) for z in np.asarray(vae.encode(jnp.asarray(videos))[0])]
  before, after, phase = (np.concatenate(p) for p in zip(*pairs))
  target = videos.reshape(-1, *videos.shape[2:])
  params = _decoder_init(jax.random.key(0), before.shape[-1])
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, args.decoder_steps))

  @jax.jit
  def step(params, opt_state, before, after, phase, target, key):
    k1, k2, k3 = jax.random.split(key, 3)
    sigma = args.decoder_sigma * jax.random.uniform(k1, (len(before), 1, 1, 1))
    before = before + sigma * jax.random.normal(k2, before.shape)
    after = after + sigma * jax.random.normal(k3, after.shape)
    linear = blend(before, after, phase)
    loss = lambda p: jnp.mean(jnp.abs(_decoder_apply(p, before, after, phase, linear) - target))
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  rng, key, start = np.random.default_rng(0), jax.random.key(1), time.perf_counter()
  opt_state, losses = opt.init(params), []
  for _ in range(args.decoder_steps):
    i = rng.integers(0, len(target), 32)
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, before[i], after[i], phase[i], target[i],
                                   sub)
    losses.append(float(loss))
  trained = time.perf_counter() - start
  apply = jax.jit(functools.partial(_decoder_apply, params))

  def conv_decode(latents):  # [F, h, w, C] -> uint8 video
    b, a, p = (jnp.asarray(x) for x in _keyframe_pairs(latents))
    return to_uint8(np.clip(np.concatenate([
        np.asarray(apply(b[i:i + 128], a[i:i + 128], p[i:i + 128], blend(
            b[i:i + 128], a[i:i + 128], p[i:i + 128]))) for i in range(0, len(b), 128)]), -1, 1))

  def scores(video, story):
    p = toy_metrics.persistence_score(video, story)
    return dict(persistence=p["overall"], room=p["room_later"], colours=p["color_later"],
                shapes=p["shape_later"], segment_1_colours=p["color"][0],
                text_following=toy_metrics.text_following_score(video, story)["mean"],
                **toy_metrics.frame_statistics(video))

  stage_dir = evaluate.last_stage(workdir)
  config = saved.get_config(stage_dir)
  sampler = sample.Sampler(config, os.path.join(stage_dir, "model"))
  rows = {k: [] for k in ("sampled_linear", "sampled_conv", "story_linear", "story_conv")}
  for name, story in evaluate.held_out_stories(workdir, config, args.eval):
    sampled = sampler.generate(parse_storyboard(toy_toons.story_to_storyboard(story), name),
                               config.seed, progress=False)[0].transpose(0, 2, 3, 1)
    rendered = toy_toons.render(story).astype(np.float32)[None] / 127.5 - 1
    true = np.asarray(vae.encode(jnp.asarray(rendered))[0][0])
    for source, latents in (("sampled", sampled), ("story", true)):
      rows[f"{source}_linear"].append(scores(to_uint8(np.asarray(
          vae.decode(jnp.asarray(latents)[None])[0])), story))
      rows[f"{source}_conv"].append(scores(conv_decode(latents), story))
  k = len(losses) // 8
  return dict(decoder_seconds=round(trained, 1), decoder_steps=args.decoder_steps,
              decoder_sigma=args.decoder_sigma,
              decoder_loss=[round(float(np.mean(losses[i:i + k])), 4)
                            for i in range(0, len(losses), k)],
              storyboards=args.eval,
              **{name: {m: round(float(np.mean([r[m] for r in rs])), 4) for m in rs[0]}
                 for name, rs in rows.items()})


def keyframes(args) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  from ttt_jax.models import pixel_vae  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.vae_convert import load_converted_vae  # pylint: disable=g-import-not-at-top
  _, fitted = load_converted_vae(os.path.join(args.workdir, "vae"))
  stories = [toy_toons.generate_story(10_000 + k, segments=21) for k in range(args.eval)]
  rows = {}
  for ratio in args.ratios:
    vae = pixel_vae.PixelVAE(dataclasses.replace(fitted.config,
                                                 temporal_compression_ratio=int(ratio)))
    scores = []
    for story in stories:
      video = toy_job.round_trip(vae, toy_toons.render(story))
      scores.append(dict(persistence=toy_metrics.persistence_score(video, story)["overall"],
                         text_following=toy_metrics.text_following_score(video, story)["mean"],
                         **toy_metrics.frame_statistics(video)))
    rows[str(int(ratio))] = {m: round(float(np.mean([s[m] for s in scores])), 4)
                             for m in scores[0]}
  return dict(mode="keyframes", workdir=args.workdir, stories=args.eval, keyframe_every=rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("stage1", "overfit", "x0", "guidance", "memory", "stage2",
                                       "decoder", "facts", "keyframes"))
  parser.add_argument("--workdir", required=True)
  # "extend": a repeated flag adds to the list (with nargs="*" alone the last one wins, silently).
  parser.add_argument("--set", nargs="*", action="extend", default=[],
                      help="stage config key=value (Python)")
  parser.add_argument("--top", nargs="*", action="extend", default=[],
                      help="job config key=value (Python)")
  parser.add_argument("--eval", type=int, default=4, help="held-out storyboards to sample")
  parser.add_argument("--images", action="store_true",
                      help="stage1: configs/toy.py's image stage first (without: :images=false)")
  parser.add_argument("--image_set", nargs="*", action="extend", default=[],
                      help="stage1: image stage config key=value (Python)")
  parser.add_argument("--from_run", help="stage2: a toy job's workdir (its toy_3s stage)")
  parser.add_argument("--init_from", help="stage2: a trained stage directory to start from")
  parser.add_argument("--fresh_mixer", action="store_true",
                      help="stage2: start the mixer and gates fresh on the 3 s backbone")
  parser.add_argument("--stories", type=int, default=256, help="stage2: training stories")
  parser.add_argument("--scales", type=float, nargs="*", default=[1.0, 3.0],
                      help="guidance: the guidance scales to sample at")
  parser.add_argument("--decoder_steps", type=int, default=1500, help="decoder: training steps")
  parser.add_argument("--stage", help="facts: one stage (default: each with a mixer)")
  parser.add_argument("--ratios", type=int, nargs="*", default=[4, 8, 16],
                      help="keyframes: the keyframe spacings to score")
  parser.add_argument("--decoder_sigma", type=float, default=1.0,
                      help="decoder: the largest latent noise std it trains on")
  args = parser.parse_args()
  with contextlib.redirect_stdout(sys.stderr):  # tfds and toy_job print; stdout: the JSON only
    modes = {"x0": x0_error, "guidance": guidance, "memory": memory, "stage2": stage2,
             "decoder": decoder, "facts": facts, "keyframes": keyframes}
    result = (modes[args.mode](args) if args.mode in modes
              else stage1(args, args.mode == "overfit"))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
