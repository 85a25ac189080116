"""The video DiT: CogVideoX's transformer with gated bidirectional sequence mixers.

With one segment and mixer "none" this is diffusers' `CogVideoXTransformer3DModel` (same
weights, same numbers). The paper's changes (../shared/PAPER.md, "Where TTT sits", "Long video
layout"):

* A video of S segments: segment i covers token frames i·(n−1) … i·(n−1)+n−1 (n = 13 for a
  3-second CogVideoX clip), so consecutive segments share one overlap frame; each segment has its
  own text block.
* The model keeps ONE sequence, interleaved and free of duplicates:
  [text_1, frames of segment 1, text_2, frames of segment 2 not already seen, ...].
  The overlap frame is stored once, in the earlier segment. This is the order the sequence mixers
  see, so everything a mixer computes per token (TTT's inner learning rate, its RoPE) is computed
  from, and stays aligned with, that token. The public reference does not do this for η: it
  computes η on its [all texts; all video] order and then interleaves the η tensor
  [mini-batches, mini_batch_size (repeats), tokens] along the repeat axis instead of the token
  axis, so a mini-batch steps with another mini-batch's learning rates (PAPER.md, "inner
  learning rates misaligned after interleaving"). We differ on purpose.
* Inside the mixers RoPE does not restart per segment: video tokens are rotated by their global
  latent-frame index (0 ... 252 at 63 s) and their (row, column), as the reference rotates TTT's
  Q and K, so frame k of segment 2 and frame k of segment 5 are told apart.
* Local attention: every block gathers [text_i; its n frames] for each segment (the overlap frame
  is copied into both segments), runs attention per segment with RoPE restarting at frame 0, and
  merges back, averaging the two outputs of the overlap frame. Merging in every block (rather
  than only at the output) keeps the two copies from drifting apart and lets the mixer see each
  frame once; tests/test_dit_convert.py checks this against a naive per-frame loop.
* Sequence-modelling block: X' = attn(adaLN(X)); Z = X' + tanh(α)·M(X');
  Z' = Z + tanh(β)·M(reverse(Z)) reversed back; out = X + gate·Z'; then the MLP sub-block.
  reverse() is the reference's, not a flip of the whole sequence: segments in reverse order, each
  segment's text first and un-reversed, then its video tokens reversed (frames last to first,
  and the tokens of a frame reversed too, as torch.flip of the video does):
  [text_S, video_S reversed, text_{S-1}, video_{S-1} reversed, ...]. The overlap frame now falls
  in the later segment, so the reversed sequence has the same shape as the forward one (text
  rows, frame counts per segment) and the mixer reads it with the same RoPE table, by position
  in the sequence, as the reference's reverse pass does. A whole-sequence flip would put each
  text after its video, and the reverse pass could not condition video_i on text_i.
  α, β are per-channel, separate for text and video tokens, initialised to `mixer_gate_init`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.mixers.common import layer_norm, linear
from ttt_jax.models.layers import (Attention, ExpertAdaLN, FeedForward, Rope, TimestepEmbedding,
                                   select_by_type)
from ttt_jax.models.rope import rope_3d, sincos_3d, timestep_embedding
from ttt_jax.parallel.mesh import constrain, partitioned

MixerFactory = Callable[..., nnx.Module | None]
# The residual stream [batch, seq, width]: batch over data x fsdp, sequence over context.
_STREAM = ("activation_batch", "activation_length", "activation_embed")


# What a block saves for the backward pass (`jax.checkpoint` policies), by `DiTConfig.remat`:
#   none       everything (no recomputation; the most memory)
#   full       only the block's input; the whole block is recomputed
#   save_dots  also the outputs of matmuls without batch dimensions (the projections and the
#              MLP), not attention's [queries x keys] scores, which are quadratic in length
#   offload    what save_dots saves, moved to pinned host memory (TPU/GPU hosts; the CPU
#              backend compiles it too, its "host" being the same memory)
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(remat: bool | str) -> str:
  """`DiTConfig.remat` as a REMAT_POLICIES name (True and False are the old "full", "none")."""
  name = {True: "full", False: "none"}[remat] if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r}: one of {', '.join(REMAT_POLICIES)} "
                     "(or True/False)")
  return name


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Backbone hyper-parameters (diffusers names where they exist) and the mixer fields."""
  num_heads: int = 48                # attention heads
  head_dim: int = 64                 # channels per head; width = num_heads * head_dim
  in_channels: int = 16              # latent channels
  out_channels: int = 16
  num_layers: int = 42
  time_embed_dim: int = 512
  text_embed_dim: int = 4096         # T5-v1.1-XXL
  ofs_embed_dim: int | None = None   # CogVideoX1.5-I2V "ofs" conditioning
  patch_size: int = 2
  patch_size_t: int | None = None    # CogVideoX 1.5 temporal patch
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  attention_bias: bool = True
  patch_bias: bool = True
  norm_eps: float = 1e-5
  norm_elementwise_affine: bool = True
  ff_inner_dim: int | None = None    # default 4 * width
  sample_height: int = 60            # latent size the model was trained at (RoPE crop grid)
  sample_width: int = 90
  sample_frames: int = 49            # pixel frames; latent = (sample_frames - 1) // 4 + 1
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = True   # 5B: RoPE; 2B: fixed sin-cos
  use_learned_positional_embeddings: bool = False  # 5B-I2V
  # Paper additions.
  mixer: str = "none"                # one of ttt_jax.mixers.MIXERS
  mixer_heads: int | None = None     # default num_heads
  mixer_options: tuple[tuple[str, Any], ...] = ()  # extra build_mixer kwargs, as pairs
  mixer_gate_init: float = 0.1       # α, β before tanh
  separate_reverse_mixer: bool = False  # True: M' has its own parameters
  local_attention: bool = True       # False: one attention over the whole video (RoPE
                                     # positions still restart per segment)
  attention_impl: str = "xla"        # "chunked": memory linear in segment length (any
                                     # backend); "cudnn": fused attention on NVIDIA GPUs;
                                     # "splash": flash kernels on TPU (layers.splash_attention)
  attention_query_chunk: int = 512   # queries per chunk of "chunked"
  remat: bool | str = True           # REMAT_POLICIES name; True = "full", False = "none"
  remat_every_k_layers: int = 1      # k > 1: save only every k-th block's input (below)
  unroll_layers: bool = False        # True: the layer scans unrolled (_run_blocks)
  dtype: str | None = None           # compute dtype (params stay float32)

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def mixer_head_dim(self) -> int:
    return self.width // (self.mixer_heads or self.num_heads)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> DiTConfig:
    """From a diffusers CogVideoXTransformer3DModel config.json dict."""
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
      raise ValueError(f"unsupported activation_fn {config['activation_fn']!r}")
    if config.get("timestep_activation_fn", "silu") != "silu":
      raise ValueError(f"unsupported timestep_activation_fn {config['timestep_activation_fn']!r}")
    renames = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim"}
    ignored = {"activation_fn", "timestep_activation_fn", "dropout"}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      key = renames.get(key, key)
      if key.startswith("_") or key in ignored:
        continue
      if key not in names:
        raise ValueError(f"unknown CogVideoX config field {key!r}")
      kwargs[key] = value
    if kwargs.get("out_channels") is None:
      kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
    return cls(**{**kwargs, **overrides})

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mixer_options"] = dict(self.mixer_options)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
    d = dict(d)
    d["mixer_options"] = tuple(sorted(d.get("mixer_options", {}).items()))
    return cls(**d)


