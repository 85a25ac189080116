"""T5 encoder: parity with transformers' T5EncoderModel through the safetensors converter."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from ttt_jax.models.t5 import T5Config, T5Encoder, extend_embeddings, relative_position_bucket
from ttt_jax.models.t5_convert import (convert_t5, load_hf_t5_encoder, load_t5,
                                       params_to_model)

VOCAB = 100
# 8 buckets / max distance 16: per direction, exact buckets for distances 0-1, log buckets for
# 2-15, the last bucket from 16 on. Length 2 only reaches exact buckets; 40 reaches all of them.
LENGTHS = (2, 40)


@jax.jit
def _apply(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def run(model, ids, mask=None):
  return np.asarray(_apply(*nnx.split(model), jnp.asarray(ids),
                           None if mask is None else jnp.asarray(mask)), np.float32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random transformers T5EncoderModel saved with save_pretrained; returns (dir, model)."""
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
      relative_attention_max_distance=16, attn_implementation="eager")
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():  # norm weights start at 1; make them tell the layers apart
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  directory = tmp_path_factory.mktemp("hf_t5")
  model.save_pretrained(directory)
  return directory, model


def inputs(length, batch=3, seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(2, VOCAB, (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, length // 2 + 1:] = 0
  mask[2, 1:] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.mark.parametrize("buckets,max_distance", [(8, 16), (32, 128)])
def test_relative_position_bucket_matches_transformers(buckets, max_distance):
  n = 3 * max_distance
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance)
  got = relative_position_bucket(n, n, buckets, max_distance)
  np.testing.assert_array_equal(got, want.numpy())
  # Every bucket is reached except the right-hand half's distance 0.
  assert set(np.unique(got)) == set(range(buckets)) - {buckets // 2}


@pytest.mark.parametrize("length", LENGTHS)
def test_parity_with_transformers(hf_dir, length):
  directory, hf_model = hf_dir
  config, model = load_hf_t5_encoder(directory)
  assert config == T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4, relative_attention_num_buckets=8,
                            relative_attention_max_distance=16)
  ids, mask = inputs(length)
  for m in (None, mask):
    with torch.no_grad():
      want = hf_model(input_ids=torch.tensor(ids),
                      attention_mask=None if m is None else torch.tensor(m)).last_hidden_state
    got = run(model, ids, m)
    assert got.shape == (3, length, 32)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)


def test_bf16_compute_keeps_fp32_norms(hf_dir):
  _, ref = load_hf_t5_encoder(hf_dir[0])
  _, model = load_hf_t5_encoder(hf_dir[0], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.layers[0].q.kernel.dtype == jnp.bfloat16
  ids, mask = inputs(40)
  out = _apply(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  want = run(ref, ids, mask)
  # The final RMSNorm output is O(1); bf16 weights and matmul inputs cost ~1e-2.
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=0.1)
  assert np.abs(np.asarray(out, np.float32) - want).mean() < 0.02


def _write(directory, tensors, config_src, shards=1):
  directory.mkdir()
  shutil.copy(config_src / "config.json", directory / "config.json")
  if shards == 1:
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return directory
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: tensors[k] for k in names[s::shards]}
    safetensors.numpy.save_file(part, str(directory / file))
    weight_map.update(dict.fromkeys(part, file))
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return directory


def test_converter_reports_missing_and_unknown_keys(hf_dir, tmp_path):
  tensors = safetensors.numpy.load_file(str(hf_dir[0] / "model.safetensors"))
  del tensors["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
  tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
  bad = _write(tmp_path / "bad", tensors, hf_dir[0])
  with pytest.raises(ValueError, match=r"(?s)missing: \['encoder\.block\.1\.layer\.1\."
                                       r"DenseReluDense\.wi_1\.weight'\].*"
                                       r"unknown: \['encoder\.block\.2\."):
    load_hf_t5_encoder(bad)


def test_converter_tied_embedding_sharded_and_decoder(hf_dir, tmp_path):
  tensors = safetensors.numpy.load_file(str(hf_dir[0] / "model.safetensors"))
  _, ref = load_hf_t5_encoder(hf_dir[0])
  ids, mask = inputs(11)
  want = run(ref, ids, mask)

  both = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"],
                          "decoder.final_layer_norm.weight": np.ones(32, np.float32),
                          "lm_head.weight": tensors["shared.weight"]})
  np.testing.assert_array_equal(
      run(load_hf_t5_encoder(_write(tmp_path / "both", both, hf_dir[0], shards=3))[1], ids,
          mask), want)

  only_tied = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
               for k, v in tensors.items()}
  np.testing.assert_array_equal(
      run(load_hf_t5_encoder(_write(tmp_path / "tied", only_tied, hf_dir[0]))[1], ids, mask),
      want)

  untied = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"] + 1})
  with pytest.raises(ValueError, match="embed_tokens"):
    load_hf_t5_encoder(_write(tmp_path / "untied", untied, hf_dir[0]))


