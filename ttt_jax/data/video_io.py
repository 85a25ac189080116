"""Writing and reading videos: mp4 (H.264 through the ffmpeg binary that imageio-ffmpeg ships)
and a PNG contact sheet with one frame per segment."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(video: np.ndarray) -> np.ndarray:
  """[frames, height, width, 3] in [-1, 1] -> uint8 in [0, 255]."""
  video = np.asarray(video, np.float32)
  if not np.isfinite(video).all():
    raise ValueError("video contains NaN or inf values")
  return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def from_uint8(video: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1], the range the autoencoders take; the
  inverse of `to_uint8`."""
  return np.asarray(video).astype(np.float32) / 127.5 - 1.0


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16) -> None:
  """frames: [frames, height, width, 3] uint8. Written to a temporary name, then renamed."""
  import imageio_ffmpeg

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"write_mp4 expects uint8 [frames, height, width, 3], got "
                     f"{frames.dtype} {frames.shape}")
  path = os.fspath(path)
  tmp = path + ".tmp.mp4"
  # H.264 in yuv420p needs even sizes; macro_block_size=1 keeps ffmpeg from resizing silently.
  writer = imageio_ffmpeg.write_frames(tmp, (frames.shape[2], frames.shape[1]), fps=fps,
                                       codec="libx264", pix_fmt_out="yuv420p",
                                       macro_block_size=1, quality=8)
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()
  os.replace(tmp, path)


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
  """Returns (frames [n, height, width, 3] uint8, fps)."""
  import imageio_ffmpeg

  reader = imageio_ffmpeg.read_frames(os.fspath(path))
  meta = next(reader)
  width, height = meta["size"]
  frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
  return np.stack(frames), float(meta["fps"])


def contact_sheet(frames: np.ndarray, frame_indices: list[int], columns: int = 7) -> np.ndarray:
  """Tiles the chosen frames [n, h, w, 3] into one uint8 image, row-major."""
  tiles = [frames[i] for i in frame_indices]
  rows = -(-len(tiles) // columns)
  h, w = tiles[0].shape[:2]
  sheet = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), np.uint8)
  for k, tile in enumerate(tiles):
    r, c = divmod(k, columns)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
  return sheet


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  from PIL import Image

  Image.fromarray(image).save(os.fspath(path))
