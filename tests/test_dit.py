"""The DiT backbone: segment layout, 5B shapes and parameter count, gradients, real mixers.

Numerical parity with diffusers (one segment) and with a naive per-frame long-video loop is in
test_dit_convert.py; `ProbeMixer` is shared with it.
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from flax import nnx

from ttt_jax import mixers
from ttt_jax.mixers.common import apply_rope
from ttt_jax.models.dit import DiT, DiTConfig, Layout, cogvideox_5b

# THUDM/CogVideoX-5b transformer/config.json.
COGVIDEOX_5B = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64,
    "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16,
    "max_text_seq_length": 226, "norm_elementwise_affine": True, "norm_eps": 1e-05,
    "num_attention_heads": 48, "num_layers": 42, "out_channels": 16, "patch_size": 2,
    "sample_frames": 49, "sample_height": 60, "sample_width": 90,
    "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
    "timestep_activation_fn": "silu", "use_rotary_positional_embeddings": True,
}

SMALL = DiTConfig(num_heads=1, head_dim=16, in_channels=2, out_channels=2, num_layers=2,
                  time_embed_dim=4, text_embed_dim=4, sample_height=4, sample_width=4,
                  sample_frames=9)


class ProbeMixer(nnx.Module):
  """Test mixer: RoPE on a projection, then a running mean (depends on position and order)."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.w = nnx.Param(jax.random.normal(rngs.params(), (cfg.width, cfg.width)) / cfg.width**.5)

  def __call__(self, x, rope=None):
    """The DiT reorders the reverse pass itself and calls every mixer forward."""
    h = x @ self.w[...]
    h = apply_rope(h.reshape(*h.shape[:2], self.heads, -1), *rope).reshape(h.shape)
    return jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[None, :, None]


def probe_factory(cfg, rngs):
  return ProbeMixer(cfg, rngs)


def _inputs(cfg, segments, frames_per_segment=3, grid=4, text_len=3, seed=0):
  rng = np.random.default_rng(seed)
  frames = 1 + (frames_per_segment - 1) * segments
  latents = rng.standard_normal((2, frames, cfg.in_channels, grid, grid))
  text = rng.standard_normal((2, segments, text_len, cfg.text_embed_dim))
  return latents, text, np.array([5.0, 600.0])


@pytest.mark.parametrize("segments", [1, 3, 6, 10, 21])
def test_layout_of_paper_stages(segments):
  """3 s … 63 s at 480x720: 13/37/73/121/253 latent frames, 1350 tokens a frame."""
  frames, hw, text_len = 1 + 12 * segments, 1350, 226
  layout = Layout(segments, text_len, frames, hw)
  assert layout.frames_per_segment == 13
  assert layout.seq_len == segments * text_len + frames * hw
  assert layout.gather.shape == (segments, text_len + 13 * hw)
  # Each segment holds its own text and 13 frames; consecutive segments share one frame.
  video_of = [set(g[~layout.is_text_np[g]]) for g in layout.gather]
  for a, b in zip(video_of, video_of[1:]):
    assert len(a & b) == hw
  assert set(np.concatenate(layout.gather.tolist())) == set(range(layout.seq_len))
  if segments == 21:
    assert abs(layout.seq_len - 351_000) < 0.02 * 351_000  # PAPER.md: ~351k at 63 s


def test_layout_round_trips():
  layout = Layout(3, 2, 7, 4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, layout.seq_len, 5)))
  np.testing.assert_allclose(layout.merge(layout.split(x)), x, rtol=1e-6)
  text, video = x[:, :6].reshape(2, 3, 2, 5), x[:, 6:]
  np.testing.assert_array_equal(layout.video(layout.assemble(text, video)), video)
  with pytest.raises(ValueError, match="segments"):
    Layout(2, 2, 6, 4)


def test_reverse_order_is_the_references():
  """2 segments, 2 text tokens each, 5 frames (3 a segment, 1 shared), 2 tokens a frame.

  canonical: text_1 = 0 1 | f0 = 2 3 | f1 = 4 5 | f2 = 6 7 | text_2 = 8 9 | f3 = 10 11 | f4 = 12 13
  reverse:   text_2, then segment 2's frames f4 f3 f2 (it now holds the overlap frame), each
             frame's tokens reversed; then text_1 and f1 f0. Texts stay before their video.
  """
  layout = Layout(2, 2, 5, 2)
  by_hand = [8, 9, 13, 12, 11, 10, 7, 6, 0, 1, 5, 4, 3, 2]
  np.testing.assert_array_equal(layout.reverse_order, by_hand)
  x = jnp.arange(layout.seq_len, dtype=jnp.float32)[None, :, None]
  np.testing.assert_array_equal(layout.reverse(x)[0, :, 0], by_hand)
  np.testing.assert_array_equal(layout.unreverse(layout.reverse(x)), x)
  # The reversed sequence has the forward one's shape: text rows at the same positions.
  np.testing.assert_array_equal(layout.is_text_np[layout.reverse_order], layout.is_text_np)
  # One segment: the text, then the whole video flipped.
  np.testing.assert_array_equal(Layout(1, 2, 3, 2).reverse_order, [0, 1, 7, 6, 5, 4, 3, 2])


