"""`tomjerry_storyboard`: a folder of annotated videos -> examples of N consecutive segments.

    from ttt_jax.data.builders import tomjerry_storyboard
    builder = tomjerry_storyboard.build("cartoons/", "tfds_data/", segments=3, height=480,
                                        width=720, fps=16, on_error="skip")
    source = builder.as_data_source()["train"]

or, with a stage config's segments, size and frame rate (prints the dataset directory to hand to
precompute; an error is one line naming the file, segment and field, --verbose for the traceback):

    python -m ttt_jax.data.builders.tomjerry_storyboard --config=configs/tomjerry_9s.py \
        --source=cartoons/ --data_dir=tfds_data/ [--on_error=skip] [--test_videos=a,b]

The source folder holds videos and, for each, an annotation JSON (format: ttt_jax/data/
annotations.py), in subfolders or not. A video's name is its annotation's path relative to the
folder without `.json` (`season1/tom_01`); an example's id is "<name>/<first segment index>".

Each annotated video is cut into windows of `segments` consecutive segments, one every `stride`
segments (default `segments`: no overlap); segments after the last full window are in no example.
A window's video is `features.num_frames(segments, fps)` frames: frame k is the source frame
nearest to time `start + k / fps`, `start` being its first segment's start, so the last frame is
the last segment's end. Frames are resized to cover height x width and centre-cropped. Scene
marks are the annotation's: a window that begins mid-scene has scene_start[0] false.

Videos listed in `test_videos` (names) go to the "test" split, the others to "train".

Nothing is dropped silently. With on_error="fail" the first bad annotation, unreadable video, or
video without an annotation raises (AnnotationError / VideoError, naming file, segment, field).
With on_error="skip" it is logged and listed, with the reason, in `skipped.json` next to the
dataset's `dataset_info.json` (`builder.data_path / SKIP_REPORT`), and the rest is built. Videos
too short for one window are listed there in both modes.

Re-running with the same data_dir and config reuses the built dataset (tfds), even when the source
folder changed: build into a fresh data_dir, or delete the old one, after editing the source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ttt_jax.data import annotations as ann_lib
from ttt_jax.data import features

SKIP_REPORT = "skipped.json"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
STAGE_SEGMENTS = (1, 3, 6, 10, 21)  # 3, 9, 18, 30, 63 seconds
ON_ERROR = ("fail", "skip")


class VideoError(ValueError):
  """A video that is missing or cannot be decoded; the message names the file."""


# --- Reading and resampling videos ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  fps: float
  duration_s: float
  width: int
  height: int


def _ffmpeg_reason(error: Exception) -> str:
  """The last line of ffmpeg's stderr that imageio_ffmpeg puts in its errors (not the banner)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _open(path: str) -> tuple[VideoInfo, Iterator[bytes]]:
  """Starts decoding `path` to RGB24; returns its header and the raw frames."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise VideoError(f"{path}: video file not found")
  reader = imageio_ffmpeg.read_frames(path)
  try:
    meta = next(reader)
    width, height = meta["size"]
    fps, duration = float(meta.get("fps") or 0), float(meta.get("duration") or 0)
    if not (math.isfinite(fps) and fps > 0):
      raise OSError("no frame rate in the video's header")
    if not (math.isfinite(duration) and duration > 0):
      # Some containers (raw streams, live recordings) carry no duration: count the frames.
      _, duration = imageio_ffmpeg.count_frames_and_secs(path)
  # Broad: imageio_ffmpeg raises OSError, RuntimeError, or its header parser's IndexError (e.g. a
  # file with no video stream); all mean the same to the caller.
  except Exception as e:  # pylint: disable=broad-except
    reader.close()
    raise VideoError(f"{path}: cannot read video: {_ffmpeg_reason(e)}") from e
  return VideoInfo(fps, duration, width, height), reader


def probe_video(path: str | os.PathLike) -> VideoInfo:
  """Frame rate, duration and size of a video; VideoError when it is missing or unreadable."""
  info, reader = _open(os.fspath(path))
  reader.close()
  return info


def source_frame_indices(start_s: float, num_frames: int, fps: int,
                         source_fps: float) -> np.ndarray:
  """int64 [num_frames]: the source frame nearest to each time start_s + k / fps.

  Source frame j is taken to be at time j / source_fps (ffmpeg decodes at a constant rate).
  Ties (at 24 -> 16 fps every other frame is half-way) go to the later frame.
  """
  times = start_s + np.arange(num_frames) / fps
  # The epsilon keeps 73.49999999 (float error for an exact 73.5) from rounding down.
  return np.floor(times * source_fps + 0.5 + 1e-6).astype(np.int64)


def resize_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
  """[h, w, 3] uint8 -> [height, width, 3]: scaled to cover the target, centre-cropped."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = frame.shape[:2]
  if (h, w) == (height, width):
    return frame
  scale = max(height / h, width / w)
  crop_w, crop_h = width / scale, height / scale
  left, top = (w - crop_w) / 2, (h - crop_h) / 2
  # PIL's bilinear widens its kernel when shrinking, so downscaling is area-like, not aliased.
  image = Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR,
                                        box=(left, top, left + crop_w, top + crop_h))
  return np.asarray(image)


