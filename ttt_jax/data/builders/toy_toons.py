"""`toy_toons`: procedural cartoons (ttt_jax/data/toy_toons.py) as a tfds dataset.

    from ttt_jax.data import toy_metrics, toy_toons
    from ttt_jax.data.builders import toy_toons as toy_toons_builder
    builder = toy_toons_builder.build("tfds_data/", segments=3, num_train=1024, num_test=64)
    example = builder.as_data_source()["test"][0]
    story = toy_toons.Story.from_json(example["story"])
    toy_metrics.persistence_score(generated_video, story)

One story per example: a long story cut into windows would give windows whose first text states
no facts, and the point of the dataset is that only the first segment does. An example's id is
"toy_toons_<story seed>/0" (the first segment is always 0), its fields those of features.py plus

  story  str  Story.to_json(): facts, actions, positions; `Story.from_json` reads it back

Example i of a split is `toy_lib.make_example(toy_lib.generate_story(story_seed(seed, split, i),
segments, fps, height, width))`. Story seeds of "train" are even and those of "test" odd, in a
range of their own for each dataset seed, so the held-out stories are never trained on.
Generation is deterministic and needs no downloads; tfds reuses a built dataset of the same
config (the config name spells out every value).
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from ttt_jax.data import features
from ttt_jax.data import toy_toons as toy_lib

STAGE_SEGMENTS = (1, 3, 6, 10, 21)  # the paper's stages: 3, 9, 18, 30, 63 seconds
SPLITS = ("train", "test")
_SEEDS_PER_DATASET = 1_000_000  # story seeds of one dataset seed: [seed * this, (seed + 1) * this)


@dataclasses.dataclass(eq=False)
class ToyToonsConfig(tfds.core.BuilderConfig):
  """Story length in segments, examples per split, frame size and rate, and the dataset seed."""
  segments: int = 1
  num_train: int = 4
  num_test: int = 2
  height: int = 32
  width: int = 48
  fps: int = 16
  seed: int = 0


def make_config(segments: int, num_train: int = 1024, num_test: int = 64, height: int = 32,
                width: int = 48, fps: int = 16, seed: int = 0) -> ToyToonsConfig:
  """A config named after its values, e.g. "9s_32x48_16fps_train1024_test64_seed0"."""
  features.frames_per_segment(fps)  # raises for a frame rate the VAE cannot take
  toy_lib.geometry(height, width)  # raises for frames too small for two sprites
  if segments < 1 or num_train < 0 or num_test < 0 or seed < 0:
    raise ValueError(f"need segments >= 1 and num_train, num_test, seed >= 0, got segments="
                     f"{segments}, num_train={num_train}, num_test={num_test}, seed={seed}")
  if max(num_train, num_test) > _SEEDS_PER_DATASET // 2:
    raise ValueError(f"at most {_SEEDS_PER_DATASET // 2} examples per split")
  name = (f"{features.SEGMENT_SECONDS * segments}s_{height}x{width}_{fps}fps_train{num_train}"
          f"_test{num_test}_seed{seed}")
  return ToyToonsConfig(
      name=name, segments=segments, num_train=num_train, num_test=num_test, height=height,
      width=width, fps=fps, seed=seed,
      description=f"{num_train} train and {num_test} test stories of {segments} segment(s) of "
                  f"3 s, {height}x{width} at {fps} fps, dataset seed {seed}")


def story_seed(seed: int, split: str, index: int) -> int:
  """The story seed of example `index` of `split`: train even, test odd, disjoint by design."""
  return seed * _SEEDS_PER_DATASET + 2 * index + SPLITS.index(split)


class ToyToons(tfds.core.GeneratorBasedBuilder):
  """Two coloured shapes in a coloured room; only the first segment's text states the colours."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # The paper's five stages at 32x48; any other variant: make_config(...).
  BUILDER_CONFIGS = [make_config(n) for n in STAGE_SEGMENTS]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=features.video_features(cfg.height, cfg.width, story=tfds.features.Text()),
        supervised_keys=None)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is generated
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split: str, count: int):
    cfg = self.builder_config
    for i in range(count):
      story = toy_lib.generate_story(story_seed(cfg.seed, split, i), cfg.segments, cfg.fps,
                                     cfg.height, cfg.width)
      example = toy_lib.make_example(story)
      yield example["id"], example


def build(data_dir: str | os.PathLike, *, segments: int, num_train: int = 1024,
          num_test: int = 64, height: int = 32, width: int = 48, fps: int = 16,
          seed: int = 0) -> ToyToons:
  """Builds (or finds already built) the dataset as array_record under `data_dir`.

  Returns the builder: `builder.as_data_source()[split]`, `builder.data_path`.
  """
  builder = ToyToons(data_dir=os.fspath(data_dir), file_format="array_record",
                     config=make_config(segments, num_train, num_test, height, width, fps, seed))
  # tfds's statistics go through tf.data; they would import TensorFlow.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder

