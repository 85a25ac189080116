"""CogVideoX weight import: diffusers CogVideoXTransformer3DModel folder -> our DiT params.

The diffusers folder holds config.json and diffusion_pytorch_model.safetensors (or shards named
by diffusion_pytorch_model.safetensors.index.json). Every diffusers tensor must land on one of
our parameters and every backbone parameter must be filled; the new ones (sequence mixers and
their gates α, β) are initialised as `DiT(cfg, rngs=nnx.Rngs(seed))` would.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from ttt_jax import checkpoint
from ttt_jax.models.dit import DiT, DiTConfig, MixerFactory, default_mixer_factory
from ttt_jax.models.safetensors_io import read_safetensors_dir

Path = tuple[str, ...]

# diffusers module prefix -> our module path.
_TOP = {
    "patch_embed.proj": ("patch_proj",),
    "patch_embed.text_proj": ("text_proj",),
    "time_embedding.linear_1": ("time_embedding", "linear_1"),
    "time_embedding.linear_2": ("time_embedding", "linear_2"),
    "ofs_embedding.linear_1": ("ofs_embedding", "linear_1"),
    "ofs_embedding.linear_2": ("ofs_embedding", "linear_2"),
    "norm_final": ("norm_final",),
    "norm_out.linear": ("norm_out_linear",),
    "norm_out.norm": ("norm_out",),
    "proj_out": ("proj_out",),
}
_BLOCK = {
    "norm1.linear": ("norm1", "linear"),
    "norm1.norm": ("norm1", "norm"),
    "attn1.norm_q": ("attn1", "norm_q"),
    "attn1.norm_k": ("attn1", "norm_k"),
    "attn1.to_q": ("attn1", "to_q"),
    "attn1.to_k": ("attn1", "to_k"),
    "attn1.to_v": ("attn1", "to_v"),
    "attn1.to_out.0": ("attn1", "to_out"),
    "norm2.linear": ("norm2", "linear"),
    "norm2.norm": ("norm2", "norm"),
    "ff.net.0.proj": ("ff", "proj_in"),
    "ff.net.2": ("ff", "proj_out"),
}
# Parameters CogVideoX does not have: initialised fresh.
_NEW_IN_BLOCK = ("mixer", "mixer_reverse", "alpha", "beta")

def read_diffusers(src: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, state dict) of a diffusers transformer folder."""
  config = checkpoint.read_json(os.path.join(src, "config.json"))
  return config, read_safetensors_dir(src, "diffusion_pytorch_model.safetensors")


def _target(key: str) -> tuple[Path, int | None] | None:
  """Our parameter path and layer index for a diffusers key; None if it has no place."""
  if key == "patch_embed.pos_embedding":
    return ("pos_embedding",), None
  module, _, leaf = key.rpartition(".")
  layer = None
  table = _TOP
  if module.startswith("transformer_blocks."):
    _, index, module = module.split(".", 2)
    layer, table = int(index), _BLOCK
  if module not in table or leaf not in ("weight", "bias"):
    return None
  return table[module] + (leaf,), layer


def _convert_tensor(key: str, value: np.ndarray) -> np.ndarray:
  """torch layout -> ours: Linear [out, in] -> kernel [in, out]; Conv2d patch -> kernel."""
  value = np.asarray(value, np.float32)
  if key == "patch_embed.pos_embedding":
    return value[0]
  if key.endswith(".weight") and value.ndim >= 2:
    return value.reshape(value.shape[0], -1).T
  return value


def _our_leaf(path: Path, shape: tuple[int, ...]) -> Path:
  """diffusers 'weight' is our 'kernel' (matrices) or 'scale' (norms)."""
  if path[-1] != "weight":
    return path
  return path[:-1] + ("kernel" if len(shape) >= 2 else "scale",)


def is_new_param(path: Path) -> bool:
  """A parameter the paper adds to CogVideoX (mixers, gates): initialised fresh when a source
  (diffusers weights, an earlier training stage) lacks it."""
  return len(path) > 1 and path[0] == "blocks" and path[1] in _NEW_IN_BLOCK