def resample_windows(path: str | os.PathLike, starts_s: Sequence[float], *, segments: int,
                     fps: int, height: int, width: int) -> Iterator[np.ndarray]:
  """Yields, for each window start (ascending, seconds), its uint8 video [T, height, width, 3].

  T = features.num_frames(segments, fps). The video is decoded once, streaming: only the frames
  some window uses are resized, and only those of unfinished windows are kept. A window may need
  one source frame past the last (its end is the video's end): it gets the last frame instead.
  Raises VideoError when the video is unreadable or ends before a window does.
  """
  path = os.fspath(path)
  num_frames = features.num_frames(segments, fps)
  if any(b < a for a, b in zip(starts_s, starts_s[1:])):
    raise ValueError(f"window starts must be ascending, got {list(starts_s)}")
  info, reader = _open(path)
  plans = [source_frame_indices(s, num_frames, fps, info.fps) for s in starts_s]
  wanted = set(np.concatenate(plans).tolist()) if plans else set()
  kept: dict[int, np.ndarray] = {}
  done = 0  # windows yielded
  last, raw = -1, None  # the last source frame read, undecoded

  def decode(data: bytes) -> np.ndarray:
    frame = np.frombuffer(data, np.uint8).reshape(info.height, info.width, 3)
    return resize_crop(frame, height, width)

  try:
    while done < len(plans):
      try:
        raw = next(reader)
      except StopIteration:
        break
      except RuntimeError as e:  # imageio_ffmpeg: ffmpeg died or a frame was cut short
        raise VideoError(f"{path}: cannot decode frame {last + 1}: {_ffmpeg_reason(e)}") from e
      last += 1
      if last in wanted:
        kept[last] = decode(raw)
      while done < len(plans) and plans[done][-1] <= last:
        yield np.stack([kept[i] for i in plans[done]])
        done += 1
        first_needed = plans[done][0] if done < len(plans) else math.inf
        for i in [i for i in kept if i < first_needed]:
          del kept[i]
    if done < len(plans) and last >= 0 and plans[done][-1] == last + 1:
      kept[last + 1] = kept[last] if last in kept else decode(raw)
      yield np.stack([kept[i] for i in plans[done]])
      done += 1
    if done < len(plans):
      raise VideoError(
          f"{path}: the video ends after {last + 1} frames ({(last + 1) / info.fps:.3f} s at "
          f"{info.fps:g} fps), before the window starting at {starts_s[done]:.3f} s ends "
          f"(it needs frame {int(plans[done][-1])})")
  finally:
    reader.close()


# --- The tfds builder -----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class StoryboardConfig(tfds.core.BuilderConfig):
  """What an example is: its length in segments, size, frame rate; and the held-out videos."""
  segments: int = 1
  height: int = 480
  width: int = 720
  fps: int = 16
  stride: int = 0  # segments from one example's start to the next's; 0: `segments` (no overlap)
  test_videos: tuple[str, ...] = ()


def make_config(segments: int, height: int = 480, width: int = 720, fps: int = 16,
                stride: int | None = None, test_videos: Iterable[str] = ()) -> StoryboardConfig:
  """A config named after its values, so that each variant gets its own directory.

  e.g. "9s_480x720_16fps"; "_strideK" when examples overlap, "_test<hash>" with held-out videos.
  """
  features.frames_per_segment(fps)  # raises for a frame rate the VAE cannot take
  stride = segments if stride is None else stride
  test_videos = tuple(sorted(set(test_videos)))
  if segments < 1 or stride < 1 or height < 1 or width < 1:
    raise ValueError(f"segments, stride, height and width must be positive, got segments="
                     f"{segments}, stride={stride}, height={height}, width={width}")
  name = f"{features.SEGMENT_SECONDS * segments}s_{height}x{width}_{fps}fps"
  if stride != segments:
    name += f"_stride{stride}"
  if test_videos:
    name += "_test" + hashlib.sha1("\n".join(test_videos).encode()).hexdigest()[:8]
  return StoryboardConfig(
      name=name, segments=segments, height=height, width=width, fps=fps, stride=stride,
      test_videos=test_videos,
      description=f"{segments} segment(s) of 3 s, {height}x{width} at {fps} fps, one example "
                  f"every {stride} segment(s); held out for test: {list(test_videos)}")


