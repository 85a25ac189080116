"""The example schema of every video dataset builder (`tomjerry_storyboard`, `toy_toons`).

One example is N consecutive 3-second segments of one video:

  id           str                          "<video name>/<first segment index>"
  video        uint8 [1 + 3*fps*N, H, W, 3]  the shared first frame, then 3*fps frames a segment,
                                             so that the VAE (4x temporal compression) gives
                                             1 + 12*N latent frames at 16 fps, as the DiT wants
  fps          int32 []                     frames per second of `video`
  texts        str [N]                      each segment's paragraph, without scene tokens
  scene_start  bool [N]                     segment i starts a scene (gets <start_scene>)
  scene_end    bool [N]                     segment i ends a scene (gets <end_scene>)

Builders may add fields of their own (toy_toons adds the facts its metric checks); precompute and
training read only these. Importing this module loads tensorflow_datasets but not TensorFlow.
"""
from __future__ import annotations

import numpy as np

SEGMENT_SECONDS = 3
TEMPORAL_COMPRESSION = 4  # CogVideoX VAE: 1 + 4k pixel frames -> 1 + k latent frames


def frames_per_segment(fps: int, temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
  """Pixel frames a segment adds after the shared first frame (48 at 16 fps); raises unless the
  VAE's temporal compression divides them."""
  n = SEGMENT_SECONDS * fps
  if n % temporal_compression:
    raise ValueError(f"fps={fps}: a {SEGMENT_SECONDS}-second segment has {n} frames, not a "
                     f"multiple of the VAE's temporal compression {temporal_compression}")
  return n


def num_frames(segments: int, fps: int) -> int:
  """Pixel frames of an example of `segments` segments: 1 + 3*fps*segments."""
  return 1 + segments * frames_per_segment(fps)


def latent_frames(segments: int, fps: int = 16,
                  temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
  """Latent frames of such an example: 1 + 12*segments at 16 fps and CogVideoX's 4x (the toy's
  keyframe autoencoder takes other ratios: ttt_jax/models/pixel_vae.py)."""
  return 1 + segments * frames_per_segment(fps, temporal_compression) // temporal_compression


def model_temporal_compression(config) -> int:
  """The temporal compression a stage config's DiT expects of its latents: config.model's
  `temporal_compression_ratio` (DiTConfig's), CogVideoX's 4 where unset."""
  return int(config.model.get("temporal_compression_ratio", TEMPORAL_COMPRESSION))


def video_features(height: int, width: int, **extra):
  """The tfds FeaturesDict of the schema above; `extra` adds builder-specific features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "video": tfds.features.Tensor(shape=(None, height, width, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
      "fps": tfds.features.Tensor(shape=(), dtype=np.int32),
      "texts": tfds.features.Sequence(tfds.features.Text()),
      "scene_start": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "scene_end": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      **extra,
  })


def check_example(example: dict, height: int, width: int) -> None:
  """Raises ValueError naming the example and field when an example breaks the schema."""
  where = f"example {example.get('id', '?')!r}"
  texts = list(example["texts"])
  n = len(texts)
  if n == 0:
    raise ValueError(f"{where}: field 'texts' is empty")
  for key in ("scene_start", "scene_end"):
    if np.shape(example[key]) != (n,):
      raise ValueError(f"{where}: field {key!r} has shape {np.shape(example[key])}, "
                       f"expected ({n},)")
  want = (num_frames(n, int(example["fps"])), height, width, 3)
  if tuple(np.shape(example["video"])) != want:
    raise ValueError(f"{where}: field 'video' has shape {np.shape(example['video'])}, "
                     f"expected {want}")