def convert_params(cfg: DiTConfig, state: dict[str, np.ndarray], *, seed: int = 0,
                   mixer_factory: MixerFactory = default_mixer_factory) -> dict[str, Any]:
  """Our parameter pytree (nested dict of float32 numpy arrays) from a diffusers state dict.

  Raises:
    ValueError: listing diffusers keys with no place in our model, model parameters the state
      dict does not provide, and shape mismatches.
  """
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(seed), mixer_factory=mixer_factory))
  want = traverse_util.flatten_dict(nnx.state(abstract, nnx.Param).to_pure_dict())
  found: dict[Path, Any] = {}
  unknown = []
  for key, value in state.items():
    target = _target(key)
    if target is None:
      unknown.append(key)
      continue
    value = _convert_tensor(key, value)
    path, layer = _our_leaf(target[0], value.shape), target[1]
    path = ("blocks",) + path if layer is not None else path
    if path not in want:
      unknown.append(key)
      continue
    if layer is None:
      found[path] = value
    else:
      found.setdefault(path, {})[layer] = value
  bad_layers = []
  for path, value in list(found.items()):
    if isinstance(value, dict):  # stack the layers
      layers = [value.get(i) for i in range(cfg.num_layers)]
      if any(v is None for v in layers) or len(value) != cfg.num_layers:
        bad_layers.append(f"{'/'.join(path)}: layers {sorted(value)} of {cfg.num_layers}")
        del found[path]
        continue
      found[path] = np.stack(layers)
  checkpoint.check_tree(
      traverse_util.unflatten_dict(found), traverse_util.unflatten_dict(want),
      "CogVideoX weights do not match the model config", allow_missing=is_new_param,
      also=([f"unknown keys: {sorted(unknown)}"] if unknown else [])
      + ([f"incomplete layers: {bad_layers}"] if bad_layers else []))

  new_paths = [p for p in want if is_new_param(p)]

  @jax.jit
  def init_new():
    # Only the new parameters are returned, so XLA drops the random init of the others.
    model = DiT(cfg, rngs=nnx.Rngs(seed), mixer_factory=mixer_factory)
    flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    return [flat[p] for p in new_paths]

  found.update(zip(new_paths, map(np.asarray, init_new())))
  return traverse_util.unflatten_dict({p: found[p] for p in want})


def convert_cogvideox(src: str, dst: str, *, seed: int = 0,
                      mixer_factory: MixerFactory = default_mixer_factory,
                      **overrides: Any) -> DiTConfig:
  """Converts a diffusers folder to `dst/params` (Orbax) + `dst/config.json`.

  Args:
    src: diffusers CogVideoXTransformer3DModel folder.
    dst: output directory (created; `dst/params` must not exist).
    seed: init seed of the new (mixer, gate) parameters.
    mixer_factory: builds the mixers (tests pass their own).
    **overrides: DiTConfig fields to set, e.g. mixer="ttt_mlp".

  Returns:
    The config written.
  """
  config, state = read_diffusers(src)
  cfg = DiTConfig.from_diffusers(config, **overrides)
  checkpoint.save_model(dst, cfg, convert_params(cfg, state, seed=seed,
                                                 mixer_factory=mixer_factory))
  return cfg


def load_dit(directory: str, *, mixer_factory: MixerFactory = default_mixer_factory,
             **overrides: Any) -> DiT:
  """A DiT with the parameters written by `convert_cogvideox` (or a training run).

  overrides change run-time fields only (remat, local_attention, dtype); raises ValueError on
  missing or unexpected parameters.
  """
  path = os.path.join(directory, "config.json")
  stored = checkpoint.read_json(path)
  known = {f.name for f in dataclasses.fields(DiTConfig)}
  if not isinstance(stored, dict) or set(stored) - known:
    extra = sorted(set(stored) - known) if isinstance(stored, dict) else type(stored).__name__
    raise ValueError(f"{path}: not a DiT config (unknown fields {extra}); expected what "
                     "python -m ttt_jax.convert or a training run's model/ writes")
  cfg = DiTConfig.from_dict({**stored, **overrides})
  return checkpoint.load_model(
      directory, lambda: DiT(cfg, rngs=nnx.Rngs(0), mixer_factory=mixer_factory))