@dataclasses.dataclass(frozen=True)
class _Video:
  name: str
  annotation: ann_lib.VideoAnnotation
  first_segments: tuple[int, ...]  # the first segment of each example


class TomjerryStoryboard(tfds.core.GeneratorBasedBuilder):
  """Examples of N consecutive annotated 3-second segments of a folder of videos."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # The paper's five stages at its resolution; any other variant: make_config(...).
  BUILDER_CONFIGS = [make_config(n) for n in STAGE_SEGMENTS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the videos and their annotation JSONs (ttt_jax/data/annotations.py) in one folder and pass
  it as --manual_dir, or as source_dir to the builder.
  """

  def __init__(self, *, source_dir: str | os.PathLike | None = None, on_error: str = "fail",
               **kwargs):
    """source_dir: the folder of videos + annotations (default: the manual_dir of the download
    config). on_error: "fail" raises on the first bad video, "skip" reports and leaves it out.
    kwargs: those of tfds.core.GeneratorBasedBuilder (config, data_dir, file_format, ...)."""
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self._source_dir = source_dir
    self._on_error = on_error
    self._skipped: list[dict[str, str]] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(features=features.video_features(cfg.height, cfg.width),
                                          supervised_keys=None)

  @property
  def skip_report_path(self) -> pathlib.Path:
    return pathlib.Path(self.data_path) / SKIP_REPORT

  def skip_report(self) -> list[dict[str, str]]:
    """The videos left out and why: [{"file": path, "reason": message}], from the report file."""
    with open(self.skip_report_path, encoding="utf-8") as f:
      return json.load(f)["skipped"]

  def _report(self, file: str, reason: str, error: Exception | None = None) -> None:
    """Records a left-out video; an `error` is raised instead when on_error is "fail"."""
    if error is not None and self._on_error == "fail":
      raise error
    logging.warning("tomjerry_storyboard: skipping %s: %s", file, reason)
    self._skipped.append({"file": file, "reason": reason})
    self._write_report()

  def _write_report(self) -> None:
    # Rewritten at each entry, so the report is complete whenever generation stops.
    # self.data_dir is tfds's temporary directory here, renamed to data_path at the end.
    report = {"source_dir": str(self._source_dir), "segments": self.builder_config.segments,
              "on_error": self._on_error, "skipped": self._skipped}
    with open(os.path.join(self.data_dir, SKIP_REPORT), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)

  def _scan(self, source: pathlib.Path, annotation_files: list[pathlib.Path]) -> list[_Video]:
    """Loads every annotation and probes its video; reports what cannot be used."""
    cfg = self.builder_config
    stride = cfg.stride or cfg.segments
    videos = []
    # A video counts as described when an annotation names it, or shares its name: a broken
    # NAME.json is reported once, not again as "NAME.mp4 has no annotation".
    described = {os.path.abspath(p.with_suffix("")) for p in annotation_files}
    for path in annotation_files:
      name = path.relative_to(source).with_suffix("").as_posix()
      try:
        annotation = ann_lib.load_annotation(path)
        described.add(os.path.abspath(annotation.video))
        info = probe_video(annotation.video)
        ann_lib.check_against_video(annotation, info.duration_s)
      except (ann_lib.AnnotationError, VideoError) as e:
        self._report(str(path), str(e), e)
        continue
      n = len(annotation.segments)
      firsts = tuple(range(0, n - cfg.segments + 1, stride))
      if not firsts:
        self._report(str(path), f"{path}: {n} annotated segment(s), fewer than the "
                                f"{cfg.segments} of one example")
        continue
      if firsts[-1] + cfg.segments < n:
        logging.info("tomjerry_storyboard: %s: segments %d..%d are in no example", name,
                     firsts[-1] + cfg.segments, n - 1)
      videos.append(_Video(name, annotation, firsts))
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS):
      if not {os.path.abspath(path), os.path.abspath(path.with_suffix(""))} & described:
        reason = (f"{path}: no annotation describes this video "
                  f"(expected {path.with_suffix('.json')})")
        self._report(str(path), reason, VideoError(reason))
    return videos

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = pathlib.Path(self._source_dir or dl_manager.manual_dir)
    if not source.is_dir():
      raise FileNotFoundError(f"{source}: source folder of videos and annotations not found")
    annotation_files = sorted(source.rglob("*.json"))
    names = {p.relative_to(source).with_suffix("").as_posix() for p in annotation_files}
    held_out = set(self.builder_config.test_videos)
    if held_out - names:
      raise ValueError(f"test_videos {sorted(held_out - names)} have no annotation in {source}")
    self._source_dir, self._skipped = source, []
    self._write_report()
    videos = self._scan(source, annotation_files)
    splits = {"train": self._generate_examples([v for v in videos if v.name not in held_out])}
    if held_out:
      splits["test"] = self._generate_examples([v for v in videos if v.name in held_out])
    return splits

  def _generate_examples(self, videos: list[_Video]):
    cfg = self.builder_config
    for video in videos:
      segs = video.annotation.segments
      starts = [segs[i].start for i in video.first_segments]
      windows = resample_windows(video.annotation.video, starts, segments=cfg.segments,
                                 fps=cfg.fps, height=cfg.height, width=cfg.width)
      # closing(): stops ffmpeg as soon as this video is done, not when the generator is collected.
      with contextlib.closing(windows):
        for first in video.first_segments:
          try:
            frames = next(windows)
          except VideoError as e:
            self._report(video.annotation.video,
                         f"{e}; its examples from segment {first} on are left out", e)
            break
          window = segs[first:first + cfg.segments]
          key = f"{video.name}/{first}"
          yield key, {
              "id": key,
              "video": frames,
              "fps": np.int32(cfg.fps),
              "texts": [s.text for s in window],
              "scene_start": np.array([s.scene_start for s in window]),
              "scene_end": np.array([s.scene_end for s in window]),
          }


