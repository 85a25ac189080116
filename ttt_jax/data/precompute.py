"""Training inputs, computed once: videos -> VAE latents, segment texts -> T5 embeddings.

  python -m ttt_jax.data.precompute --config=configs/tomjerry_9s.py[:runlocal] --source=DIR \
      --out=DIR [--split=train] [--text_dtype=float32|float16] [--overwrite] [--verbose]

`--source` is a tfds dataset directory (the one holding dataset_info.json) written by any builder
of the `features.py` schema. Every example must match the stage: config.height x config.width
pixels, config.fps, config.segments segments. The VAE, T5 and tokenizer come from
`config.vae.checkpoint`, `config.text.checkpoint` and `config.text.tokenizer`, as for sampling.
Frames are scaled to [-1, 1] and encoded in batches of config.vae.frame_batch_size latent frames
(x 4 pixel frames: 8 by default, diffusers' encoder batch), tiled if config.vae.tiling.

`--out` becomes one split of one stage, itself a tfds dataset directory (read it with
`tfds.builder_from_directory(out).as_data_source()`, or `ttt_jax.data.loader.LatentLoader`):

  dataset_info.json, features.json                 tfds metadata
  video_latents-<split>.array_record-NNNNN-of-MMMMM  the examples, in source order
  null_text_embeds.npy                             float32 [max_length, d_model]
  precompute.json                                  config fields, shapes, source, example count,
                                                   truncated_texts: segments cut to max_length

An example holds
  id             str
  latent_mean    float32 [latent_frames, h, w, C]  VAE posterior, VAE layout, NOT scaled: the
  latent_logvar  float32 [latent_frames, h, w, C]  loader samples and applies scaling_factor
  text_embeds    float32 or float16 [N, max_length, d_model]  T5 of each segment's text with its
                                                   scene tokens, padded, no attention mask
  texts, scene_start, scene_end                    as in the source

The null text (the prompt of the 10% text dropout, and classifier-free guidance's unconditional
branch) is the empty string WITHOUT scene tokens, i.e. EOS then padding, as CogVideoX encodes its
empty negative prompt; it is also what the sampler feeds for a segment whose negative_text is ""
(negative prompts never get scene tokens, see storyboard.segment_prompts).

--out is checked before anything is read. Everything is written into a sibling temporary
directory renamed to `--out` at the end: a crash leaves no dataset under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ttt_jax import cli
from ttt_jax.data import features
from ttt_jax.data.loader import INFO_FILE, NULL_TEXT_FILE, decode_text
from ttt_jax.data.encoders import Encoders
from ttt_jax.data.tokenizer import segment_text
from ttt_jax.data.video_io import from_uint8
from ttt_jax.models.vae import Tiling

TEXT_DTYPES = {"float32": np.float32, "float16": np.float16}
_LIST_AT_MOST = 20  # truncated segments named in precompute.json; the count is always whole


def latent_features(latent_shape: tuple[int, ...], text_shape: tuple[int, ...],
                    text_dtype: Any = np.float32) -> tfds.features.FeaturesDict:
  """Features of a precomputed example; latent_shape [F, h, w, C], text_shape [N, L, D]."""
  segments = text_shape[0]
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "latent_mean": tfds.features.Tensor(shape=latent_shape, dtype=np.float32),
      "latent_logvar": tfds.features.Tensor(shape=latent_shape, dtype=np.float32),
      "text_embeds": tfds.features.Tensor(shape=text_shape, dtype=text_dtype),
      "texts": tfds.features.Sequence(tfds.features.Text()),
      "scene_start": tfds.features.Tensor(shape=(segments,), dtype=np.bool_),
      "scene_end": tfds.features.Tensor(shape=(segments,), dtype=np.bool_),
  })


class VideoLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the (key, example) pairs of `examples` as one split, keeping their order.

  Not registered: `python -m` runs this module as __main__ too, and a second registration of the
  same name is an error; the dataset is read with `tfds.builder_from_directory`.
  """

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, features_dict: tfds.features.FeaturesDict, split: str,
               examples: Iterator[tuple[int, dict]], description: str, **kwargs):
    # Set before the base constructor, which already asks for `_info`.
    self._features_dict, self._split = features_dict, split
    self._examples, self._description = examples, description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # No shuffling: example i is source example i, whatever its key hashes to.
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=self._features_dict, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {self._split: self._generate_examples()}

  def _generate_examples(self):
    yield from self._examples


