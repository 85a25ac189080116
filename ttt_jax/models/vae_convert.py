"""diffusers AutoencoderKLCogVideoX checkpoint (config.json + safetensors) -> CogVideoXVAE.

Our parameter paths mirror diffusers' module names, so a torch key is the path with the last
name translated (`kernel`/`scale` -> `weight`); only the kernel layout changes:
conv3d [out, in, t, h, w] -> [t, h, w, in, out], conv2d [out, in, h, w] -> [h, w, in, out].
No torch is needed: tensors are read with `safetensors_io` (bf16 files load too), as float32.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import checkpoint
from ttt_jax.models import pixel_vae
from ttt_jax.models.safetensors_io import read_safetensors_dir
from ttt_jax.models.vae import CogVideoXVAE, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# torch kernel axes -> ours, by kernel rank.
_KERNEL_PERMUTATION = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0)}


def torch_key(path: tuple) -> str:
  """Our parameter path, e.g. ('decoder', 'up_blocks', 0, 'resnets', 1, 'conv1', 'conv', 'kernel'),
  -> diffusers' key 'decoder.up_blocks.0.resnets.1.conv1.conv.weight'."""
  return ".".join([*map(str, path[:-1]), _TORCH_LEAF[path[-1]]])


def _abstract_model(config: VAEConfig):
  return nnx.split(nnx.eval_shape(lambda: CogVideoXVAE(config, rngs=nnx.Rngs(0))))


def load_diffusers_vae(src_dir: str | os.PathLike) -> tuple[VAEConfig, CogVideoXVAE]:
  """Reads `src_dir`/config.json and `src_dir`/diffusion_pytorch_model.safetensors (or its shards).

  Raises:
    ValueError: if the config is not one we reproduce, if the checkpoint lacks a parameter of
      the model or has one the model does not (all listed), or if a shape disagrees.
  """
  config = VAEConfig.from_diffusers(checkpoint.read_json(os.path.join(src_dir, "config.json")))
  tensors = {k: v.astype(np.float32)
             for k, v in read_safetensors_dir(src_dir, WEIGHTS_NAME).items()}
  graphdef, abstract = _abstract_model(config)
  flat = nnx.to_flat_state(abstract)
  wanted = {torch_key(path): path for path, _ in flat}
  missing, unexpected = sorted(wanted.keys() - tensors.keys()), sorted(tensors.keys() - wanted)
  if missing or unexpected:
    raise ValueError(f"{src_dir} does not match the model its config.json describes:\n"
                     f"  missing from checkpoint: {missing}\n"
                     f"  unexpected in checkpoint: {unexpected}")
  values = []
  for path, variable in flat:
    key = torch_key(path)
    value = tensors[key]
    if path[-1] == "kernel":
      value = value.transpose(_KERNEL_PERMUTATION[value.ndim])
    if value.shape != variable.shape:
      raise ValueError(f"{key}: checkpoint shape {tensors[key].shape} gives {value.shape}, "
                       f"the model wants {variable.shape}")
    values.append((path, variable.replace(jnp.asarray(value))))
  return config, nnx.merge(graphdef, nnx.from_flat_state(values))


def convert_vae(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
  """diffusers VAE folder -> `dst_dir`/params + `dst_dir`/config.json (`checkpoint.save_model`)."""
  checkpoint.save_model(dst_dir, *load_diffusers_vae(src_dir))


def load_converted_vae(ckpt_dir: str | os.PathLike) -> tuple[VAEConfig, CogVideoXVAE]:
  """Reads what `checkpoint.save_model` wrote for a CogVideoX VAE or the parameter-free pixel
  autoencoder; a missing or unexpected parameter raises ValueError."""
  raw = checkpoint.read_json(os.path.join(ckpt_dir, "config.json"))
  if raw.get("kind") == pixel_vae.KIND:  # parameter-free: nothing else to read
    config = pixel_vae.PixelVAEConfig.from_dict(raw)
    return config, pixel_vae.PixelVAE(config)
  config = VAEConfig.from_dict(raw)
  return config, checkpoint.load_model(ckpt_dir, lambda: CogVideoXVAE(config, rngs=nnx.Rngs(0)))