def build(source_dir: str | os.PathLike, data_dir: str | os.PathLike, *, segments: int,
          height: int, width: int, fps: int, stride: int | None = None,
          test_videos: Iterable[str] = (), on_error: str = "fail",
          file_format: str = "array_record") -> TomjerryStoryboard:
  """Builds (or finds already built) the dataset of `source_dir` under `data_dir`.

  Returns the builder: `builder.as_data_source()[split]`, `builder.data_path` (the directory to
  hand to precompute), `builder.skip_report()`.
  """
  if not os.path.isdir(source_dir):  # before tfds makes any folder under data_dir
    raise FileNotFoundError(f"{source_dir}: source folder of videos and annotations not found")
  builder = TomjerryStoryboard(
      source_dir=source_dir, on_error=on_error, data_dir=data_dir, file_format=file_format,
      config=make_config(segments, height, width, fps, stride, test_videos))
  # tfds's statistics go through tf.data; they would import TensorFlow.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  c = f.config
  builder = build(f.source, f.data_dir, segments=c.segments, height=c.height, width=c.width,
                  fps=c.fps, stride=f.stride or None, test_videos=f.test_videos,
                  on_error=f.on_error)
  print(json.dumps({"dataset": str(builder.data_path),
                    "examples": {k: v.num_examples for k, v in builder.info.splits.items()},
                    "skipped": len(builder.skip_report())}))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from ttt_jax import cli  # pylint: disable=g-import-not-at-top

  # tfds reads a builder's package metadata, which a class defined in __main__ has not: run the
  # module's own copy, unregistered (this __main__ copy already holds the name).
  with tfds.core.registered.skip_registration():
    from ttt_jax.data.builders import tomjerry_storyboard as module  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]: segments, "
                                  "height, width, fps", lock_config=True)
  flags.DEFINE_string("source", None, "folder of videos and their annotation JSON files")
  flags.DEFINE_string("data_dir", None, "tfds data directory to build into")
  flags.DEFINE_integer("stride", 0, "segments between example starts (0: no overlap)")
  flags.DEFINE_list("test_videos", [], "video names held out as the test split")
  flags.DEFINE_enum("on_error", "fail", ON_ERROR, "a bad video: stop, or skip and report it")
  flags.mark_flags_as_required(["config", "source", "data_dir"])
  cli.run_absl(module.main)