@pytest.mark.parametrize("old_safetensors", [False, True])
def test_converter_reads_bf16(hf_dir, tmp_path, monkeypatch, old_safetensors):
  """Released CogVideoX T5 weights are bf16; safetensors 0.4.x cannot read those into numpy."""
  tensors = safetensors.numpy.load_file(str(hf_dir[0] / "model.safetensors"))
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
  directory = _write(tmp_path / "bf16", bf16, hf_dir[0])
  if old_safetensors:
    def no_bf16(path):
      raise TypeError("data type 'bfloat16' not understood")
    monkeypatch.setattr(safetensors.numpy, "load_file", no_bf16)
  _, model = load_hf_t5_encoder(directory)
  got = model.layers[1].wo.kernel[...]
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(
      got, bf16["encoder.block.1.layer.1.DenseReluDense.wo.weight"].T.astype(np.float32))


def test_convert_then_load(hf_dir, tmp_path):
  convert_t5(hf_dir[0], tmp_path / "t5")
  config, model = load_t5(tmp_path / "t5")
  ref_config, ref = load_hf_t5_encoder(hf_dir[0])
  assert config == ref_config
  ids, mask = inputs(11)
  np.testing.assert_array_equal(run(model, ids, mask), run(ref, ids, mask))


def test_config_from_hf():
  xxl = T5Config()
  assert T5Config.from_hf(dataclasses.asdict(xxl)) == xxl
  with pytest.raises(ValueError, match="gated-gelu"):
    T5Config.from_hf(dict(dataclasses.asdict(xxl), feed_forward_proj="relu"))
  with pytest.raises(ValueError, match="d_ff"):
    T5Config.from_hf({k: v for k, v in dataclasses.asdict(xxl).items() if k != "d_ff"})
  # The XXL defaults give T5-v1.1-XXL's encoder: 4.76B parameters (shapes only, nothing built).
  abstract = nnx.eval_shape(lambda: T5Encoder(xxl, rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n_params == 4_762_310_656


def test_params_to_model_rejects_wrong_shapes(hf_dir):
  config, model = load_hf_t5_encoder(hf_dir[0])
  params = nnx.to_pure_dict(nnx.state(model))
  with pytest.raises(ValueError, match="wo"):
    params_to_model(dataclasses.replace(config, d_ff=128), params)


def test_extend_embeddings(hf_dir):
  config, model = load_hf_t5_encoder(hf_dir[0])
  old = np.asarray(model.embed.embedding[...])
  params = extend_embeddings(nnx.to_pure_dict(nnx.state(model)), 2, jax.random.key(0))
  extend_embeddings(model, 2, jax.random.key(0))
  assert model.config.vocab_size == VOCAB + 2 and model.embed.num_embeddings == VOCAB + 2
  for table in (model.embed.embedding[...], params["embed"]["embedding"]):
    table = np.asarray(table)
    assert table.shape == (VOCAB + 2, 32)
    np.testing.assert_array_equal(table[:VOCAB], old)
    # Mean embedding plus noise of 1% of the per-feature spread; the two rows differ.
    assert np.abs(table[VOCAB:] - old.mean(0)).max() < 0.1 * old.std(0).min()
    assert not np.allclose(table[VOCAB], table[VOCAB + 1])
  rebuilt = params_to_model(model.config, params)
  ids = np.array([[5, VOCAB, 7, VOCAB + 1, 1]])
  np.testing.assert_array_equal(run(rebuilt, ids), run(model, ids))
