"""T5 v1.1 text encoder (as transformers' `T5EncoderModel`), in Flax NNX.

CogVideoX conditions on T5-v1.1-XXL: 24 layers, d_model 4096, 64 heads x 64, gated-GELU FFN of
width 10240, 226 tokens. What makes T5 differ from a textbook transformer encoder:
  - pre-norm RMSNorm (`T5LayerNorm`: no mean subtraction, no bias, statistics in fp32);
  - attention scores are NOT scaled by 1/sqrt(d_kv); instead a learned per-head bias indexed by
    bucketed relative position (exact buckets near 0, logarithmic ones up to max_distance,
    separate buckets for keys left and right of the query) is added to the scores. Only the first
    layer owns that table; every layer adds the same bias, so here the encoder owns it;
  - FFN: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases anywhere;
  - a final RMSNorm after the last layer.

Precision: `dtype` is the compute dtype of the matmuls and of the output; `param_dtype` the storage
dtype of the weights. The residual stream, every norm and the attention softmax stay in fp32 (T5
activations are large; in half precision transformers itself has to clamp them), so `dtype=bf16`
only changes the matmul inputs.

Note: CogVideoX (and the TTT-video reference) encode prompts padded to 226 tokens WITHOUT an
attention mask, so the pad tokens take part in attention and their hidden states are used as
they are. Pass `attention_mask=None` to reproduce those embeddings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Encoder hyper-parameters, named as in transformers' config.json. Defaults: T5-v1.1-XXL."""
  vocab_size: int = 32128  # 32000 sentencepiece pieces + 100 sentinels + 28 unused rows
  d_model: int = 4096
  d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"  # the only FFN implemented: T5 v1.1's

  # Keys config.json must carry; the others default as in transformers.
  _REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
               "feed_forward_proj")

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> T5Config:
    """From a transformers T5 config.json dict (or `dataclasses.asdict` of a T5Config)."""
    missing = [k for k in cls._REQUIRED if k not in hf]
    if missing:
      raise ValueError(f"T5 config lacks {missing}")
    config = cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})
    if config.feed_forward_proj != "gated-gelu":
      raise ValueError(
          f"feed_forward_proj={config.feed_forward_proj!r}: only T5 v1.1's 'gated-gelu' FFN is "
          "implemented")
    return config


def relative_position_bucket(query_length: int, key_length: int, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of every (query, key) pair: int32 `[query_length, key_length]`.

  Half of the buckets are for keys right of the query (key - query > 0). Within each half,
  distances below num_buckets/4 get a bucket each, larger ones share logarithmically wider
  buckets up to max_distance, beyond which all fall in the last bucket.

  Computed in numpy float32 with the same operations as transformers: the lengths are static, and
  backend-specific `log` rounding could otherwise move a distance that lands exactly on a bucket
  edge (e.g. 64 for XXL) into the neighbouring bucket.
  """
  relative_position = (np.arange(key_length, dtype=np.int64)[None, :]
                       - np.arange(query_length, dtype=np.int64)[:, None])
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int64) * num_buckets
  distance = np.abs(relative_position)
  max_exact = num_buckets // 2
  # max(.., 1): log(0) is only ever taken where the exact branch is chosen anyway.
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def _rms_norm(config: T5Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """T5LayerNorm: statistics and scaling in fp32 whatever `dtype`, the output's dtype."""
  return nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)


class T5Block(nnx.Module):
  """Pre-norm self-attention then pre-norm gated-GELU FFN, each with a residual connection."""

  def __init__(self, config: T5Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads, self.d_kv = config.num_heads, config.d_kv
    inner = config.num_heads * config.d_kv

    def linear(n_in, n_out):
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)

    self.attn_norm = _rms_norm(config, dtype, param_dtype, rngs)
    self.q, self.k, self.v = (linear(config.d_model, inner) for _ in range(3))
    self.o = linear(inner, config.d_model)
    self.ffn_norm = _rms_norm(config, dtype, param_dtype, rngs)
    self.wi_0 = linear(config.d_model, config.d_ff)  # through GELU
    self.wi_1 = linear(config.d_model, config.d_ff)  # linear gate
    self.wo = linear(config.d_ff, config.d_model)

  def __call__(self, x: jax.Array, position_bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    """x: fp32 `[batch, len, d_model]`; position_bias `[1, heads, len, len]`; mask bool
    `[batch, 1, 1, len]` (True = key may be attended) or None."""
    h = self.attn_norm(x)
    heads = (*h.shape[:-1], self.num_heads, self.d_kv)
    q, k, v = (proj(h).reshape(heads) for proj in (self.q, self.k, self.v))
    # The XLA implementation takes logits and softmax in fp32 whatever q/k/v's dtype.
    # scale=1: T5 does not scale the scores.
    attn = jax.nn.dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0,
                                        implementation="xla")
    x = x + self.o(attn.reshape(*h.shape[:-1], -1)).astype(jnp.float32)

    h = self.ffn_norm(x)
    h = jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h)
    return x + self.wo(h).astype(jnp.float32)


