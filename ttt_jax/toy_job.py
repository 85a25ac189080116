"""The toy main job (configs/toy.py): data -> text encoder and autoencoder -> precompute -> five
training stages with hand-off -> a one-minute sample -> metrics. Run through
`python -m ttt_jax.train --config=configs/toy.py --workdir=DIR`.

What is trained, and what is not:
  * the tokenizer: a word-level sentencepiece model of a fixed corpus holding every word the
    stories write (toy_toons.vocabulary_texts);
  * the text encoder: a T5 v1.1 encoder trained first on ttt_jax/data/toy_text.py's objective
    (`text.pretrain`), standing in for the pretraining a real T5 has had, then frozen for the
    DiT's stages, as the paper freezes its T5. `text.pretrain.steps=0` keeps it random: a fixed
    featuriser the DiT's text projection learns to read, with which stage 1 drew the room and the
    characters less often (README, "Drawing the characters");
  * the autoencoder: a linear patch autoencoder fitted by PCA (closed form) to training frames,
    not the CogVideoX VAE (ttt_jax/models/pixel_vae.py has the measurements behind that choice);
  * the DiT: trained, five stages, 3 -> 9 -> 18 -> 30 -> 63 s, each from the previous one's
    parameters (the paper's recipe), but the 3 s stage trains a mixer-free backbone (the
    pretrained CogVideoX's role) and the mixers start at 9 s (configs/toy.py says why).

Everything lands under DIR: data/ (toy_toons), text/ (spiece.model, t5/), vae/, latents/<stage>/,
stages/<stage>/ (training workdirs), sample/ (video.mp4, contact_sheet.png, storyboard.json),
summary.json. Each piece is skipped when already complete, so a rerun resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as py_logging
import math
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from ttt_jax import checkpoint, training


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[int, Any]]:
  """(seconds of its clips, stage config) for each of config.stages in training order: by clip
  length, and a stage on cut clips (data.crop_frames; the image stage's 1: single keyframes)
  before the one on the whole clips."""
  stages = [(3 * stage.segments, stage) for stage in config.stages.values()]
  return sorted(stages, key=lambda pair: (pair[0], not pair[1].data.crop_frames))


def _log(message: str) -> None:
  logging.info(message)
  print(f"[toy] {message}", file=_terminal(), flush=True)


# Where _log and the progress bars write while logs_to_file sends stdout to the log; None
# outside it: whatever sys.stdout is at the time, so a caller's redirect_stdout holds for them.
_TERMINAL = None


def _terminal():
  return _TERMINAL or sys.stdout


@contextlib.contextmanager
def logs_to_file(path: str) -> Iterator[None]:
  """INFO logs (Orbax, tfds, clu, ours) and library prints go to `path`; the terminal keeps the
  job's own lines, progress bars, and warnings and errors."""
  global _TERMINAL
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = py_logging.getLogger()
  absl_handler = logging.get_absl_handler()
  to_file = py_logging.FileHandler(path)
  to_file.setFormatter(logging.PythonFormatter())
  to_terminal = py_logging.StreamHandler(sys.stderr)
  to_terminal.setLevel(py_logging.WARNING)
  # Libraries' warnings (tfds' "custom data configuration", Orbax's metadata notes, fork
  # warnings) are chatter here: only ours, and anyone's errors, reach the terminal.
  ours = os.path.dirname(os.path.abspath(__file__))
  to_terminal.addFilter(lambda r: r.levelno >= py_logging.ERROR or r.pathname.startswith(ours))
  to_terminal.setFormatter(py_logging.Formatter("%(levelname)s %(message)s"))
  level, verbosity = root.level, logging.get_verbosity()
  attached = absl_handler in root.handlers
  if attached:
    root.removeHandler(absl_handler)
  root.addHandler(to_file)
  root.addHandler(to_terminal)
  logging.set_verbosity(logging.INFO)
  py_logging.captureWarnings(True)
  tfds.disable_progress_bar()
  terminal, _TERMINAL = _TERMINAL, sys.stdout
  try:
    with open(path, "a") as log, contextlib.redirect_stdout(log):
      yield
  finally:
    _TERMINAL = terminal
    root.removeHandler(to_file)
    root.removeHandler(to_terminal)
    to_file.close()
    if attached:
      root.addHandler(absl_handler)
    root.setLevel(level)
    logging.set_verbosity(verbosity)
    py_logging.captureWarnings(False)


def build_datasets(config, workdir: str) -> dict[int, Any]:
  from ttt_jax.data.builders import toy_toons as builder  # pylint: disable=g-import-not-at-top
  out = {}
  for seconds in sorted({seconds for seconds, _ in stage_configs(config)}):
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
  """(tokenizer path, T5 directory): the trained tokenizer and the T5 the DiT reads (frozen there;
  trained first on toy_text.py's objective when config.text.pretrain.steps > 0)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from ttt_jax.data import toy_toons  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.tokenizer import StoryboardTokenizer, segment_text  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.t5 import T5Config, T5Encoder  # pylint: disable=g-import-not-at-top

  text_dir = os.path.join(workdir, "text")
  spm, t5_dir = os.path.join(text_dir, "spiece.model"), os.path.join(text_dir, "t5")
  if os.path.exists(os.path.join(t5_dir, "config.json")):
    return spm, t5_dir
  os.makedirs(text_dir, exist_ok=True)
  corpus = [t for ds in datasets.values() for story in _stories(ds, "train")
            for t in toy_toons.story_texts(story)]
  # Word pieces: the toy vocabulary is a few dozen words, and a sub-word model of that corpus
  # splits the first segment's facts into so many pieces that max_length would cut them off.
  # Trained on a fixed corpus, not the datasets' texts: word ids ordered by frequency in those
  # changed with every stage's story count, and with them every stage's result.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(toy_toons.vocabulary_texts()),
      model_prefix=os.path.join(text_dir, "spiece"),
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
                       relative_attention_num_buckets=config.text.relative_attention_buckets,
                       relative_attention_max_distance=32)
  encoder = T5Encoder(t5_config, rngs=nnx.Rngs(config.seed))
  if config.text.pretrain.steps > 0:
    _pretrain_text_encoder(encoder, tokenizer, config, config.text.pretrain)
  checkpoint.save_model(t5_dir, t5_config, encoder)
  return spm, t5_dir


def _pretrain_text_encoder(encoder, tokenizer, config, pre) -> None:
  """ttt_jax/data/toy_text.py's objective on stories of their own seeds (not the datasets':
  what the encoder learns must not change with the number of stories a stage draws)."""
  from ttt_jax.data import toy_text  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  data = lambda first, count: toy_text.story_labels(
      tokenizer, range(first, first + count), pre.segments, fps=config.fps,
      height=config.height, width=config.width)
  ids, targets = data(_TEXT_SEED, pre.stories)
  out = toy_text.pretrain(encoder, ids, targets, steps=pre.steps, batch_size=pre.batch_size,
                          lr=pre.lr, seed=config.seed,
                          held_out=data(_TEXT_SEED + pre.stories, _TEXT_HELD_OUT))
  accuracy = " / ".join(f"{a:.3f}" for a in out["accuracy"])
  _log(f"text encoder: {pre.steps} steps on {len(ids)} texts, loss {out['loss'][0]:.3f} -> "
       f"{out['loss'][-1]:.3f}, held-out accuracy of {' / '.join(toy_text.HEADS)} {accuracy} "
       f"({time.perf_counter() - start:.0f} s)")


# Seeds of the text encoder's pretraining stories: far from the datasets' (toy_toons builder).
_TEXT_SEED, _TEXT_HELD_OUT = 1 << 30, 200


def build_autoencoder(config, workdir: str, datasets) -> str:
  """Fits the linear patch autoencoder (PCA) to training frames of the 3 s stage."""
  from ttt_jax.data.video_io import from_uint8  # pylint: disable=g-import-not-at-top
  from ttt_jax.models import pixel_vae  # pylint: disable=g-import-not-at-top
  vae_dir = os.path.join(workdir, "vae")
  if os.path.exists(os.path.join(vae_dir, "config.json")):
    return vae_dir
  if config.vae.kind != pixel_vae.KIND:
    raise ValueError(f"config.vae.kind={config.vae.kind!r}: the toy job has only 'pixel'")
  source = datasets[3].as_data_source()["train"]
  frames = np.concatenate([source[i]["video"][::6] for i in range(len(source))])
  frames = from_uint8(frames)
  mean, basis, std = pixel_vae.fit_linear(frames, config.vae.patch, config.vae.latent_channels)
  r = int(config.vae.get("temporal_compression_ratio",
                         pixel_vae.PixelVAEConfig.temporal_compression_ratio))
  fitted = pixel_vae.PixelVAEConfig(patch=config.vae.patch, temporal_compression_ratio=r,
                                    mean=tuple(mean.tolist()),
                                    basis=tuple(map(tuple, basis.tolist())))
  normalize = config.vae.get("normalize", "channel")
  if normalize == "channel":  # pixel_vae.py says why the toy whitens each channel
    scaled = dataclasses.replace(fitted, channel_std=tuple(std.tolist()))
  elif normalize == "global":
    latents, _ = pixel_vae.PixelVAE(fitted).encode(
        frames[None, :1 + r * ((len(frames) - 1) // r)])
    global_std = float(np.std(np.asarray(latents)))
    scaled = dataclasses.replace(fitted, scaling_factor=1.0 / max(global_std, 1e-3))
  else:
    raise ValueError(f"config.vae.normalize={normalize!r}: expected 'channel' or 'global'")
  checkpoint.save_model(vae_dir, scaled)
  return vae_dir


def _dataset_name(path: str) -> str:
  """A built toy_toons dataset's config and version, "9s_..._train256_test2_seed0/1.0.0", from its
  directory: every value its stories depend on (the builder's config name spells them out)."""
  return "/".join(os.path.normpath(os.fspath(path)).split(os.sep)[-2:])


def needs_encoding(latents: str, dataset) -> bool:
  """Whether `latents` (a precompute output directory) has still to be encoded from `dataset`
  (a built toy_toons builder): True when it holds no complete encoding.

  Raises:
    ValueError: it was encoded from other stories (a workdir rerun with, say,
      `--config.toy.num_train.s9=1024`). Its stages trained on them too, and re-encoding would
      leave them found complete, so the job stops rather than mix the two.
  """
  from ttt_jax.data.loader import INFO_FILE  # pylint: disable=g-import-not-at-top
  path = os.path.join(latents, INFO_FILE)
  if not os.path.exists(path):
    return True
  with open(path) as f:
    source = _dataset_name(json.load(f)["source"])
  wanted = _dataset_name(dataset.data_path)
  if source != wanted:
    raise ValueError(f"{latents} was encoded from toy_toons {source}, but the config builds "
                     f"{wanted}: use a new --workdir for other stories")
  return False


def _with_models(stage, spm: str, t5_dir: str, vae_dir: str):
  stage = ml_collections.ConfigDict(stage.to_dict())
  stage.text.tokenizer, stage.text.checkpoint, stage.vae.checkpoint = spm, t5_dir, vae_dir
  power = float(stage.train.get("channel_weight_power", 0.0))
  if power:
    stage.train.channel_weights = channel_weights(vae_dir, power)
  return stage


def channel_weights(vae_dir: str, power: float) -> tuple[float, ...]:
  """[C] loss weights std_c**power of the fitted autoencoder's whitened channels, mean 1.

  The autoencoder whitens each PCA channel, so an x0 error costs the same in every channel;
  power 2 makes the loss the pixel-space MSE again (the basis is orthonormal), where the three
  flat-colour channels carry most of the error.
  """
  std = np.asarray(checkpoint.read_json(os.path.join(vae_dir, "config.json")).get("channel_std")
                   or (), np.float64)
  if not std.size:
    raise ValueError(f"train.channel_weight_power={power}: the autoencoder in {vae_dir} has no "
                     f"per-channel std (vae.normalize='channel' fits one)")
  w = std ** power
  return tuple(float(x) for x in w / w.mean())


def _read_losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["loss"] for l in f if l.strip()]