@pytest.mark.parametrize("segments", [1, 3, 21])
def test_reverse_order_at_paper_sizes_is_a_permutation_keeping_texts_first(segments):
  layout = Layout(segments, 458, 1 + 12 * segments, 1350)
  order = layout.reverse_order
  assert sorted(order) == list(range(layout.seq_len))
  np.testing.assert_array_equal(layout.is_text_np[order], layout.is_text_np)
  text_of = layout.source[order][layout.is_text_np] // 458  # segment of each text token
  np.testing.assert_array_equal(text_of, np.repeat(np.arange(segments)[::-1], 458))


def test_mixer_rope_is_by_global_frame_index():
  """Attention restarts RoPE per segment; the mixers see frame k of every segment apart."""
  from ttt_jax.models.dit import _mixer_rope_tables, _rope_tables
  from ttt_jax.models.rope import rope_3d
  cfg = dataclasses.replace(SMALL, head_dim=16)
  layout = Layout(3, 2, 7, 4)  # 3 frames a segment: 0 1 2 | 3 4 | 5 6
  cos, sin = map(np.asarray, _mixer_rope_tables(cfg, layout, 16, (2, 2)))
  want_cos, want_sin = rope_3d(16, 7, 2, 2, 2, 2)
  video = ~layout.is_text_np
  np.testing.assert_allclose(cos[video], want_cos, atol=1e-6)  # frames 0..6 in order
  np.testing.assert_allclose(sin[video], want_sin, atol=1e-6)
  np.testing.assert_array_equal(cos[~video], 1.0)
  np.testing.assert_array_equal(sin[~video], 0.0)
  attn_cos = np.asarray(_rope_tables(cfg, layout, 16, (2, 2), canonical=True)[0])
  frame = lambda f: layout.video_index[f * 4:(f + 1) * 4]
  np.testing.assert_allclose(attn_cos[frame(3)], attn_cos[frame(1)])  # attention restarts
  assert np.abs(cos[frame(3)] - cos[frame(1)]).max() > 0.1         # the mixers do not


def _analytic_params(c):
  """CogVideoXTransformer3DModel parameter count from its config."""
  w, t, p = c["num_attention_heads"] * c["attention_head_dim"], c["time_embed_dim"], c["patch_size"]
  lin = lambda i, o: i * o + o
  block = (2 * (lin(t, 6 * w) + 2 * w) + 4 * lin(w, w) + 4 * c["attention_head_dim"]
           + lin(w, 4 * w) + lin(4 * w, w))
  top = (lin(c["in_channels"] * p * p, w) + lin(c["text_embed_dim"], w) + lin(w, t) + lin(t, t)
         + 2 * w + lin(t, 2 * w) + 2 * w + lin(w, c["out_channels"] * p * p))
  return c["num_layers"] * block + top


@pytest.mark.parametrize("mixer", ["none", "ttt_mlp"])
def test_cogvideox_5b_traces_in_a_minute_with_its_parameter_count(mixer):
  cfg = DiTConfig.from_diffusers(COGVIDEOX_5B, mixer=mixer)
  assert cfg == cogvideox_5b(mixer=mixer)
  start = time.time()
  try:
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  except ImportError as e:  # the TTT layer lands separately
    pytest.skip(f"mixer {mixer} not importable: {e}")
  n = mixers.count_params(model)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(
      lambda s, *a: nnx.merge(graphdef, s)(*a), state,
      jax.ShapeDtypeStruct((1, 13, 16, 60, 90), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, 226, 4096), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32))
  elapsed = time.time() - start
  print(f"CogVideoX-5B + {mixer}: {n} parameters, traced in {elapsed:.1f} s")
  assert out.shape == (1, 13, 16, 60, 90)
  assert elapsed < 60
  with torch.device("meta"):
    reference = CogVideoXTransformer3DModel(**COGVIDEOX_5B)
  backbone = sum(p.numel() for p in reference.parameters())
  assert backbone == _analytic_params(COGVIDEOX_5B)
  assert 5.5e9 < backbone < 5.65e9
  mixer_params = mixers.count_params(nnx.eval_shape(
      lambda: mixers.build_mixer(mixer, cfg.width, cfg.num_heads, rngs=nnx.Rngs(0))))
  gates = 0 if mixer == "none" else 2 * 2 * cfg.width  # alpha, beta: [text/video, width]
  assert n == backbone + cfg.num_layers * (mixer_params + gates)


