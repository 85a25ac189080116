"""Every stage config loads; its :runlocal variant keeps the structure of the real one; the
recipe numbers are README "Recipe"'s; the config argument parser."""
import importlib
import math
import os
import re

import numpy as np
import pytest

from configs.arguments import given_arguments, parse_arguments
from ttt_jax import training
from ttt_jax.mixers import MIXERS
from ttt_jax.models.dit import DiTConfig
from ttt_jax.models.vae import VAEConfig

STAGES = [3, 9, 18, 30, 63]


def _load(seconds, arg=None):
  return importlib.import_module(f"configs.tomjerry_{seconds}s").get_config(arg)


@pytest.mark.parametrize("seconds", STAGES)
def test_runlocal_keeps_structure(seconds):
  full, local = _load(seconds), _load(seconds, "runlocal")
  assert full.segments == local.segments == seconds // 3
  assert full.latent_frames == local.latent_frames == 1 + 12 * (seconds // 3)
  for key in ("stage", "previous_stage", "fps"):
    assert full[key] == local[key], key
  for key in ("trainable", "schedule", "lr", "mixer_lr", "lr_end", "adam_b1", "adam_b2",
              "weight_decay", "grad_clip", "text_dropout"):
    assert full.train[key] == local.train[key], key
  assert full.model.mixer == local.model.mixer
  assert full.sampling.sampler == local.sampling.sampler
  assert full.sampling.dynamic_cfg == local.sampling.dynamic_cfg
  for cfg in (full, local):  # the whole sequence splits into whole TTT mini-batches
    assert cfg.text.max_length == cfg.model.max_text_seq_length
    assert _seq_len(cfg) % cfg.model.mixer_options.mini_batch_size == 0, cfg.runlocal
  assert local.model.num_layers < full.model.num_layers and local.train.steps < full.train.steps
  for cfg in (full, local):
    DiTConfig.from_dict(cfg.model.to_dict())  # every model field is a DiTConfig field


def _seq_len(cfg):
  tokens_per_frame = (cfg.model.sample_height // 2) * (cfg.model.sample_width // 2)
  return cfg.segments * cfg.text.max_length + cfg.latent_frames * tokens_per_frame


# README "Recipe", column "ours": one entry per row, the value each config must hold.
RECIPE = {
    "Steps per stage": [5000, 5000, 1000, 1000, 250],
    "Warm-up steps": [100, 100, 50, 50, 25],
    "T5 tokens per segment": [498, 502, 471, 497, 458],
    "Stage 1 learning rate, mixers and gates": ("cosine", 1e-4, 1e-5),
    "Stage 1 learning rate, the rest": ("constant", 1e-5),
    "Stages 2-5 learning rate": ("constant", 1e-5),
    "Trainable after stage 1": ("mixer", "gates", "attention"),
    "Optimizer": (0.9, 0.95, 1e-4, 0.1, 64),
    "Text dropout": 0.1,
    "Sampler": ("dpmpp_2m", 50),
    "Classifier-free guidance": (6.0, 5),
    "TTT-MLP mini-batch, inner base lr": (64, 0.1),
    "TTT-Linear mini-batch, inner base lr": (16, 1.0),
    "Gate init": 0.1,
    "Latent scale": 0.7,
    "Sliding window": 8192,
}


def _schedule(cfg, peak):
  fn = training.schedule_fn(cfg.train, peak)
  warmup, steps = cfg.train.warmup_steps, cfg.train.steps
  return [float(fn(s)) for s in (0, warmup, warmup + (steps - warmup) // 2, steps)]


def test_recipe_numbers():
  stages = [_load(s) for s in STAGES]
  assert [c.train.steps for c in stages] == RECIPE["Steps per stage"]
  assert [c.train.warmup_steps for c in stages] == RECIPE["Warm-up steps"]
  assert [c.text.max_length for c in stages] == RECIPE["T5 tokens per segment"]
  first = stages[0]
  _, peak, end = RECIPE["Stage 1 learning rate, mixers and gates"]
  fast = _schedule(first, first.train.mixer_lr)
  np.testing.assert_allclose(fast, [0.0, peak, (peak + end) / 2, end], rtol=1e-5, atol=0)
  _, rest = RECIPE["Stage 1 learning rate, the rest"]
  np.testing.assert_allclose(_schedule(first, first.train.lr), [0.0, rest, rest, rest],
                             rtol=1e-6, atol=0)
  assert first.train.trainable == ("all",)
  _, later_lr = RECIPE["Stages 2-5 learning rate"]
  for c in stages[1:]:
    assert c.train.trainable == RECIPE["Trainable after stage 1"]
    for peak in (c.train.lr, c.train.mixer_lr):
      np.testing.assert_allclose(_schedule(c, peak), [0.0, later_lr, later_lr, later_lr],
                                 rtol=1e-6, atol=0)
  for c in stages:
    t = c.train
    assert (t.adam_b1, t.adam_b2, t.weight_decay, t.grad_clip, t.batch_size) == RECIPE["Optimizer"]
    assert t.text_dropout == RECIPE["Text dropout"]
    assert (c.sampling.sampler, c.sampling.num_steps) == RECIPE["Sampler"]
    assert c.sampling.dynamic_cfg and c.model.mixer_gate_init == RECIPE["Gate init"]
    assert c.model.mixer == "ttt_mlp"
  model = DiTConfig.from_dict(first.model.to_dict())
  assert (model.num_layers, model.width, model.num_heads) == (42, 3072, 48)
  assert [_load(s).latent_frames for s in STAGES] == [13, 37, 73, 121, 253]
  assert _load(63).previous_stage == "30s" and first.previous_stage == ""
  for name, key in (("ttt_mlp", "TTT-MLP"), ("ttt_linear", "TTT-Linear")):
    options = _load(3, f"mixer={name}").model.mixer_options
    assert (options.mini_batch_size, options.inner_lr_base) == RECIPE[
        f"{key} mini-batch, inner base lr"]
  assert _load(3, "mixer=swa").model.mixer_options.window == RECIPE["Sliding window"]
  assert VAEConfig().scaling_factor == RECIPE["Latent scale"]  # what convert vae writes for 5B


def test_dynamic_cfg_is_the_references_scale_6_exponent_5():
  """SAT's DynamicCFG: 1 + s (1 - cos(pi (step_index / N) ** exp)) / 2 with the reference's
  step_index = N - timestep (ttt-video-dit, VPSDEDPMPP2MSampler.denoise)."""
  from ttt_jax import diffusion  # pylint: disable=g-import-not-at-top
  cfg = _load(63)
  scale, exponent = RECIPE["Classifier-free guidance"]
  assert cfg.sampling.guidance_scale == scale
  schedule = diffusion.make_schedule(**cfg.diffusion)
  timesteps = diffusion.ddim_timesteps(schedule, cfg.sampling.num_steps)
  n = cfg.sampling.num_steps
  want = [1 + scale * (1 - math.cos(math.pi * ((n - int(t)) / n) ** exponent)) / 2
          for t in timesteps]
  np.testing.assert_allclose(diffusion.dynamic_guidance_scales(scale, timesteps), want,
                             rtol=1e-6)


def test_readme_recipe_table_lists_the_tested_numbers():
  """Each RECIPE row is in README's Recipe table, its "ours" cell holding the tested values."""
  readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
  section = readme[readme.index("## Recipe"):].split("\n## ")[0]
  rows = {cells[0]: cells[1] for cells in
          ([c.strip() for c in line.strip().strip("|").split("|")]
           for line in section.splitlines() if line.startswith("|"))}
  numbers = lambda text: [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]
  for label, value in RECIPE.items():
    assert label in rows, label
    flat = value if isinstance(value, (list, tuple)) else [value]
    want = [float(v) for v in flat if not isinstance(v, str)]
    assert all(w in numbers(rows[label]) for w in want), (label, rows[label], want)


def test_bad_argument_is_an_error():
  with pytest.raises(ValueError, match="runlocal"):
    _load(3, "run_local")
  with pytest.raises(ValueError, match="unknown mixer 'mamba'.*gated_deltanet"):
    _load(3, "mixer=mamba")
  with pytest.raises(ValueError, match="runlocal=maybe.*bool"):
    _load(3, "runlocal=maybe")


def test_argument_parser():
  defaults = dict(runlocal=False, mixer="ttt_mlp", steps=3)
  assert parse_arguments(None, **defaults) == defaults
  assert parse_arguments("", **defaults) == defaults
  assert parse_arguments("runlocal, mixer=swa", **defaults) == dict(
      runlocal=True, mixer="swa", steps=3)
  assert parse_arguments("runlocal=False,steps=7", **defaults)["steps"] == 7
  assert parse_arguments("runlocal=True", **defaults)["runlocal"] is True
  with pytest.raises(ValueError, match="needs a value"):
    parse_arguments("mixer", **defaults)
  with pytest.raises(ValueError, match="steps='x'.*int"):
    parse_arguments("steps=x", **defaults)
  assert given_arguments(None) == given_arguments("") == set()
  assert given_arguments("long, images=false,") == {"long", "images"}


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_from_one_config_string(mixer):
  for arg in (f"mixer={mixer}", f"runlocal,mixer={mixer}"):
    c = _load(9, arg)
    assert c.model.mixer == mixer
    DiTConfig.from_dict(c.model.to_dict())
  toy = importlib.import_module("configs.toy").get_config(f"runlocal,mixer={mixer}")
  # The toy's 3 s stage is the mixer-free backbone (configs/toy.py).
  assert toy.stages.s3.model.mixer == "none"
  assert {toy.stages[f"s{s}"].model.mixer for s in STAGES if s > 3} == {mixer}
  # The 9 s stage trains the paper's groups whatever the mixer (attention too: configs/toy.py).
  assert toy.stages.s9.train.trainable == ("mixer", "gates", "attention")


@pytest.mark.parametrize("arg", [None, "runlocal", "long"])
def test_toy_stages_keep_the_tomjerry_structure(arg):
  toy = importlib.import_module("configs.toy").get_config(arg)
  assert toy.pipeline == "toy"
  for seconds in STAGES:
    stage, real = toy.stages[f"s{seconds}"], _load(seconds)
    assert stage.segments == real.segments
    assert stage.previous_stage == real.previous_stage and stage.fps == real.fps
    # The toy's keyframe autoencoder keeps every 8th frame where CogVideoX's VAE keeps every 4th:
    # half the latent frames a segment, and the DiT and the autoencoder agree on it.
    assert real.latent_frames == 1 + 12 * real.segments
    assert stage.latent_frames == 1 + 6 * stage.segments
    assert stage.model.temporal_compression_ratio == toy.vae.temporal_compression_ratio == 8
    for key in ("schedule", "adam_b1", "adam_b2", "weight_decay", "grad_clip", "text_dropout"):
      assert stage.train[key] == real.train[key], key
    # Where the toy departs from the paper's stages, and only there (configs/toy.py says why):
    # a mixer-free 3 s backbone, a 9 s stage whose mixers learn at 3x the other groups' rate,
    # and every later stage draws half of each batch at t >= 950.
    assert real.train.high_t_fraction == 0.0
    if seconds == 3:
      assert stage.model.mixer == "none" and stage.train.trainable == real.train.trainable
      assert stage.train.high_t_fraction == 0.0
    elif seconds == 9:
      assert stage.model.mixer == real.model.mixer
      assert stage.train.trainable == real.train.trainable
      assert (stage.train.high_t_fraction, stage.train.high_t_from) == (0.5, 950)
      assert stage.train.mixer_lr > stage.train.lr
    else:
      assert stage.model.mixer == real.model.mixer
      assert stage.train.trainable == real.train.trainable
      assert (stage.train.high_t_fraction, stage.train.high_t_from) == (0.5, 950)
    if seconds != 9:
      assert (stage.train.mixer_lr > stage.train.lr) == (real.train.mixer_lr > real.train.lr)
    assert stage.model.max_text_seq_length == stage.text.max_length
    assert stage.height % toy.vae.patch == 0 and stage.width % toy.vae.patch == 0
    assert stage.model.in_channels == toy.vae.latent_channels
    assert stage.model.sample_height == stage.height // toy.vae.patch
    DiTConfig.from_dict(stage.model.to_dict())


@pytest.mark.parametrize("arg", ["images", "runlocal,images", "long,images"])
def test_toy_image_stage_is_the_3s_stage_on_single_keyframes(arg):
  toy = importlib.import_module("configs.toy")
  default = toy.get_config(arg.replace("images", "images=False"))
  toy = toy.get_config(arg)
  assert "images" not in default.stages
  # The image stage is added before the 3 s stage, which is the same with or without it but for
  # its steps (configs/toy.py: run 8's 3000 without it).
  with_images, without = toy.stages.s3.to_dict(), default.stages.s3.to_dict()
  for stage in (with_images, without):
    stage["train"].pop("steps"), stage["train"].pop("checkpoint_every")
  assert with_images == without
  images, clips = toy.stages.images.to_dict(), toy.stages.s3.to_dict()
  assert (images["data"].pop("crop_frames"), clips["data"].pop("crop_frames")) == (1, 0)
  assert (images.pop("stage"), clips.pop("stage")) == ("toy_images", "toy_3s")
  for stage in (images, clips):
    for key in ("steps", "batch_size", "checkpoint_every"):
      stage["train"].pop(key)
  assert images == clips
  order = [stage.stage for _, stage in importlib.import_module("ttt_jax.toy_job").stage_configs(
      toy)]
  assert order == ["toy_images"] + [f"toy_{s}s" for s in STAGES]


def test_toy_default_has_the_image_stage_and_long_has_not():
  """The main job trains 2400 x 16 keyframes, then 2400 clip steps; `:images=false` trains run
  8's 3000 clip steps alone; `:long` is the 46-minute recipe as measured, clips alone."""
  get = importlib.import_module("configs.toy").get_config
  default, clips_only, long = get(), get("images=false"), get("long")
  assert "images" in default.stages and "images" not in clips_only.stages
  assert "images" not in long.stages and "images" in get("long,images").stages
  assert (default.stages.images.train.steps, default.stages.images.train.batch_size) == (2400, 16)
  assert (default.stages.s3.train.steps, clips_only.stages.s3.train.steps) == (2400, 3000)
  assert long.stages.s3.train.steps == 12800
  for seconds in STAGES[1:]:
    assert default.stages[f"s{seconds}"].to_dict() == clips_only.stages[f"s{seconds}"].to_dict()


def test_toy_long_is_the_default_job_trained_longer():
  toy = importlib.import_module("configs.toy")
  default, long = toy.get_config(), toy.get_config("long")
  for seconds in STAGES:
    a, b = default.stages[f"s{seconds}"], long.stages[f"s{seconds}"]
    assert b.train.steps >= 2 * a.train.steps
    b.train.steps, b.train.checkpoint_every = a.train.steps, a.train.checkpoint_every
    assert a.to_dict() == b.to_dict()
  assert default.toy.to_dict() == long.toy.to_dict()
  # What makes the toy learn (README, "Why the toy sampled noise"): whitened latents, absolute
  # positions, width 128.
  assert default.vae.normalize == "channel"
  assert default.stages.s3.model.use_learned_positional_embeddings
  assert default.stages.s3.model.num_heads * default.stages.s3.model.head_dim == 128


def test_toy_seed_reaches_every_stage():
  """`--config.seed=N` seeds every stage's DiT, data order and noise, not only the text encoder."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  toy = importlib.import_module("configs.toy").get_config("images")
  config_path.set_value("seed", toy, 3)  # what the command line's --config.seed=3 does
  assert {stage.seed for stage in toy.stages.values()} == {3}
  assert {stage.to_dict()["seed"] for stage in toy.stages.values()} == {3}  # config.json's