def _summarise_losses(losses: list[float]) -> dict[str, float]:
  k = min(max(5, len(losses) // 10), max(1, len(losses) // 2))
  return {"steps": len(losses), "first_loss": float(np.mean(losses[:k])),
          "last_loss": float(np.mean(losses[-k:]))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the toy job; returns and writes DIR/summary.json. The terminal gets
  a line per step of the job and a progress bar per stage; the logs go to DIR/log.txt."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with logs_to_file(os.path.join(workdir, "log.txt")):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from ttt_jax import sample  # pylint: disable=g-import-not-at-top
  from ttt_jax.data import toy_metrics, toy_toons  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.precompute import precompute  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.video_io import read_mp4  # pylint: disable=g-import-not-at-top

  _log(f"building toy_toons for the five stages; logs: {os.path.join(workdir, 'log.txt')}")
  logging.info("train steps split their batch over up to %d %s device(s)", len(jax.devices()),
               jax.devices()[0].platform)
  datasets = build_datasets(config, workdir)
  spm, t5_dir = build_text_encoder(config, workdir, datasets)
  vae_dir = build_autoencoder(config, workdir, datasets)

  # Paths relative to the workdir: the same seed gives the same summary.json, wherever it runs.
  summary: dict[str, Any] = {"stages": {}}
  previous = ""
  for seconds, stage in stage_configs(config):
    stage = _with_models(stage, spm, t5_dir, vae_dir)
    start = time.perf_counter()
    latents = os.path.join(workdir, "latents", f"toy_{seconds}s")  # the image stage's too
    encoded = ""
    if needs_encoding(latents, datasets[seconds]):
      precompute(stage, datasets[seconds].data_path, latents, "train")
      encoded = f"encoded {datasets[seconds].info.splits['train'].num_examples} videos, "
    stage.data.latents = latents
    stage.init_from = previous
    with tqdm.tqdm(desc=f"[toy] {stage.stage}", total=int(stage.train.steps), file=_terminal(),
                   dynamic_ncols=True, leave=False) as bar:
      out = training.train(stage, os.path.join(workdir, "stages", stage.stage), mesh=_mesh(stage),
                           on_step=lambda step, total, m: _advance(bar, step, m))
    s = summary["stages"][stage.stage] = {**_summarise_losses(_read_losses(out["workdir"])),
                                          "initialised_fresh": len(out["initialised_fresh"])}
    _log(f"{stage.stage}: {encoded}{s['steps']} steps x {stage.train.batch_size}"
         + (f" from {os.path.basename(previous)}" if previous else "")
         + f", loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
         f"({time.perf_counter() - start:.0f} s)")
    previous = out["workdir"]

  # One minute from a held-out storyboard (the 63 s test split was never trained on).
  _, stage = stage_configs(config)[-1]
  stage = _with_models(stage, spm, t5_dir, vae_dir)
  story = held_out_story(config, datasets)
  storyboard = os.path.join(workdir, "storyboard.json")
  with open(storyboard, "w") as f:
    json.dump(toy_toons.story_to_storyboard(story), f, indent=2)
  sample_dir = os.path.join(workdir, "sample")
  _log(f"sampling {story.segments} segments ({story.segments * 3} s) from {storyboard}")
  # The sample is a function of the trained model and the seed: resampling on a rerun
  # replaces it with the same video.
  info = sample.run(stage, os.path.join(previous, "model"), storyboard, sample_dir,
                    progress=False, overwrite=True)
  video, _ = read_mp4(info["video"])
  truth = toy_toons.render(story)

  def scores(v: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """(persistence_score's whole result, the summary's scores) of video v."""
    persistence = toy_metrics.persistence_score(v, story)
    return persistence, {"persistence": _metric(persistence),
                         "text_following": toy_metrics.text_following_score(v, story)["mean"],
                         **toy_metrics.frame_statistics(v)}

  persistence, sample_scores = scores(video)
  summary["sample"] = {
      **{k: os.path.relpath(info[k], workdir) for k in ("video", "contact_sheet")},
      **{k: info[k] for k in ("frames", "segments")},
      **sample_scores,
      "per_segment": {k: persistence[k] for k in ("room", "color", "shape")},
      # The held-out story's own rendering: what a perfect model scores.
      "reference": scores(truth)[1],
      # The same through the autoencoder (encode, decode): what a model that generates the
      # story's own latents scores; the ceiling the latent space sets.
      "autoencoded": scores(autoencode(vae_dir, truth))[1],
  }
  summary["sample"]["persistence_plot"] = os.path.relpath(plot_persistence(
      persistence, os.path.join(sample_dir, "persistence.png")), workdir)
  summary["sample"]["comparison"] = os.path.relpath(write_comparison(
      video, truth, story.segments, config.fps, os.path.join(sample_dir, "comparison.png")),
      workdir)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  s = summary["sample"]
  _log(f"persistence {s['persistence']['overall']:.3f} (reference "
       f"{s['reference']['persistence']['overall']:.3f}), text following "
       f"{s['text_following']:.3f} (the story through the autoencoder: "
       f"{s['autoencoded']['text_following']:.3f}), flatness {s['flatness']:.3f} "
       f"({s['autoencoded']['flatness']:.3f}), stability "
       f"{s['stability']:.3f}; video: {info['video']}, numbers: "
       f"{os.path.join(workdir, 'summary.json')}")
  _log("sample any storyboard (here the held-out one again, with another seed) with:\n  "
       + sample_command(workdir, previous))
  return summary


def autoencode(vae_dir: str, video: np.ndarray) -> np.ndarray:
  """uint8 video [1 + rk, H, W, 3] -> the same through the fitted autoencoder (encode's mean,
  decode; r its temporal compression), uint8 [1 + rk, H, W, 3]."""
  from ttt_jax.models.vae_convert import load_converted_vae  # pylint: disable=g-import-not-at-top
  return round_trip(load_converted_vae(vae_dir)[1], video)


def round_trip(vae: Any, video: np.ndarray) -> np.ndarray:
  """`autoencode` through a loaded autoencoder (encode(video) -> (mean, logvar); decode)."""
  from ttt_jax.data.video_io import from_uint8, to_uint8  # pylint: disable=g-import-not-at-top
  latents, _ = vae.encode(jnp.asarray(from_uint8(video))[None])
  return to_uint8(np.asarray(vae.decode(latents))[0])


def held_out_story(config: ml_collections.ConfigDict, datasets) -> Any:
  """The story the job samples: config.toy.sample_story of the 63 s test split."""
  return _stories(datasets[max(datasets)], "test")[config.toy.sample_story]


def sample_command(workdir: str, stage_dir: str) -> str:
  """The `python -m ttt_jax.sample` line for a trained stage, as the user would type it."""
  def rel(path: str) -> str:  # short when under the current directory
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
  return (f"python -m ttt_jax.sample --config=configs/saved.py:{rel(stage_dir)} "
          f"--checkpoint={rel(os.path.join(stage_dir, 'model'))} "
          f"--storyboard={rel(os.path.join(workdir, 'storyboard.json'))} "
          f"--out={rel(os.path.join(workdir, 'samples', 'seed1'))} --seed=1")


def write_comparison(video: np.ndarray, truth: np.ndarray, segments: int, fps: int, path: str,
                     scale: int = 3) -> str:
  """The middle frame of every segment, generated (top) over the story's rendering (bottom),
  enlarged `scale` times: one picture that shows whether the model draws the story."""
  from ttt_jax.data.video_io import contact_sheet, write_png  # pylint: disable=g-import-not-at-top
  from ttt_jax.sample import segment_frame_indices  # pylint: disable=g-import-not-at-top
  sheets = [contact_sheet(v, segment_frame_indices(len(v), segments, fps)) for v in (video, truth)]
  gap = np.full((4, sheets[0].shape[1], 3), 255, np.uint8)
  image = np.concatenate([sheets[0], gap, sheets[1]])
  write_png(path, image.repeat(scale, axis=0).repeat(scale, axis=1))
  return path


def plot_persistence(score: dict, path: str) -> str:
  """Writes the per-segment room / colour / shape scores of `persistence_score` as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
  segments = np.arange(1, len(score["room"]) + 1)
  for key, label in (("room", "room"), ("color", "colours"), ("shape", "shapes")):
    ax.plot(segments, score[key], marker="o", markersize=3, label=label)
  # Segment 1's text states the facts; every later segment must remember them.
  ax.axvspan(0.5, 1.5, color="0.9", zorder=0)
  ax.set_xticks(segments[::max(1, len(segments) // 11)])
  ax.set(xlabel="segment (3 s each; only segment 1's text states the facts)",
         ylabel="score", ylim=(-0.05, 1.05), xlim=(0.5, len(segments) + 0.5))
  ax.legend(loc="lower left", ncol=3, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _advance(bar, step: int, metrics: dict[str, float]) -> None:
  bar.n = step  # a resumed stage starts part way
  bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
  bar.refresh()


def _metric(score: dict) -> dict[str, float]:
  return {k: float(score[k]) for k in ("overall", "room_later", "color_later", "shape_later")}


def _mesh(stage):
  devices = jax.devices()
  # The batch must split evenly over the data axes: as many devices as divide it (batch 1: one).
  return training.mesh_from_config(
      stage, devices[:math.gcd(int(stage.train.batch_size), len(devices))])


_HOST_DEVICES = "--xla_force_host_platform_device_count"


def split_host_cpu(count: int = 0) -> int:
  """Makes XLA's CPU backend show `count` devices (0: one per core this process may use), so
  that the toy job's train steps run data parallel over the cores; returns the count set, or 0
  where it set none. Call it before anything initialises a JAX backend.

  Why: one CPU device runs a step's many small ops mostly one at a time. Split over two devices on
  this 2-core machine, a 9 s TTT-MLP step (batch 4) takes 0.40 s against 0.76, with the same
  losses to 1e-7 (README, "Two CPU devices"). It does nothing where XLA_FLAGS already sets the
  count (the tests' 8 devices), once a backend is up, or where the job runs on an accelerator
  (the CPU devices then go unused).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICES in flags or xla_bridge.backends_are_initialized():
    return 0
  if count <= 0:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if count <= 1:
    return 0
  os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICES}={count}".strip()
  return count