def cogvideox_5b(**overrides: Any) -> DiTConfig:
  """CogVideoX-5B (THUDM/CogVideoX-5b transformer/config.json) plus mixer fields."""
  return dataclasses.replace(DiTConfig(), **overrides)


class Layout:
  """Static token layout of an S-segment video (numpy index tables, built from shapes).

  Canonical sequence: [text_1, frames 0..n-1, text_2, frames n..2n-2, ...], each frame once.
  """

  def __init__(self, segments: int, text_len: int, frames: int, tokens_per_frame: int):
    if segments < 1 or (frames - 1) % segments:
      raise ValueError(f"{frames} token frames cannot be cut into {segments} segments "
                       "sharing one overlap frame (need frames = 1 + segments * k)")
    self.segments, self.text_len, self.frames = segments, text_len, frames
    self.frames_per_segment = n = (frames - 1) // segments + 1
    self.tokens_per_frame = hw = tokens_per_frame
    self.seq_len = segments * text_len + frames * hw
    self.segment_len = text_len + n * hw
    source, seg_pos = [], []    # per canonical token: index into [texts; video], segment row
    text_start, frame_start = np.zeros(segments, np.int64), np.zeros(frames, np.int64)
    pos = 0
    for s in range(segments):
      text_start[s], pos = pos, pos + text_len
      source.append(s * text_len + np.arange(text_len))
      seg_pos.append(np.arange(text_len))
      for t in range(0 if s == 0 else 1, n):  # the overlap frame belongs to segment s - 1
        f = s * (n - 1) + t
        frame_start[f], pos = pos, pos + hw
        source.append(segments * text_len + f * hw + np.arange(hw))
        seg_pos.append(text_len + t * hw + np.arange(hw))
    self.source = np.concatenate(source)
    text_rows = segments * text_len
    # Per canonical token: its row of the text blocks, of the video tokens (0 where not one).
    self.text_source = np.where(self.source < text_rows, self.source, 0)
    self.video_source = np.maximum(self.source - text_rows, 0)
    self.segment_row = np.concatenate(seg_pos)   # [seq] row of its owning segment's tables
    self.is_text_np = self.source < segments * text_len
    self.gather = np.stack([np.concatenate(
        [text_start[s] + np.arange(text_len)]
        + [frame_start[s * (n - 1) + t] + np.arange(hw) for t in range(n)])
        for s in range(segments)])                # [S, segment_len]
    counts = np.bincount(self.gather.reshape(-1), minlength=self.seq_len)
    self.inv_count = (1.0 / counts).astype(np.float32)
    self.video_index = np.argsort(self.source)[segments * text_len:]  # [frames * hw]
    # The reverse pass's order (module docstring): canonical indices, [seq].
    reverse = []
    for s in reversed(range(segments)):
      reverse.append(text_start[s] + np.arange(text_len))
      top = s * (n - 1) + (n - 1 if s == segments - 1 else n - 2)  # the later segment's frame
      reverse += [frame_start[f] + np.arange(hw)[::-1] for f in range(top, s * (n - 1) - 1, -1)]
    self.reverse_order = np.concatenate(reverse)
    self.reverse_inverse = np.argsort(self.reverse_order)

  @property
  def is_text(self) -> jax.Array:
    return jnp.asarray(self.is_text_np)

  def assemble(self, text: jax.Array, video: jax.Array) -> jax.Array:
    """text [b, S, Lt, w], video [b, frames*hw, w] -> canonical [b, seq, w]."""
    return self.with_text(text, self.canonical_video(video))

  def canonical_video(self, video: jax.Array) -> jax.Array:
    """video tokens [b, frames*hw, c] -> [b, seq, c]: each at its canonical place, the text
    places holding a copy of the first video token (for `with_text` to overwrite). Applied to
    the patches before their projection, so that the residual stream is born in canonical
    order, split over context, and never gathered whole."""
    return video[:, self.video_source]

  def with_text(self, text: jax.Array, x: jax.Array) -> jax.Array:
    """text [b, S, Lt, w] written over the text places of canonical x [b, seq, w]; the text,
    S·Lt tokens, is small enough to sit whole on every device."""
    flat = text.reshape(text.shape[0], -1, text.shape[-1])
    return jnp.where(self.is_text[None, :, None], flat[:, self.text_source], x)

  def reverse(self, x: jax.Array) -> jax.Array:
    """canonical [b, seq, w] -> the reverse pass's order [b, seq, w]."""
    return x[:, self.reverse_order]

  def unreverse(self, x: jax.Array) -> jax.Array:
    """The reverse pass's order [b, seq, w] -> canonical [b, seq, w]."""
    return x[:, self.reverse_inverse]

  def video(self, x: jax.Array) -> jax.Array:
    """canonical [b, seq, w] -> video tokens [b, frames*hw, w] in (frame, h, w) order."""
    return x[:, self.video_index]

  def split(self, x: jax.Array) -> jax.Array:
    """canonical [b, seq, ...] -> per-segment [b, S, segment_len, ...] (overlap frames
    copied)."""
    if self.segments == 1:
      return x[:, None]
    return x[:, self.gather]

  def merge(self, y: jax.Array) -> jax.Array:
    """per-segment [b, S, segment_len, ...] -> canonical [b, seq, ...], overlap copies
    averaged."""
    if self.segments == 1:
      return y[:, 0]
    rest = y.shape[3:]
    out = jnp.zeros((y.shape[0], self.seq_len, *rest), y.dtype)
    out = out.at[:, self.gather.reshape(-1)].add(y.reshape(y.shape[0], -1, *rest))
    return out * self.inv_count.reshape(-1, *(1,) * len(rest)).astype(y.dtype)

  def segment_table(self, video_rows: np.ndarray, text_row: np.ndarray) -> np.ndarray:
    """A per-position table for one segment: [n*hw, d] video rows -> [segment_len, d]."""
    return np.concatenate([np.broadcast_to(text_row, (self.text_len, video_rows.shape[-1])),
                           video_rows])

  def canonical_table(self, segment_table: np.ndarray) -> np.ndarray:
    """[segment_len, d] -> [seq, d]: each token takes the row of the segment that owns it."""
    return segment_table[self.segment_row]


