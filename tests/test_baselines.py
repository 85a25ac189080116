"""The paper's baselines from a config string: options per mixer, parameter matching, RoPE in
the sliding window, and every mixer through every stage's :runlocal with hand-off."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.mixers import MIXER_OPTIONS
from test_training_loop import FakeLoader  # pylint: disable=g-bad-import-order
from ttt_jax import training
from ttt_jax.mixers import MIXERS, build_mixer, count_params
from ttt_jax.parallel import mesh as mesh_lib

STAGES = [3, 9, 18, 30, 63]


def _load(seconds, arg=None):
  return importlib.import_module(f"configs.tomjerry_{seconds}s").get_config(arg)


def _np_rope(x, cos, sin):
  """Pairs as complex numbers times e^{i theta}."""
  c = (x[..., 0::2] + 1j * x[..., 1::2]) * (cos[:, None, 0::2] + 1j * sin[:, None, 0::2])
  return np.stack([c.real, c.imag], axis=-1).reshape(x.shape)


def _rope(seq, head_dim, seed):
  theta = np.random.default_rng(seed).uniform(0, 6.3, (seq, head_dim // 2))
  theta[:3] = 0.0  # text rows: no rotation
  return np.repeat(np.cos(theta), 2, -1), np.repeat(np.sin(theta), 2, -1)


def test_the_table_covers_every_mixer():
  assert tuple(MIXER_OPTIONS) == MIXERS


def test_matched_baselines_are_as_large_as_ttt_mlp_at_paper_and_local_size():
  """param_budget="ttt_mlp": Mamba 2 and Gated DeltaNet within 1% of the TTT-MLP layer."""
  counts = {}
  for arg in (None, "runlocal"):
    model = _load(3, arg).model
    width, heads = model.num_heads * model.head_dim, model.num_heads
    for name in MIXERS[1:]:
      options = dict(_load(3, f"{arg or ''},mixer={name}").model.mixer_options)
      counts[arg, name] = count_params(nnx.eval_shape(
          lambda name=name, options=options: build_mixer(name, width, heads,
                                                         rngs=nnx.Rngs(0), **options)))
    for name in ("mamba2", "gated_deltanet"):
      assert abs(counts[arg, name] / counts[arg, "ttt_mlp"] - 1) < 0.01, (arg, name, counts)
  print("\nparameters per layer (paper size):",
        {name: counts[None, name] for name in MIXERS[1:]})
  assert counts[None, "ttt_mlp"] == 39_509_040  # README "Recipe"


def test_swa_rotates_q_and_k_inside_the_window():
  """Against full attention with q, k rotated by hand and a |i - j| <= window // 2 mask."""
  width, heads, seq, window = 32, 2, 23, 8
  swa = build_mixer("swa", width, heads, rngs=nnx.Rngs(0), window=window)
  x = np.random.default_rng(0).standard_normal((2, seq, width)).astype(np.float32)
  rope = _rope(seq, width // heads, 1)
  out = np.asarray(swa(jnp.asarray(x), rope=tuple(map(jnp.asarray, rope))))

  shaped = lambda a: a.reshape(2, seq, heads, -1)
  q = _np_rope(np.asarray(swa.q_norm(swa.q_proj(jnp.asarray(x)).reshape(2, seq, heads, -1))),
               *rope)
  k = _np_rope(np.asarray(swa.k_norm(swa.k_proj(jnp.asarray(x)).reshape(2, seq, heads, -1))),
               *rope)
  v = shaped(np.asarray(swa.v_proj(jnp.asarray(x))))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // heads)
  near = np.abs(np.arange(seq)[:, None] - np.arange(seq)[None]) <= window // 2
  logits = np.where(near, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attended = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, seq, width)
  want = np.asarray(swa.o_proj(jnp.asarray(attended, jnp.float32)))
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  assert np.abs(out - np.asarray(swa(jnp.asarray(x)))).max() > 1e-3  # positions matter
  # reverse: the same layer right to left, each token keeping its own rotation.
  flipped = np.asarray(swa(jnp.asarray(x[:, ::-1]),
                           rope=tuple(jnp.asarray(r[::-1]) for r in rope)))[:, ::-1]
  np.testing.assert_allclose(np.asarray(swa(jnp.asarray(x), rope=tuple(map(jnp.asarray, rope)),
                                            reverse=True)), flipped, rtol=1e-5, atol=1e-5)


def test_swa_window_is_8192_tokens_and_about_six_frames_locally():
  assert _load(63, "mixer=swa").model.mixer_options.window == 8192
  local = _load(63, "runlocal,mixer=swa")
  tokens_per_frame = (local.model.sample_height // 2) * (local.model.sample_width // 2)
  assert round(8192 / 1350) == round(local.model.mixer_options.window / tokens_per_frame) == 6


@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "ttt_mlp"])
def test_every_stage_trains_and_hands_off_with(mixer, tmp_path):
  """Each stage's `:runlocal,mixer=<name>` trains two steps from the previous stage's
  parameters (ttt_mlp, the default, is test_training_loop's sequence)."""
  previous = None
  for seconds in STAGES:
    c = _load(seconds, f"runlocal,mixer={mixer}")
    c.train.update(steps=2, checkpoint_every=2)
    if previous:
      c.init_from = previous
    out = training.train(c, str(tmp_path / c.stage), loader=FakeLoader(c),
                         mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]))
    assert out["step"] == 2 and np.isfinite(out["last"]["loss"]), (seconds, out)
    assert out["initialised_fresh"] == []
    previous = out["workdir"]
  from ttt_jax.models.dit_convert import load_dit  # pylint: disable=g-import-not-at-top
  assert load_dit(os.path.join(previous, "model")).config.mixer == mixer