class T5Encoder(nnx.Module):
  """T5 v1.1 encoder stack: embedding, `num_layers` blocks, final RMSNorm.

  Parameters (pure-dict paths, as `load_hf_t5_encoder` fills them):
    embed/embedding [vocab_size, d_model]; relative_attention_bias/embedding [buckets, heads];
    layers/<i>/{attn_norm,ffn_norm}/scale [d_model];
    layers/<i>/{q,k,v}/kernel [d_model, heads*d_kv]; layers/<i>/o/kernel [heads*d_kv, d_model];
    layers/<i>/{wi_0,wi_1}/kernel [d_model, d_ff]; layers/<i>/wo/kernel [d_ff, d_model];
    final_norm/scale [d_model].
  """

  def __init__(self, config: T5Config, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    # The embedding is looked up in fp32: it starts the fp32 residual stream.
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.float32,
                           param_dtype=param_dtype, rngs=rngs)
    self.relative_attention_bias = nnx.Embed(
        config.relative_attention_num_buckets, config.num_heads, dtype=jnp.float32,
        param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([T5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = _rms_norm(config, dtype, param_dtype, rngs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids int `[batch, len]`; attention_mask `[batch, len]` (nonzero = real token) or None
    to attend everywhere. Returns the last hidden state `[batch, len, d_model]` in `dtype`."""
    length = input_ids.shape[1]
    buckets = relative_position_bucket(length, length,
                                       self.config.relative_attention_num_buckets,
                                       self.config.relative_attention_max_distance)
    position_bias = self.relative_attention_bias(jnp.asarray(buckets))  # [len, len, heads]
    position_bias = jnp.transpose(position_bias, (2, 0, 1))[None]
    mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
    x = self.embed(input_ids)
    for layer in self.layers:
      x = layer(x, position_bias, mask)
    return self.final_norm(x)


def _extended_table(table: jax.Array, n_new: int, rng: jax.Array,
                    noise_scale: float) -> jax.Array:
  rows = table.astype(jnp.float32)
  noise = jax.random.normal(rng, (n_new, table.shape[1]), jnp.float32)
  new = rows.mean(0) + noise_scale * rows.std(0) * noise
  return jnp.concatenate([rows, new]).astype(table.dtype)


def extend_embeddings(params_or_model: T5Encoder | dict, n_new: int, rng: jax.Array, *,
                      noise_scale: float = 0.01) -> T5Encoder | dict:
  """Appends `n_new` token embeddings (ids vocab_size .. vocab_size + n_new - 1).

  Each new row is the mean embedding plus Gaussian noise of `noise_scale` times the per-feature
  std of the existing rows, so new tokens start as "an average token" yet stay distinguishable.

  Only needed when a tokenizer's ids outgrow the table (see `StoryboardTokenizer.vocab_size`); the
  pretrained T5-v1.1 table already has 32128 rows, enough for the scene tokens.

  Args:
    params_or_model: a `T5Encoder` (extended in place, config.vocab_size updated, and returned)
      or its pure-dict params (a new dict is returned; build the model with the larger
      vocab_size to load it).
    n_new: rows to append.
    rng: a `jax.random` key.
  """
  if isinstance(params_or_model, T5Encoder):
    model = params_or_model
    table = _extended_table(model.embed.embedding[...], n_new, rng, noise_scale)
    model.embed.embedding.set_value(table)
    model.embed.num_embeddings = table.shape[0]
    model.config = dataclasses.replace(model.config, vocab_size=table.shape[0])
    return model
  params = dict(params_or_model)
  params["embed"] = dict(params["embed"])
  params["embed"]["embedding"] = _extended_table(params["embed"]["embedding"], n_new, rng,
                                                 noise_scale)
  return params
