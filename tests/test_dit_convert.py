"""CogVideoX import: a tiny random diffusers CogVideoXTransformer3DModel vs our converted DiT."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from flax import nnx
from safetensors.torch import save_file

from ttt_jax import convert
from ttt_jax.models import dit_convert
from ttt_jax.models.dit import DiT, DiTConfig
from test_dit import probe_factory  # pylint: disable=g-bad-import-order

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_embed_dim=16, time_embed_dim=8, num_layers=2, sample_frames=9,
            sample_height=4, sample_width=6, max_text_seq_length=3,
            use_rotary_positional_embeddings=True)


def _diffusers_model(tmp_path, seed=0, **overrides):
  torch.manual_seed(seed)
  model = CogVideoXTransformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # adaLN / norms start at identity-ish values; randomise everything
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  src = tmp_path / "src"
  model.save_pretrained(src)
  return model, str(src)


def _diffusers_rope(model, frames, grid_h, grid_w):
  cfg = model.config
  base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
  if cfg.patch_size_t is None:
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (grid_h, grid_w), frames)
  return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (grid_h, grid_w), frames,
                                 grid_type="slice", max_size=(base_h, base_w))


def _inputs(frames, height, width, text_len=3, segments=1, seed=1):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, frames, 4, height, width)).astype(np.float32)
  text = rng.standard_normal((2, segments, text_len, 16)).astype(np.float32)
  return latents, text, np.array([3.0, 700.0], np.float32)


def _reference(model, latents, text, t, ofs=None):
  cfg = model.config
  p, pt = cfg.patch_size, cfg.patch_size_t or 1
  rope = None
  if cfg.use_rotary_positional_embeddings:
    rope = _diffusers_rope(model, latents.shape[1] // pt, latents.shape[3] // p,
                           latents.shape[4] // p)
  with torch.no_grad():
    out = model(torch.from_numpy(latents), torch.from_numpy(text[:, 0]), torch.from_numpy(t),
                ofs=None if ofs is None else torch.from_numpy(ofs), image_rotary_emb=rope,
                return_dict=False)[0]
  return out.numpy()


def _ours(dst, latents, text, t, ofs=None, **kw):
  model = dit_convert.load_dit(dst, **kw)
  return np.asarray(nnx.jit(lambda m, *a: m(*a))(model, latents, text, t, ofs)), model


@pytest.mark.parametrize("case", [
    dict(use_rotary_positional_embeddings=True, frames=3, height=4, width=6),
    dict(use_rotary_positional_embeddings=True, frames=3, height=4, width=4),  # crop grid
    dict(use_rotary_positional_embeddings=False, frames=3, height=4, width=6),  # 2B sin-cos
    # CogVideoX 1.5-I2V: temporal patches and the ofs embedding.
    dict(use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=8, frames=4,
         height=4, width=6),
    # CogVideoX-5B-I2V: learned positional embedding (plus RoPE).
    dict(use_learned_positional_embeddings=True, frames=3, height=4, width=6),
])
def test_converted_model_matches_diffusers(tmp_path, case):
  case = dict(case)
  shape = case.pop("frames"), case.pop("height"), case.pop("width")
  model, src = _diffusers_model(tmp_path, **case)
  latents, text, t = _inputs(*shape)
  ofs = np.array([2.0, 1.0], np.float32) if case.get("ofs_embed_dim") else None
  convert.main(["cogvideox", "--src", src, "--dst", str(tmp_path / "dst")])
  ours, dit = _ours(str(tmp_path / "dst"), latents, text, t, ofs)
  assert dit.config.num_layers == 2 and dit.config.mixer == "none"
  ref = _reference(model, latents, text, t, ofs)
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("mixer", ["probe", "ttt_mlp"])
def test_mixer_with_zero_gates_reproduces_cogvideox(tmp_path, mixer):
  model, src = _diffusers_model(tmp_path)
  dst = str(tmp_path / "dst")
  factory = probe_factory if mixer == "probe" else dit_convert.default_mixer_factory
  cfg = dit_convert.convert_cogvideox(src, dst, mixer=mixer, mixer_factory=factory)
  assert cfg.mixer_gate_init == 0.1
  latents, text, t = _inputs(3, 4, 6)
  ours, dit = _ours(dst, latents, text, t, mixer_factory=factory)
  ref = _reference(model, latents, text, t)
  assert np.abs(ours - ref).max() > 1e-4  # the mixer is live at the 0.1 init
  dit.blocks.alpha[...] = jnp.zeros(dit.blocks.alpha.shape)
  dit.blocks.beta[...] = jnp.zeros(dit.blocks.beta.shape)
  zeroed = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, latents, text, t))
  np.testing.assert_allclose(zeroed, ref, rtol=2e-4, atol=2e-4)


def _torch_probe(x, w, heads, cos, sin):
  """ProbeMixer in torch, RoPE by diffusers' apply_rotary_emb."""
  from diffusers.models.embeddings import apply_rotary_emb
  h = x @ w
  h = apply_rotary_emb(h.reshape(*h.shape[:2], heads, -1), (cos, sin),
                       sequence_dim=1).reshape(h.shape)
  return h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]


