"""The sequence mixers the paper compares, each with its options: one table, one config string.

`configs/tomjerry_3s.py:mixer=mamba2` (or `configs/toy.py:mixer=gated_deltanet`) swaps the TTT-MLP
layer for another mixer with the options below; everything else in the stage (segments, local
attention, gates, trainable groups, learning rates, steps) stays, as in the paper's comparison
("same backbone, same stages"). The options are `ttt_jax.mixers.build_mixer` keyword arguments.
"""
from __future__ import annotations

import ml_collections

# The paper's sizes (width 3072, 48 heads).
MIXER_OPTIONS = {
    "none": {},                        # local attention only
    # 8192 tokens: the paper's window, about 6 latent frames at 1350 tokens a frame.
    "swa": dict(window=8192),
    # Sized to the TTT-MLP layer's parameter count (build_mixer's param_budget, via
    # matched_options): 39.5 M a layer at width 3072, so the comparison is not one of sizes.
    "mamba2": dict(param_budget="ttt_mlp"),
    "gated_deltanet": dict(param_budget="ttt_mlp"),
    # The reference's TTT-Linear: mini-batch 16, inner base lr 1.0 (configs/train/ttt-linear).
    "ttt_linear": dict(mini_batch_size=16, inner_lr_base=1.0, checkpoint_group_size=16,
                       impl="dual"),
    # The reference's TTT-MLP: mini-batch 64, inner base lr 0.1, checkpoints every 16
    # mini-batches (configs/train/ttt-mlp).
    "ttt_mlp": dict(mini_batch_size=64, inner_lr_base=0.1, checkpoint_group_size=16,
                    impl="dual"),
}

# `:runlocal` (6 tokens a latent frame instead of 1350): the same structure at CPU size.
RUNLOCAL_OPTIONS = {
    "swa": dict(window=36),            # still ~6 latent frames
    "ttt_linear": dict(checkpoint_group_size=4),
    "ttt_mlp": dict(mini_batch_size=16, checkpoint_group_size=4),
}


def mixer_options(name: str, runlocal: bool) -> ml_collections.ConfigDict:
  """The options of mixer `name` (a key of MIXER_OPTIONS) at full or runlocal size."""
  if name not in MIXER_OPTIONS:
    raise ValueError(f"unknown mixer {name!r}; the config argument mixer= takes one of "
                     f"{', '.join(MIXER_OPTIONS)}")
  options = dict(MIXER_OPTIONS[name])
  if runlocal:
    options.update(RUNLOCAL_OPTIONS.get(name, {}))
  return ml_collections.ConfigDict(options)


def use_mixer(model: ml_collections.ConfigDict, name: str, runlocal: bool) -> None:
  """Switches `model` (a config's DiT fields) to mixer `name` with the table's options.

  A config's own mixer keeps the options that config gives it (e.g. the toy's mini-batch);
  any other mixer gets the table's, never options meant for a different mixer.
  """
  options = mixer_options(name, runlocal)  # validates the name even when it stays
  if name != model.mixer:
    model.mixer = name
    model.mixer_options = options
