"""Reads safetensors checkpoints (diffusers / transformers folders) into numpy, without torch.

One reader for every converter: a single `.safetensors` file, or a folder holding either one
weights file or shards listed by `<weights name>.index.json`. Tensors keep their stored dtype;
bfloat16 (the released CogVideoX weights) comes back as `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import safetensors.numpy

# safetensors dtype tag -> numpy dtype, for the fallback reader below.
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "C64": np.complex64,
}


def read_safetensors_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of one `.safetensors` file, by name, in its stored dtype.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: a file that is not safetensors (the message names it).
  """
  try:
    # Looked up at call time (not imported by name) so tests can stand in an old safetensors.
    return safetensors.numpy.load_file(path)
  except safetensors.SafetensorError as e:  # its message names no file
    raise ValueError(f"{os.fspath(path)}: not a valid safetensors file ({e})") from e
  except TypeError:
    # safetensors 0.4.x cannot make numpy bfloat16; read the documented layout directly: an
    # 8-byte little-endian header length, a JSON header, then the raw data, memory-mapped so a
    # multi-GB shard is not copied.
    with open(path, "rb") as f:
      header_len = struct.unpack("<Q", f.read(8))[0]
      header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    return {name: np.frombuffer(data[start:end], _DTYPES[info["dtype"]]).reshape(info["shape"])
            for name, info in header.items() if name != "__metadata__"
            for start, end in [info["data_offsets"]]}


def read_safetensors_dir(directory: str | os.PathLike,
                         weights_name: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint folder, by name, in its stored dtype.

  Args:
    directory: the folder, e.g. a diffusers `transformer/` or a transformers `text_encoder/`.
    weights_name: the weights file, e.g. 'model.safetensors'. If `weights_name`.index.json
      exists, the shards its weight_map names are read instead (as diffusers/transformers do).

  Raises:
    FileNotFoundError: if neither `weights_name` nor its index exists in `directory`.
  """
  index = os.path.join(directory, weights_name + ".index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, weights_name)):
    files = [weights_name]
  else:
    raise FileNotFoundError(
        f"{os.fspath(directory)}: neither {weights_name} nor {weights_name}.index.json")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors_file(os.path.join(directory, name)))
  return tensors