def _torch_long_video(model, latents, text, t, mixer_w, alpha, beta):
  """Naive S-segment forward from diffusers' own block modules, one frame at a time.

  Frame f of segment s is token frame s*(n-1)+k; attention per segment; the overlap frame's
  two attention outputs averaged; the mixer sees [text_s, frames first owned by s] for s in
  order, each frame with the RoPE of its global index f (not restarting per segment). The
  reverse mixer pass, as the public reference orders it: [text_s, frames last owned by s, last
  to first, each frame's tokens reversed] for s from last to first, read with the forward
  pass's RoPE table position by position.
  """
  cfg = model.config
  batch, frames, chans, height, width = latents.shape
  segments, p, heads = text.shape[1], cfg.patch_size, cfg.num_attention_heads
  n, gh, gw = (frames - 1) // segments + 1, height // p, width // p
  hw = gh * gw
  cos, sin = _diffusers_rope(model, n, gh, gw)
  hd = cos.shape[1]
  owner = lambda f: (0, f) if f == 0 else ((f - 1) // (n - 1), f - (f - 1) // (n - 1) * (n - 1))
  with torch.no_grad():
    temb = model.time_embedding(model.time_proj(torch.from_numpy(t)))
    vid = model.patch_embed.proj(torch.from_numpy(latents).reshape(-1, chans, height, width))
    vid = vid.reshape(batch, frames, -1, hw).transpose(2, 3)  # [b, F, hw, w]
    fr = [vid[:, f] for f in range(frames)]
    tx = [model.patch_embed.text_proj(torch.from_numpy(text[:, s])) for s in range(segments)]
    order = []  # mixer order: ("t", s) or ("f", f)
    for s in range(segments):
      order.append(("t", s))
      order += [("f", f) for f in range(frames) if owner(f)[0] == s]
    eye_c, zero_s = torch.ones(text.shape[2], hd), torch.zeros(text.shape[2], hd)
    g_cos, g_sin = _diffusers_rope(model, frames, gh, gw)  # every frame, by global index
    m_cos = torch.cat([eye_c if k == "t" else g_cos[i * hw:(i + 1) * hw] for k, i in order])
    m_sin = torch.cat([zero_s if k == "t" else g_sin[i * hw:(i + 1) * hw] for k, i in order])
    last_owner = lambda f: min(f // (n - 1), segments - 1)  # overlap frame -> later segment
    reverse = []
    for s in reversed(range(segments)):
      reverse.append(("t", s))
      reverse += [("f", f) for f in reversed(range(frames)) if last_owner(f) == s]
    for layer, block in enumerate(model.transformer_blocks):
      att_f = {f: [] for f in range(frames)}
      att_t, gates = [], None
      for s in range(segments):
        hid = torch.cat([fr[s * (n - 1) + k] for k in range(n)], 1)
        nh, ne, gate, egate = block.norm1(hid, tx[s], temb)
        ah, ae = block.attn1(hidden_states=nh, encoder_hidden_states=ne,
                             image_rotary_emb=(cos, sin))
        for k in range(n):
          att_f[s * (n - 1) + k].append(ah[:, k * hw:(k + 1) * hw])
        att_t.append(ae)
        gates = gate, egate
      xp = {("f", f): torch.stack(v).mean(0) for f, v in att_f.items()}
      xp.update({("t", s): a for s, a in enumerate(att_t)})
      seq = torch.cat([xp[o] for o in order], 1)
      kind = [k for k, i in order for _ in range(xp[(k, i)].shape[1])]
      pick = lambda g: torch.stack([torch.tanh(g[1] if k == "t" else g[0]) for k in kind])
      w = torch.tensor(np.array(mixer_w[layer]))
      seq = seq + pick(alpha[layer]) * _torch_probe(seq, w, heads, m_cos, m_sin)
      parts, pos = {}, 0
      for k, i in order:
        parts[(k, i)] = seq[:, pos:pos + xp[(k, i)].shape[1]]
        pos += xp[(k, i)].shape[1]
      rev = torch.cat([parts[o] if o[0] == "t" else parts[o].flip(1) for o in reverse], 1)
      out = _torch_probe(rev, w, heads, m_cos, m_sin)
      back, pos = {}, 0
      for k, i in reverse:
        size = xp[(k, i)].shape[1]
        back[(k, i)] = out[:, pos:pos + size] if k == "t" else out[:, pos:pos + size].flip(1)
        pos += size
      seq = seq + pick(beta[layer]) * torch.cat([back[o] for o in order], 1)
      pos = 0
      for k, i in order:
        size = xp[(k, i)].shape[1]
        if k == "t":
          tx[i] = tx[i] + gates[1] * seq[:, pos:pos + size]
        else:
          fr[i] = fr[i] + gates[0] * seq[:, pos:pos + size]
        pos += size
      all_f, all_t = torch.cat(fr, 1), torch.cat(tx, 1)
      nh, ne, gate, egate = block.norm2(all_f, all_t, temb)
      all_f, all_t = all_f + gate * block.ff(nh), all_t + egate * block.ff(ne)
      fr = list(all_f.reshape(batch, frames, hw, -1).unbind(1))
      tx = list(all_t.reshape(batch, segments, -1, all_t.shape[-1]).unbind(1))
    h = model.proj_out(model.norm_out(model.norm_final(torch.cat(fr, 1)), temb=temb))
    out = h.reshape(batch, frames, gh, gw, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, frames, -1, height, width).numpy()


@pytest.mark.parametrize("segments", [2, 3])
def test_long_video_matches_naive_segment_loop(tmp_path, segments):
  """Local attention per segment, overlap averaging, interleaved mixer order and RoPE
  alignment, against a per-frame construction from diffusers' modules."""
  model, src = _diffusers_model(tmp_path)
  dst = str(tmp_path / "dst")
  factory = probe_factory
  dit_convert.convert_cogvideox(src, dst, mixer="probe", mixer_factory=factory)
  frames = 1 + 2 * segments  # 3 token frames per segment
  latents, text, t = _inputs(frames, 4, 6, segments=segments)
  dit = dit_convert.load_dit(dst, mixer_factory=factory)
  rng = np.random.default_rng(3)
  dit.blocks.alpha[...] = jnp.asarray(rng.uniform(-1, 1, dit.blocks.alpha.shape), jnp.float32)
  dit.blocks.beta[...] = jnp.asarray(rng.uniform(-1, 1, dit.blocks.beta.shape), jnp.float32)
  ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, latents, text, t))
  state = jax.tree.map(np.asarray, nnx.state(dit, nnx.Param).to_pure_dict())
  blocks = state["blocks"]
  ref = _torch_long_video(model, latents, text, t, blocks["mixer"]["w"],
                          torch.tensor(blocks["alpha"]), torch.tensor(blocks["beta"]))
  np.testing.assert_allclose(ours, ref, rtol=5e-4, atol=5e-4)