def test_gradient_matches_finite_differences(x64):
  """Scan + remat + segment split/merge + mixer gates: directional derivative, float64."""
  cfg = dataclasses.replace(SMALL, mixer="probe")
  model = DiT(cfg, rngs=nnx.Rngs(0), mixer_factory=probe_factory)
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  latents, text, t = _inputs(cfg, segments=2, grid=2)
  target = np.random.default_rng(1).standard_normal(latents.shape)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(latents, text, t) * target)

  grad = jax.jit(jax.grad(loss))(params)
  loss = jax.jit(loss)
  direction = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(a.size).standard_normal(a.shape)), params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                jax.tree.leaves(direction)))
  eps = 1e-6
  shifted = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, params, direction)
  numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
  assert float(jnp.abs(grad["blocks"]["alpha"]).max()) > 0


@pytest.mark.parametrize("remat,k", [("none", 1), ("full", 2)])
def test_unrolled_layers_equal_the_layer_scan(remat, k):
  """`unroll_layers` (the toy's 2 layers) is the scanned model's loss and gradients, with and
  without remat groups; TTT-MLP as the mixer."""
  cfg = dataclasses.replace(SMALL, num_layers=2, mixer="ttt_mlp", remat=remat,
                            remat_every_k_layers=k)
  graphdef, params = nnx.split(DiT(cfg, rngs=nnx.Rngs(0)))
  latents, text, t = _inputs(cfg, segments=2)

  def run(unroll):
    def loss(p):
      model = nnx.merge(graphdef, p)
      model.config = dataclasses.replace(cfg, unroll_layers=unroll)
      return jnp.mean(model(latents, text, t) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, grads = run(False)
  other_loss, other_grads = run(True)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               other_grads, grads)
  assert float(loss) > 0


def test_learned_positions_of_a_shorter_clip_are_the_tables_first_frames():
  """An image (one latent frame) or a shorter clip through a model whose learned table is sized
  for 3 frames gets the table's first rows: the same output as a model built for that length
  holding those rows. A cut that is not whole frames of one segment is refused."""
  long_cfg = dataclasses.replace(SMALL, use_learned_positional_embeddings=True,
                                 max_text_seq_length=3)
  long = DiT(long_cfg, rngs=nnx.Rngs(0))
  params = nnx.state(long, nnx.Param).to_pure_dict()
  for frames in (1, 2):
    short = DiT(dataclasses.replace(long_cfg, sample_frames=4 * frames - 3),
                rngs=nnx.Rngs(1))
    rows = 3 + frames * 4  # text rows, then 2x2 tokens a frame
    nnx.update(short, {**params, "pos_embedding": params["pos_embedding"][:rows]})
    latents, text, t = _inputs(long_cfg, segments=1, frames_per_segment=frames)
    np.testing.assert_allclose(long(latents, text, t), short(latents, text, t), rtol=1e-5,
                               atol=1e-6)
  latents, text, t = _inputs(long_cfg, segments=2, frames_per_segment=2)
  with pytest.raises(ValueError, match="fix the segment size to 15 tokens, got 11"):
    long(latents, text, t)


@pytest.fixture(scope="module")
def plain_backbone():
  """A mixer-free model's parameters and its output (one compile for all mixers)."""
  model = DiT(SMALL, rngs=nnx.Rngs(0))
  latents, text, t = _inputs(SMALL, segments=2)
  out = nnx.jit(lambda m, *a: m(*a))(model, latents, text, t)
  return nnx.state(model, nnx.Param).to_pure_dict(), (latents, text, t), out


@pytest.mark.parametrize("name", [m for m in mixers.MIXERS if m != "none"])
def test_real_mixer_with_zero_gates_is_the_plain_backbone(name, plain_backbone):
  """Every mixer of ttt_jax.mixers plugs in; with α = β = 0 the block is CogVideoX's."""
  backbone, inputs, reference = plain_backbone
  cfg = dataclasses.replace(SMALL, mixer=name)
  try:
    model = DiT(cfg, rngs=nnx.Rngs(1))
  except ImportError as e:  # the TTT layer lands separately
    pytest.skip(f"mixer {name} not importable: {e}")
  params = nnx.state(model, nnx.Param)
  pure = params.to_pure_dict()
  pure = {**backbone, "blocks": {**pure["blocks"], **backbone["blocks"],
                                 "alpha": jnp.zeros_like(pure["blocks"]["alpha"]),
                                 "beta": jnp.zeros_like(pure["blocks"]["beta"])}}
  params.replace_by_pure_dict(pure)
  nnx.update(model, params)
  gated_off = nnx.jit(lambda m, *a: m(*a))(model, *inputs)
  np.testing.assert_allclose(gated_off, reference, rtol=1e-5, atol=1e-5)


