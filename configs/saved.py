"""The stage config a training run saved: `--config=configs/saved.py:RUN_DIR`.

`python -m ttt_jax.train` writes RUN_DIR/config.json, the stage config it trained with, model paths
(tokenizer, text encoder, VAE) included. This file reads it back, so sampling a run needs no
config file of its own:

  python -m ttt_jax.sample --config=configs/saved.py:runs/toy/stages/toy_63s \
      --checkpoint=runs/toy/stages/toy_63s/model --storyboard=story.json --out=runs/toy/samples/1

Overrides work as with any config (`--config.sampling.num_steps=50`).
"""
import os

import ml_collections

from ttt_jax.checkpoint import as_path, read_json


def get_config(arg=None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("configs/saved.py needs a training run directory: "
                     "--config=configs/saved.py:RUN_DIR (the directory with config.json)")
  path = as_path(os.path.expanduser(arg)) / "config.json"
  if not path.is_file():
    raise ValueError(f"configs/saved.py:{arg}: no {path} (expected the workdir of a "
                     "python -m ttt_jax.train run)")
  saved = read_json(path)
  if not isinstance(saved, dict) or "model" not in saved:
    raise ValueError(f"{path} holds no stage config (no 'model' field)")
  return ml_collections.ConfigDict(saved)