def test_unknown_and_missing_keys_are_reported(tmp_path):
  model, src = _diffusers_model(tmp_path)
  config, state = dit_convert.read_diffusers(src)
  cfg = DiTConfig.from_diffusers(config)
  state = dict(state)
  state["transformer_blocks.0.attn1.extra.weight"] = np.zeros(3, np.float32)
  del state["proj_out.bias"]
  with pytest.raises(ValueError, match=r"(?s)extra\.weight.*proj_out/bias"):
    dit_convert.convert_params(cfg, state)


def test_sharded_bf16_checkpoint(tmp_path):
  """A sharded index and bf16 tensors (the released weights' format) read back exactly."""
  model, _ = _diffusers_model(tmp_path)
  sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
        if k != "patch_embed.pos_embedding"}
  src = tmp_path / "sharded"
  src.mkdir()
  names = sorted(sd)
  shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  weight_map = {}
  for file, keys in shards.items():
    save_file({k: sd[k] for k in keys}, str(src / file))
    weight_map.update({k: file for k in keys})
  (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"weight_map": weight_map}))
  (src / "config.json").write_text(json.dumps(dict(model.config)))
  _, state = dit_convert.read_diffusers(str(src))
  assert sorted(state) == names
  for k in names:
    np.testing.assert_array_equal(np.asarray(state[k], np.float32), sd[k].float().numpy())


def test_learned_positional_table_starts_as_diffusers_does():
  """Before training, the learned table is diffusers' own initial value: zeros on the text
  rows, the 3D sin-cos table on the video rows (the toy job trains it from there)."""
  torch.manual_seed(0)
  ref = CogVideoXTransformer3DModel(**{**TINY, "use_learned_positional_embeddings": True})
  want = ref.patch_embed.pos_embedding.detach().numpy()[0]
  ours = DiT(DiTConfig(
      num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_embed_dim=16,
      time_embed_dim=8, num_layers=1, sample_frames=9, sample_height=4, sample_width=6,
      max_text_seq_length=3, use_learned_positional_embeddings=True), rngs=nnx.Rngs(0))
  assert want.shape == (3 + 2 * 3 * 3, 32) and np.abs(want[3:]).max() > 0.5
  np.testing.assert_allclose(np.asarray(ours.pos_embedding[...]), want, atol=1e-6)
