"""The stage config a training run saved: `--config=configs/saved.py:RUN_DIR`.

`python -m ttt_jax.train` writes RUN_DIR/config.json, the stage config it trained with, model paths
(tokenizer, text encoder, VAE) included. This file reads it back, so sampling a run needs no
config file of its own:

  python -m ttt_jax.sample --config=configs/saved.py:runs/toy/stages/toy_63s \
      --checkpoint=runs/toy/stages/toy_63s/model --storyboard=story.json --out=runs/toy/samples/1

Overrides work as with any config (`--config.sampling.num_steps=50`).
"""
from ttt_jax.checkpoint import load_run_config


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/saved.py needs a training run directory: "
                     "--config=configs/saved.py:RUN_DIR (the directory with config.json)")
  try:
    return load_run_config(arg)
  except ValueError as e:
    raise ValueError(f"configs/saved.py:{e}") from None
