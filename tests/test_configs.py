"""Every stage config loads; its :runlocal variant keeps the structure of the real one."""
import importlib

import pytest

from ttt_jax.models.dit import DiTConfig

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
  for key in ("trainable", "schedule", "lr", "mixer_lr", "adam_b1", "adam_b2", "weight_decay",
              "grad_clip", "text_dropout"):
    assert full.train[key] == local.train[key], key
  assert full.model.mixer == local.model.mixer
  assert local.model.num_layers < full.model.num_layers and local.train.steps < full.train.steps
  for cfg in (full, local):
    DiTConfig.from_dict(cfg.model.to_dict())  # every model field is a DiTConfig field


def test_paper_numbers():
  assert [_load(s).latent_frames for s in STAGES] == [13, 37, 73, 121, 253]
  assert [_load(s).train.steps for s in STAGES] == [5000, 5000, 1000, 500, 250]
  first, later = _load(3), _load(63)
  assert first.train.trainable == ("all",) and first.train.mixer_lr == 1e-4
  assert later.train.trainable == ("mixer", "gates", "attention") and later.train.lr == 1e-5
  assert later.previous_stage == "30s" and first.previous_stage == ""
  model = DiTConfig.from_dict(first.model.to_dict())
  assert (model.num_layers, model.width, model.num_heads) == (42, 3072, 48)
  assert first.train.batch_size == 64 and first.train.grad_clip == 0.1


def test_bad_argument_is_an_error():
  with pytest.raises(ValueError, match="runlocal"):
    _load(3, "run_local")


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_toy_stages_keep_the_tomjerry_structure(arg):
  toy = importlib.import_module("configs.toy").get_config(arg)
  assert toy.pipeline == "toy"
  for seconds in STAGES:
    stage, real = toy.stages[f"s{seconds}"], _load(seconds)
    assert stage.segments == real.segments and stage.latent_frames == real.latent_frames
    assert stage.previous_stage == real.previous_stage and stage.fps == real.fps
    for key in ("trainable", "schedule", "adam_b1", "adam_b2", "weight_decay", "grad_clip",
                "text_dropout"):
      assert stage.train[key] == real.train[key], key
    assert stage.model.mixer == real.model.mixer
    assert (stage.train.mixer_lr > stage.train.lr) == (real.train.mixer_lr > real.train.lr)
    assert stage.model.max_text_seq_length == stage.text.max_length
    assert stage.height % toy.vae.patch == 0 and stage.width % toy.vae.patch == 0
    assert stage.model.in_channels == toy.vae.latent_channels
    assert stage.model.sample_height == stage.height // toy.vae.patch
    DiTConfig.from_dict(stage.model.to_dict())