class _Encoders(Encoders):
  """`Encoders` checked against the config; T5 runs on `text_rows` texts a call (one compile)."""

  def __init__(self, config: ml_collections.ConfigDict, text_rows: int):
    super().__init__(config, "precompute")
    vc, tc, m = self.vae_config, self.t5_config, config.model
    problems = []
    if vc.latent_channels != m.in_channels:
      problems.append(f"VAE latent_channels {vc.latent_channels} != "
                      f"config.model.in_channels {m.in_channels}")
    if vc.temporal_compression_ratio != features.model_temporal_compression(config):
      problems.append(f"VAE temporal_compression_ratio {vc.temporal_compression_ratio} != "
                      f"config.model.temporal_compression_ratio "
                      f"{features.model_temporal_compression(config)}")
    if config.height % vc.spatial_compression or config.width % vc.spatial_compression:
      problems.append(f"{config.height}x{config.width} pixels are not a multiple of the VAE's "
                      f"spatial compression {vc.spatial_compression}")
    if tc.d_model != m.text_embed_dim:
      problems.append(f"T5 d_model {tc.d_model} != config.model.text_embed_dim "
                      f"{m.text_embed_dim}")
    if config.text.max_length != m.max_text_seq_length:
      problems.append(f"config.text.max_length {config.text.max_length} != "
                      f"config.model.max_text_seq_length {m.max_text_seq_length}")
    if self.tokenizer.vocab_size > tc.vocab_size:
      # jnp indexing would clamp the scene-token ids to the last row without a word.
      problems.append(f"tokenizer ids reach {self.tokenizer.vocab_size - 1}, the T5 table has "
                      f"{tc.vocab_size} rows (grow it with t5.extend_embeddings)")
    if problems:
      raise ValueError("models do not fit the config: " + "; ".join(problems))
    # config.vae.frame_batch_size counts latent frames (decoding); the encoder streams pixel
    # frames: 2 latent frames -> 8 pixel frames, diffusers' encoder batch.
    self.frame_batch_size = config.vae.frame_batch_size * vc.temporal_compression_ratio
    self.tiling = Tiling.default(vc) if config.vae.tiling else None
    self.text_rows = text_rows

  def video(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [frames, H, W, 3] -> float32 (mean, logvar), each [latent_frames, h, w, C]."""
    x = from_uint8(video)
    mean, logvar = self.vae.encode(jnp.asarray(x[None]), frame_batch_size=self.frame_batch_size,
                                   tiling=self.tiling)
    return np.asarray(mean[0], np.float32), np.asarray(logvar[0], np.float32)

  def texts(self, texts: list[str]) -> np.ndarray:
    """Texts (scene tokens already in them) -> float32 [len(texts), max_length, d_model].

    As CogVideoX: padded to max_length, no attention mask. The last call is padded with pad ids
    to `text_rows` rows so that every call has the one compiled shape.
    """
    ids, _ = self.tokenizer.encode(texts)
    out = []
    for start in range(0, len(ids), self.text_rows):
      chunk = ids[start:start + self.text_rows]
      n = len(chunk)
      chunk = np.pad(chunk, ((0, self.text_rows - n), (0, 0)),
                     constant_values=self.tokenizer.pad_id)
      out.append(np.asarray(self.encode_ids(chunk), np.float32)[:n])
    return np.concatenate(out)


def _open_source(source_dir: str, split: str):
  """(data source of `split`, its tfds DatasetInfo); clear errors for a wrong directory."""
  if not os.path.isfile(os.path.join(source_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{source_dir!r} is not a tfds dataset directory (no "
                            "dataset_info.json; pass the versioned folder, e.g. NAME/1.0.0)")
  builder = tfds.builder_from_directory(source_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{source_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
  return builder.as_data_source()[split], builder.info


class _Check:
  """The source's examples against the stage config; errors name source, example and field."""

  def __init__(self, config: ml_collections.ConfigDict, source_dir: str):
    self.config, self.source_dir = config, source_dir
    self.wants = (f"config {config.stage}: {config.segments} segments of "
                  f"{config.height}x{config.width} pixels at {config.fps} fps")

  def fail(self, message: str):
    raise ValueError(f"source {self.source_dir} does not fit {self.wants}: {message}")

  def features(self, info) -> None:
    have = set(info.features.keys())
    missing = sorted({"id", "video", "fps", "texts", "scene_start", "scene_end"} - have)
    if missing:
      self.fail(f"its features lack {missing} (see ttt_jax/data/features.py)")
    shape = tuple(info.features["video"].shape)
    if shape[1:] != (self.config.height, self.config.width, 3):
      self.fail(f"its video feature has shape {shape}")

  def example(self, example: dict) -> None:
    c = self.config
    try:
      features.check_example(example, c.height, c.width)
    except ValueError as e:
      self.fail(str(e))
    where = f"example {decode_text(example['id'])!r}"
    if int(example["fps"]) != c.fps:
      self.fail(f"{where} has fps {int(example['fps'])}")
    if len(example["texts"]) != c.segments:
      self.fail(f"{where} has {len(example['texts'])} segments")


def _examples(source, encoders: _Encoders, check: _Check, segments: int,
              text_dtype: np.dtype, truncated: list[str]) -> Iterator[tuple[int, dict]]:
  """Encoded examples in source order, (index, example). Videos are encoded one at a time (only
  latents are kept); texts of `text_rows // segments` examples share a T5 call. Appends
  "<id> segment <i>: <n> tokens" to `truncated` for each text cut to max_length."""
  room = encoders.tokenizer.max_length - 1  # the last id is EOS
  group = max(1, encoders.text_rows // segments)
  pending = []
  for i in range(len(source)):
    example = source[i]
    check.example(example)
    mean, logvar = encoders.video(example["video"])
    texts = [decode_text(t) for t in example["texts"]]
    pending.append((i, {
        "id": decode_text(example["id"]), "latent_mean": mean, "latent_logvar": logvar,
        "texts": texts, "scene_start": np.asarray(example["scene_start"], bool),
        "scene_end": np.asarray(example["scene_end"], bool)}))
    if len(pending) == group or i + 1 == len(source):
      prompts = [segment_text(t, bool(s), bool(e)) for _, ex in pending
                 for t, s, e in zip(ex["texts"], ex["scene_start"], ex["scene_end"])]
      for row, prompt in enumerate(prompts):
        n = len(encoders.tokenizer.tokenize(prompt))
        if n > room:
          truncated.append(f"{pending[row // segments][1]['id']} segment {row % segments}: "
                           f"{n + 1} tokens")
      embeds = encoders.texts(prompts)
      embeds = embeds.reshape(len(pending), segments, *embeds.shape[1:]).astype(text_dtype)
      for (index, ex), text_embeds in zip(pending, embeds):
        if not (np.isfinite(ex["latent_mean"]).all() and np.isfinite(ex["latent_logvar"]).all()
                and np.isfinite(text_embeds).all()):
          raise FloatingPointError(f"example {ex['id']!r}: non-finite latents or text embeddings"
                                   f" (text_dtype {np.dtype(text_dtype).name})")
        yield index, {**ex, "text_embeds": text_embeds}
      pending = []


def precompute(config: ml_collections.ConfigDict, source_dir: str | os.PathLike,
               out_dir: str | os.PathLike, split: str = "train", *,
               text_dtype: str = "float32", text_batch_size: int = 32,
               overwrite: bool = False) -> dict[str, Any]:
  """Encodes split `split` of `source_dir` into `out_dir` (layout: module docstring).

  Args:
    config: a stage config (configs/tomjerry_*.py).
    source_dir: tfds dataset directory of the features.py schema.
    out_dir: created; must not exist, or be empty, unless `overwrite`.
    split: the source split to encode; out_dir holds that one split under the same name.
    text_dtype: storage dtype of text_embeds, "float32" or "float16" (half the disk; T5's
      output follows its final RMSNorm, well inside float16's range, and is checked finite).
    text_batch_size: texts per T5 call.
    overwrite: replace an existing out_dir (only once the new one is complete).

  Returns:
    What precompute.json records.

  Raises:
    ValueError: the source or the models do not fit the config (message names the example and
      field), or the source split is empty.
    FileExistsError: out_dir exists, is not empty, and not `overwrite`.
  """
  source_dir = os.path.abspath(source_dir)
  if text_dtype not in TEXT_DTYPES:
    raise ValueError(f"text_dtype must be one of {sorted(TEXT_DTYPES)}, got {text_dtype!r}")
  out_dir = cli.check_output_dir(os.fspath(out_dir), "--out", overwrite=overwrite)
  source, source_info = _open_source(source_dir, split)
  check = _Check(config, source_dir)
  check.features(source_info)
  if len(source) == 0:
    raise ValueError(f"source {source_dir} split {split!r} has no examples")

  encoders = _Encoders(config, text_rows=max(text_batch_size, config.segments))
  vc, s = encoders.vae_config, encoders.vae_config.spatial_compression
  frames = features.latent_frames(config.segments, config.fps, vc.temporal_compression_ratio)
  latent_shape = (frames, config.height // s, config.width // s, vc.latent_channels)
  text_shape = (config.segments, config.text.max_length, encoders.t5_config.d_model)
  info = dict(
      stage=config.stage, split=split, num_examples=len(source), source=source_dir,
      source_name=source_info.name, segments=config.segments, fps=config.fps,
      height=config.height, width=config.width,
      latent_shape=list(latent_shape), latent_layout="[latent_frames, h, w, C], unscaled",
      scaling_factor=vc.scaling_factor, text_shape=list(text_shape), text_dtype=text_dtype,
      null_text="empty text, no scene tokens",
      vae_checkpoint=os.path.abspath(config.vae.checkpoint),
      vae_encode_frame_batch=encoders.frame_batch_size, vae_tiling=bool(config.vae.tiling),
      text_checkpoint=os.path.abspath(config.text.checkpoint),
      tokenizer=os.path.abspath(config.text.tokenizer))

  with cli.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    truncated = []
    examples = _examples(source, encoders, check, config.segments, TEXT_DTYPES[text_dtype],
                         truncated)
    builder = VideoLatents(
        features_dict=latent_features(latent_shape, text_shape, TEXT_DTYPES[text_dtype]),
        split=split, examples=examples,
        description=f"VAE latents and T5 embeddings of {source_dir} for stage {config.stage}",
        data_dir=os.path.join(tmp, "tfds"), file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.path.join(tmp, "tfds", "downloads"),
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    # Flatten NAME/VERSION away: out_dir itself is the tfds dataset directory.
    for name in os.listdir(builder.data_dir):
      os.rename(os.path.join(builder.data_dir, name), os.path.join(tmp, name))
    shutil.rmtree(os.path.join(tmp, "tfds"))
    np.save(os.path.join(tmp, NULL_TEXT_FILE), encoders.texts([""])[0])
    # Truncation is silent in the tokenizer (as T5Tokenizer's); the report says how often.
    info.update(truncated_texts=len(truncated), truncated_examples=truncated[:_LIST_AT_MOST])
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
  return info


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  print(json.dumps(precompute(f.config, f.source, f.out, f.split, text_dtype=f.text_dtype,
                              overwrite=f.overwrite)))


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]",
                                  lock_config=True)
  flags.DEFINE_string("source", None, "tfds dataset directory of the features.py schema")
  flags.DEFINE_string("out", None, "output directory (one split of one stage)")
  flags.DEFINE_string("split", "train", "source split to encode")
  flags.DEFINE_enum("text_dtype", "float32", sorted(TEXT_DTYPES), "storage dtype of text_embeds")
  flags.DEFINE_bool("overwrite", False, "replace an existing --out")
  flags.mark_flags_as_required(["config", "source", "out"])
  cli.run_absl(main)
