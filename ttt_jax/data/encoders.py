"""The text and video encoders a config names, loaded one way for precompute and sampling.

`config.text.tokenizer` (sentencepiece), `config.text.checkpoint` (T5 encoder) and
`config.vae.checkpoint` (CogVideoX VAE or the pixel autoencoder), each a directory written by
`checkpoint.save_model` (`python -m ttt_jax.convert`, or the toy job).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax.data.tokenizer import StoryboardTokenizer
from ttt_jax.models.t5_convert import load_t5
from ttt_jax.models.vae_convert import load_converted_vae


def require_paths(config: ml_collections.ConfigDict, purpose: str) -> None:
  """ValueError naming the first of the encoders' paths the config leaves empty; `purpose`
  ('precompute', 'sampling') says who needs it."""
  for key, path in (("text.checkpoint", config.text.checkpoint),
                    ("text.tokenizer", config.text.tokenizer),
                    ("vae.checkpoint", config.vae.checkpoint)):
    if not path:
      raise ValueError(f"config.{key} is empty: {purpose} needs a converted model there")


class Encoders:
  """Tokenizer, T5 and VAE, loaded once; `encode_ids` is compiled once per ids shape."""

  def __init__(self, config: ml_collections.ConfigDict, purpose: str):
    """`purpose` as `require_paths`'."""
    require_paths(config, purpose)
    self.tokenizer = StoryboardTokenizer(config.text.tokenizer, max_length=config.text.max_length)
    self.t5_config, self.t5 = load_t5(config.text.checkpoint)
    self.vae_config, self.vae = load_converted_vae(config.vae.checkpoint)
    self._t5_call = nnx.jit(lambda t5, ids: t5(ids))

  def encode_ids(self, ids: np.ndarray) -> jax.Array:
    """Token ids int [N, max_length] -> T5 states [N, max_length, d_model]. As CogVideoX, no
    attention mask: the encoder sees the padding too."""
    return self._t5_call(self.t5, jnp.asarray(ids))