def _rope_tables(cfg: DiTConfig, layout: Layout, head_dim: int, grid: tuple[int, int],
                 canonical: bool) -> Rope:
  """Attention's RoPE (cos, sin), restarting per segment, identity on text:
  [segment_len, head_dim], or [seq, head_dim] when `canonical`."""
  p = cfg.patch_size
  cos, sin = rope_3d(head_dim, layout.frames_per_segment, *grid, cfg.sample_height // p,
                     cfg.sample_width // p, slice_grid=cfg.patch_size_t is not None)
  tables = [layout.segment_table(cos, np.ones(head_dim, np.float32)),
            layout.segment_table(sin, np.zeros(head_dim, np.float32))]
  if canonical:
    tables = [layout.canonical_table(t) for t in tables]
  return jnp.asarray(tables[0]), jnp.asarray(tables[1])


def _mixer_rope_tables(cfg: DiTConfig, layout: Layout, head_dim: int,
                       grid: tuple[int, int]) -> Rope:
  """The mixers' RoPE (cos, sin) [seq, head_dim]: video tokens by global latent-frame index,
  identity on text. Also the reverse pass's table, by position (module docstring)."""
  p = cfg.patch_size
  cos, sin = rope_3d(head_dim, layout.frames, *grid, cfg.sample_height // p,
                     cfg.sample_width // p, slice_grid=cfg.patch_size_t is not None)
  tables = [np.where(layout.is_text_np[:, None], np.float32(identity),
                     table[layout.video_source])
            for table, identity in ((cos, 1.0), (sin, 0.0))]
  return jnp.asarray(tables[0]), jnp.asarray(tables[1])


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every block needs besides its parameters."""
  layout: Layout
  is_text: jax.Array            # [seq] bool
  attn_rope: Rope | None          # [segment_len or seq, head_dim]
  mixer_rope: Rope                # [seq, mixer_head_dim], global frame index
  local_attention: bool


def default_mixer_factory(cfg: DiTConfig, rngs: nnx.Rngs) -> nnx.Module | None:
  """`ttt_jax.mixers.build_mixer` for cfg.mixer (imported here: mixers sit below models)."""
  from ttt_jax.mixers import build_mixer  # pylint: disable=g-import-not-at-top
  # The model's compute dtype, unless the options pick the mixer's own; every mixer keeps its
  # recurrent state (TTT's inner weights, SSM/delta-rule states) in float32 regardless.
  options = {"dtype": cfg.dtype, **dict(cfg.mixer_options)}
  return build_mixer(cfg.mixer, cfg.width, cfg.mixer_heads or cfg.num_heads, rngs=rngs,
                     **options)


class DiTBlock(nnx.Module):
  """CogVideoXBlock with the gated bidirectional sequence mixer after attention."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, mixer_factory: MixerFactory):
    w, dtype = cfg.width, cfg.dtype
    affine = cfg.norm_elementwise_affine
    self.norm1 = ExpertAdaLN(cfg.time_embed_dim, w, cfg.norm_eps, affine, rngs=rngs, dtype=dtype)
    self.attn1 = Attention(w, cfg.num_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
                           implementation=cfg.attention_impl,
                           query_chunk=cfg.attention_query_chunk, rngs=rngs, dtype=dtype)
    self.norm2 = ExpertAdaLN(cfg.time_embed_dim, w, cfg.norm_eps, affine, rngs=rngs, dtype=dtype)
    self.ff = FeedForward(w, cfg.ff_inner_dim or 4 * w, rngs=rngs, dtype=dtype)
    self.mixer = mixer_factory(cfg, rngs) if cfg.mixer != "none" else None
    self.mixer_reverse = (mixer_factory(cfg, rngs)
                          if self.mixer is not None and cfg.separate_reverse_mixer else None)
    if self.mixer is not None:
      gate_init = partitioned(nnx.initializers.constant(cfg.mixer_gate_init),
                                        (None, "embed"))
      # Row 0 gates video tokens, row 1 text tokens.
      self.alpha = nnx.Param(gate_init(rngs.params(), (2, w), jnp.float32))
      self.beta = nnx.Param(gate_init(rngs.params(), (2, w), jnp.float32))

  def _attend(self, x: jax.Array, ctx: _Context) -> jax.Array:
    return self.attn1(x, ctx.attn_rope, ctx.layout if ctx.local_attention else None)

  @staticmethod
  def _mix_reversed(mixer: nnx.Module, h: jax.Array, ctx: _Context) -> jax.Array:
    """unreverse(mixer(reverse(h))): [batch, seq, width] canonical -> same. A mixer that takes
    an `order` (TTT) permutes only the whole sequences of its heads, after its all-to-all;
    for the others the permutation is a gather of the residual stream, which XLA all-gathers
    when the stream is split over context."""
    layout = ctx.layout
    if getattr(mixer, "takes_order", False):
      return mixer(h, rope=ctx.mixer_rope, order=(layout.reverse_order, layout.reverse_inverse))
    return layout.unreverse(mixer(layout.reverse(h), rope=ctx.mixer_rope))

  def __call__(self, x: jax.Array, temb: jax.Array, ctx: _Context) -> jax.Array:
    """[batch, seq, width] canonical tokens -> same; temb [batch, time_embed_dim]."""
    normed, gate = self.norm1(x, temb, ctx.is_text)
    h = self._attend(normed, ctx)
    if self.mixer is not None:
      # The float32 gate parameters are cast to the compute dtype, so that they do not promote
      # a bf16 residual stream to float32 (the layer scan's carry keeps one dtype).
      tanh_gate = lambda g: select_by_type(ctx.is_text, jnp.tanh(g[1]),
                                           jnp.tanh(g[0])).astype(h.dtype)
      h = h + tanh_gate(self.alpha[...]) * self.mixer(h, rope=ctx.mixer_rope).astype(h.dtype)
      reverse_mixer = self.mixer_reverse or self.mixer
      h = h + tanh_gate(self.beta[...]) * self._mix_reversed(reverse_mixer, h, ctx).astype(h.dtype)
    x = constrain((x + gate * h).astype(x.dtype), _STREAM)
    normed, gate = self.norm2(x, temb, ctx.is_text)
    return constrain((x + gate * self.ff(normed)).astype(x.dtype), _STREAM)


class DiT(nnx.Module):
  """CogVideoXTransformer3DModel over S segments; layers stacked and run with nnx.scan."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs,
               mixer_factory: MixerFactory = default_mixer_factory):
    self.config = cfg
    w, dtype = cfg.width, cfg.dtype
    pt = cfg.patch_size_t or 1
    self.patch_proj = linear(cfg.in_channels * pt * cfg.patch_size ** 2, w, ("conv_in", "embed"),
                             use_bias=cfg.patch_bias or cfg.patch_size_t is not None,
                             rngs=rngs, dtype=dtype)
    self.text_proj = linear(cfg.text_embed_dim, w, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    if cfg.use_learned_positional_embeddings:
      if not cfg.use_rotary_positional_embeddings:
        raise ValueError("learned positional embeddings come only with RoPE (as in diffusers)")
      p = cfg.patch_size
      frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
      # As diffusers: zeros for the text rows, the 3D sin-cos table for the video rows, so that
      # training starts from absolute positions (RoPE alone gives only relative ones).
      table = np.concatenate([
          np.zeros((cfg.max_text_seq_length, w), np.float32),
          sincos_3d(w, frames, cfg.sample_height // p, cfg.sample_width // p,
                    cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale)])
      self.pos_embedding = nnx.Param(partitioned(
          lambda *_: jnp.asarray(table), ("length", "embed"))(rngs.params(), table.shape))
    self.time_embedding = TimestepEmbedding(w, cfg.time_embed_dim, rngs=rngs, dtype=dtype)
    self.ofs_embedding = (TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim, rngs=rngs,
                                            dtype=dtype) if cfg.ofs_embed_dim else None)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
      return DiTBlock(cfg, rngs=rngs, mixer_factory=mixer_factory)

    self.blocks = make_blocks(rngs)
    self.norm_final = layer_norm(w, cfg.norm_eps, affine=cfg.norm_elementwise_affine,
                                 rngs=rngs, dtype=dtype)
    self.norm_out_linear = linear(cfg.time_embed_dim, 2 * w, ("embed", "mlp"), rngs=rngs,
                                  dtype=dtype)
    self.norm_out = layer_norm(w, cfg.norm_eps, affine=cfg.norm_elementwise_affine, rngs=rngs,
                               dtype=dtype)
    self.proj_out = linear(w, cfg.out_channels * pt * cfg.patch_size ** 2, ("embed", "conv_out"),
                           rngs=rngs, dtype=dtype)

  def _positions(self, layout: Layout, grid: tuple[int, int]) -> jax.Array | None:
    """Additive positional embedding per segment [segment_len, width], or None (RoPE only)."""
    cfg = self.config
    if cfg.use_learned_positional_embeddings:
      table = self.pos_embedding[...]
      fewer = table.shape[0] - layout.segment_len
      # A one-segment clip of fewer frames (an image: one) takes the table's first frames' rows,
      # [text; frames 0..n-1] being the order of both.
      if layout.segments == 1 and fewer > 0 and fewer % (grid[0] * grid[1]) == 0:
        return table[:layout.segment_len]
      if fewer:
        raise ValueError("learned positional embeddings fix the segment size to "
                         f"{table.shape[0]} tokens, got {layout.segment_len}")
      return table
    if cfg.use_rotary_positional_embeddings:
      return None
    table = sincos_3d(cfg.width, layout.frames_per_segment, *grid,
                      cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale)
    return jnp.asarray(layout.segment_table(table, np.zeros(cfg.width, np.float32)))

  def __call__(self, latents: jax.Array, text: jax.Array, timestep: jax.Array,
               ofs: jax.Array | None = None) -> jax.Array:
    """Predicts the diffusion target for a video of S segments.

    Args:
      latents: [batch, frames, in_channels, height, width] (diffusers layout), frames =
        patch_size_t · (1 + S·(n−1)) for n token frames per segment.
      text: [batch, S, text_len, text_embed_dim], one text block per segment.
      timestep: [batch].
      ofs: [batch] ofs conditioning (only with ofs_embed_dim).

    Returns:
      [batch, frames, out_channels, height, width].
    """
    cfg = self.config
    batch, frames, _, height, width = latents.shape
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    grid = (height // p, width // p)
    layout = Layout(text.shape[1], text.shape[2], frames // pt, grid[0] * grid[1])

    temb = self.time_embedding(timestep_embedding(
        timestep, cfg.width, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift))
    if self.ofs_embedding is not None:
      temb = temb + self.ofs_embedding(timestep_embedding(
          ofs, cfg.ofs_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
          freq_shift=cfg.freq_shift))

    # Patch vectors in (channel, time, row, column) order, as diffusers' conv / linear reads them.
    patches = latents.reshape(batch, frames // pt, pt, -1, grid[0], p, grid[1], p)
    patches = patches.transpose(0, 1, 4, 6, 3, 2, 5, 7).reshape(batch, layout.frames * grid[0]
                                                                * grid[1], -1)
    # Canonical order is made on the patches (in_channels·p² per token) and the text, not on
    # the projected video, so that no gather touches a [batch, seq, width] array.
    video = self.patch_proj(constrain(layout.canonical_video(patches), _STREAM))
    x = constrain(layout.with_text(self.text_proj(text), video), _STREAM)
    positions = self._positions(layout, grid)
    if positions is not None:
      # merge(split(x) + p) = x + merge(p): the overlap frame gets the mean of its two rows.
      per_segment = jnp.broadcast_to(positions, (1, layout.segments, *positions.shape))
      x = x + layout.merge(per_segment).astype(x.dtype)

    rope_canonical = not cfg.local_attention
    ctx = _Context(
        layout=layout, is_text=layout.is_text, local_attention=cfg.local_attention,
        attn_rope=(_rope_tables(cfg, layout, cfg.head_dim, grid, rope_canonical)
                   if cfg.use_rotary_positional_embeddings else None),
        mixer_rope=_mixer_rope_tables(cfg, layout, cfg.mixer_head_dim, grid))
    x = self._run_blocks(x, temb, ctx)

    # The output head works per token on the canonical stream (text tokens too, ~3% more),
    # so that only its [batch, seq, out_channels·p²] result is gathered into video order.
    h = self.norm_final(x)
    shift, scale = jnp.split(self.norm_out_linear(jax.nn.silu(temb)), 2, axis=-1)
    h = self.proj_out(self.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    h = layout.video(h)
    out = h.reshape(batch, frames // pt, grid[0], grid[1], -1, pt, p, p)
    out = out.transpose(0, 1, 5, 4, 2, 6, 3, 7)
    return out.reshape(batch, frames, -1, height, width)

  def _run_blocks(self, x: jax.Array, temb: jax.Array, ctx: _Context) -> jax.Array:
    """The blocks as one `lax.scan` over groups of k = remat_every_k_layers blocks, each group a
    scan over its k blocks. Each block is rematerialised by `remat`'s policy; with k > 1 the
    group is too, saving nothing but its input: the forward pass keeps num_layers / k block
    inputs, and the backward pass of a group k more (sqrt(num_layers) checkpointing), for one
    more forward of every block. `unroll_layers` unrolls both scans: the same blocks, with each
    saved activation a value of its own instead of a slice that the scan writes into a stack
    and reads back (a third of a train step of the toy's 2-layer DiT on a CPU)."""
    cfg = self.config
    k, policy = cfg.remat_every_k_layers, REMAT_POLICIES[remat_policy(cfg.remat)]
    if k < 1 or cfg.num_layers % k:
      raise ValueError(f"config.model.remat_every_k_layers={k} does not divide num_layers="
                       f"{cfg.num_layers}")
    graphdef, state = nnx.split(self.blocks)
    groups = jax.tree.map(lambda a: a.reshape(cfg.num_layers // k, k, *a.shape[1:]), state)

    def block(h: jax.Array, layer: nnx.State) -> tuple[jax.Array, None]:
      return nnx.merge(graphdef, layer)(h, temb, ctx), None

    if policy is not None:
      block = jax.checkpoint(block, policy=policy)

    unroll = bool(cfg.unroll_layers)

    def group(h: jax.Array, layers: nnx.State) -> tuple[jax.Array, None]:
      return jax.lax.scan(block, h, layers, unroll=unroll)

    if k > 1 and policy is not None:
      group = jax.checkpoint(group, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(group, x, groups, unroll=unroll)[0]
