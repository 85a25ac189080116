"""transformers T5 encoder checkpoint (config.json + safetensors) -> `T5Encoder`, and to/from Orbax.

Reads with `safetensors_io`, so torch is not needed. Accepts a single `model.safetensors` or a
sharded one (`model.safetensors.index.json`, as CogVideoX's `text_encoder/` ships it).

Every tensor is accounted for: a weight the model needs and the files lack, or a tensor the files
hold that maps to nothing, is an error. Two exceptions, both as transformers loads them:
  - `encoder.embed_tokens.weight` is tied to `shared.weight`; a save holds either or both;
  - `decoder.*` and `lm_head.weight` of a full encoder-decoder checkpoint are skipped.

A converted directory holds `config.json` (the T5Config fields, readable by `T5Config.from_hf`) and
`params/`, an Orbax checkpoint of the model's pure-dict state.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import checkpoint
from ttt_jax.models.safetensors_io import read_safetensors_dir
from ttt_jax.models.t5 import T5Config, T5Encoder

_EMBED_KEY = "shared.weight"
_TIED_EMBED_KEY = "encoder.embed_tokens.weight"
_IGNORED_PREFIXES = ("decoder.", "lm_head.")

Params = dict[str, Any]


def _hf_key_to_path(config: T5Config) -> dict[str, tuple[str, ...]]:
  """transformers tensor name -> path in the `T5Encoder` pure dict (layer indices as strings)."""
  table = {
      _EMBED_KEY: ("embed", "embedding"),
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          ("relative_attention_bias", "embedding"),
      "encoder.final_layer_norm.weight": ("final_norm", "scale"),
  }
  for i in range(config.num_layers):
    hf, ours = f"encoder.block.{i}.layer.", ("layers", str(i))
    table[hf + "0.layer_norm.weight"] = (*ours, "attn_norm", "scale")
    for name in "qkvo":
      table[hf + f"0.SelfAttention.{name}.weight"] = (*ours, name, "kernel")
    table[hf + "1.layer_norm.weight"] = (*ours, "ffn_norm", "scale")
    for name in ("wi_0", "wi_1", "wo"):
      table[hf + f"1.DenseReluDense.{name}.weight"] = (*ours, name, "kernel")
  return table


def _untie_embedding(tensors: dict[str, Any]) -> None:
  """Leaves the token embedding under `shared.weight` only."""
  if _TIED_EMBED_KEY not in tensors:
    return
  tied = tensors.pop(_TIED_EMBED_KEY)
  if _EMBED_KEY not in tensors:
    tensors[_EMBED_KEY] = tied
  elif not np.array_equal(tensors[_EMBED_KEY], tied):
    raise ValueError(f"{_TIED_EMBED_KEY} differs from {_EMBED_KEY}; the encoder ties them")


def hf_to_params(config: T5Config, tensors: dict[str, Any],
                 param_dtype: Any = jnp.float32) -> Params:
  """Maps transformers tensors (numpy or jax arrays) to a `T5Encoder` pure dict (string layer
  keys), in param_dtype.

  Raises:
    ValueError: listing every expected tensor that is missing and every unknown one.
  """
  tensors = {k: v for k, v in tensors.items() if not k.startswith(_IGNORED_PREFIXES)}
  _untie_embedding(tensors)
  table = _hf_key_to_path(config)
  missing, unknown = sorted(table.keys() - tensors.keys()), sorted(tensors.keys() - table.keys())
  if missing or unknown:
    raise ValueError(f"T5 checkpoint does not match the encoder config:\n"
                     f"  missing: {missing}\n  unknown: {unknown}")
  params: Params = {}
  for key, path in table.items():
    value = tensors[key]
    if path[-1] == "kernel":  # torch Linear stores [out, in]
      value = value.T
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value, param_dtype)
  return params


def _abstract_encoder(config: T5Config, dtype: Any, param_dtype: Any):
  """(graphdef, abstract state, string-keyed pure dict of ShapeDtypeStruct): nothing allocated."""
  model = nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  return graphdef, state, checkpoint.str_keys(nnx.to_pure_dict(state))


def params_to_model(config: T5Config, params: Params, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> T5Encoder:
  """Builds a `T5Encoder` holding `params` (a pure dict, int or string layer keys)."""
  graphdef, state, abstract = _abstract_encoder(config, dtype, param_dtype)
  checkpoint.check_tree(checkpoint.str_keys(params), abstract,
                        "params do not fit the T5 config")
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def load_hf_t5_encoder(src_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32) -> tuple[T5Config, T5Encoder]:
  """Loads a transformers T5 encoder directory (config.json + safetensors) as a `T5Encoder`."""
  src_dir = os.fspath(src_dir)
  config = T5Config.from_hf(checkpoint.read_json(os.path.join(src_dir, "config.json")))
  params = hf_to_params(config, read_safetensors_dir(src_dir, "model.safetensors"),
                        param_dtype)
  return config, params_to_model(config, params, dtype=dtype, param_dtype=param_dtype)


def convert_t5(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
               param_dtype: Any = jnp.float32) -> None:
  """transformers T5 encoder directory -> `dst_dir/config.json` + Orbax `dst_dir/params`."""
  checkpoint.save_model(dst_dir, *load_hf_t5_encoder(src_dir, param_dtype=param_dtype))


def load_t5(ckpt_dir: str | os.PathLike, *, dtype: Any = jnp.float32,
            param_dtype: Any = jnp.float32) -> tuple[T5Config, T5Encoder]:
  """Reads a directory written by `checkpoint.save_model` (or `convert_t5`)."""
  ckpt_dir = os.fspath(ckpt_dir)
  config = T5Config.from_hf(checkpoint.read_json(os.path.join(ckpt_dir, "config.json")))
  return config, checkpoint.load_model(ckpt_dir, lambda: T5Encoder(
      config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