def test_chunked_attention_matches_and_its_memory_is_linear_in_length():
  from ttt_jax.models.layers import attention, chunked_attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (2, 100, 3, 8)) for key in keys[:3])
  dy = jax.random.normal(keys[3], q.shape)
  loss = lambda fn: lambda q, k, v: jnp.vdot(fn(q, k, v), dy)
  chunked = lambda q, k, v: chunked_attention(q, k, v, 32)  # 100 = 3 chunks + 4 padded rows
  np.testing.assert_allclose(chunked(q, k, v), attention(q, k, v), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(chunked), (0, 1, 2))(q, k, v),
                       jax.grad(loss(attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def temp_bytes(fn, seq):  # compiled forward + backward, one head of width 8
    x = jax.ShapeDtypeStruct((1, seq, 1, 8), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  full = [temp_bytes(attention, n) for n in (1024, 2048)]
  linear = [temp_bytes(lambda q, k, v: chunked_attention(q, k, v, 128), n) for n in (1024, 2048)]
  assert full[1] > 3.5 * full[0]       # [seq, seq] scores: quadratic
  assert linear[1] < 2.5 * linear[0]   # [128, seq] scores per chunk: linear
  assert linear[1] < full[1] / 4


@pytest.mark.parametrize("seq, heads, dim", [(100, 3, 16), (256, 2, 8), (600, 1, 8)])
def test_splash_attention_matches_xla_attention(seq, heads, dim):
  """Splash (interpreted on CPU): 100 tokens pad to one 128-token tile with the padded keys
  masked; 256 are one tile without padding; 600 pad to 2 x 2 tiles of 512, the last keys'
  partly masked."""
  from ttt_jax.models.layers import attention, splash_attention  # pylint: disable=g-import-not-at-top
  q, k, v, dy = (jax.random.normal(key, (2, seq, heads, dim))
                 for key in jax.random.split(jax.random.key(0), 4))
  np.testing.assert_allclose(jax.jit(splash_attention)(q, k, v), attention(q, k, v), rtol=1e-5,
                             atol=1e-6)
  loss = lambda fn: lambda q, k, v: jnp.vdot(fn(q, k, v), dy)
  for got, want in zip(jax.jit(jax.grad(loss(splash_attention), (0, 1, 2)))(q, k, v),
                       jax.grad(loss(attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_dit_attention_impl_matches_xla_attention(impl):
  cfg = DiTConfig(num_heads=2, head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                  text_embed_dim=32, time_embed_dim=16, sample_height=4, sample_width=6,
                  max_text_seq_length=10, mixer="ttt_mlp",
                  mixer_options=(("mini_batch_size", 16),))
  latents = jax.random.normal(jax.random.key(1), (1, 25, 4, 4, 6))   # 2 segments of 48 + 10
  text = jax.random.normal(jax.random.key(2), (1, 2, 10, 32))
  outs = [DiT(dataclasses.replace(cfg, attention_impl=name, attention_query_chunk=16),
              rngs=nnx.Rngs(0))(latents, text, jnp.array([500])) for name in ("xla", impl)]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(mixers.MIXERS))
def test_first_segment_text_reaches_the_last_segment_only_through_the_mixer(name):
  """Attention is local: a segment's text reaches its own frames and, one block later, the frame
  it shares with the next segment, so with two blocks segment 3 cannot see text 1. Only the mixer
  carries it there: the path every fact stated once (toy_toons' room, colours, shapes) needs."""
  cfg = dataclasses.replace(SMALL, mixer=name, mixer_gate_init=1.0)
  try:
    model = DiT(cfg, rngs=nnx.Rngs(0))
  except ImportError as e:
    pytest.skip(f"mixer {name} not importable: {e}")
  latents, text, t = _inputs(cfg, segments=3)  # frames 0-2 | 3-4 | 5-6 (2 and 4 shared)
  other = text.copy()
  other[:, 0] = np.random.default_rng(1).standard_normal(other[:, 0].shape)
  run = nnx.jit(lambda m, *a: m(*a))
  change = np.abs(np.asarray(run(model, latents, text, t) - run(model, latents, other, t)))
  first, last = change[:, :2].mean(), change[:, 5:].mean()
  assert first > 1e-3
  if name == "none":
    assert last == 0.0
  else:
    assert last > 1e-3 * first, (name, first, last)
