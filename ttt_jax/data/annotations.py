"""Training annotations of long videos: one JSON file per video, a paragraph per 3-second segment.

Next to `NAME.mp4`, a `NAME.json`:

    {
      "video": "NAME.mp4",
      "segments": [
        {"start": 12.0, "end": 15.0, "text": "Tom tiptoes into the kitchen ...",
         "scene_start": true},
        {"start": 15.0, "end": 18.0, "text": "Jerry peeks out of his hole ...",
         "scene_end": true},
        {"start": 18.0, "end": 21.0, "text": "In the garden, Spike ..."}
      ]
    }

`video` (optional; default `NAME.mp4`) is the video file, relative to the annotation's folder.
`segments` (required, non-empty) are consecutive 3-second windows of the video, in order:

- `start`, `end` (required numbers, seconds from the start of the video): every segment is 3 s
  long, segment i+1 starts where segment i ends, and segment i starts at
  `segments[0].start + 3 * i`, each within TOLERANCE_S (about one frame at 24 fps). The last rule
  keeps small errors from adding up over a long video, whose examples are cut on the 3-second
  grid from the first segment's start. The first segment may start after 0 (to leave out a title
  card) and the last may end before the video does; gaps inside are errors (cut the video in two
  instead, each with its own annotation).
- `text` (required, non-empty string): the segment's paragraph, without scene tokens.
- `scene_start`, `scene_end` (optional bools): the segment starts / ends a scene. The first segment
  always starts a scene and the last always ends one (`false` there is an error). Segment i's
  `scene_end` and segment i+1's `scene_start` mark the same boundary, so either may be given
  (both must then agree); a boundary marked by neither is not a scene boundary.

Unknown fields are errors, so that a typo (`"scene_stat"`) is not silently ignored. Every error is
an AnnotationError whose message names the file, the segment index and the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ttt_jax.data.features import SEGMENT_SECONDS

# Slack on segment times, in seconds: annotators work on frame boundaries of 24 or 30 fps video.
TOLERANCE_S = 0.05

_TOP_FIELDS = {"video", "segments"}
_SEGMENT_FIELDS = {"start", "end", "text", "scene_start", "scene_end"}


class AnnotationError(ValueError):
  """A malformed annotation; the message names the file, segment and field."""


@dataclasses.dataclass(frozen=True)
class AnnotatedSegment:
  """One 3-second segment: [start, end) seconds of the video and its paragraph."""
  start: float
  end: float
  text: str
  scene_start: bool
  scene_end: bool


@dataclasses.dataclass(frozen=True)
class VideoAnnotation:
  """A validated annotation file: `path` (the JSON), `video` (the video file it describes)."""
  path: str
  video: str
  segments: tuple[AnnotatedSegment, ...]


def _number(seg: dict, field: str, where: str) -> float:
  value = seg.get(field)
  # bool is an int subclass: `"start": true` is a typo, not 1 second.
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise AnnotationError(f"{where}: field {field!r} must be a number of seconds, got {value!r}")
  if value < 0:
    raise AnnotationError(f"{where}: field {field!r} must be >= 0, got {value!r}")
  return float(value)


def _optional_bool(seg: dict, field: str, where: str) -> bool | None:
  value = seg.get(field)
  if value is not None and not isinstance(value, bool):
    raise AnnotationError(f"{where}: field {field!r} must be true or false, got {value!r}")
  return value


def _scene_marks(raw: list[tuple[bool | None, bool | None]],
                 source: str) -> list[tuple[bool, bool]]:
  """Resolves the (scene_start, scene_end) given per segment into the full marks [N]."""
  n = len(raw)
  if raw[0][0] is False:
    raise AnnotationError(f"{source}: segment 0: field 'scene_start': the first segment always "
                          f"starts a scene, got false")
  if raw[-1][1] is False:
    raise AnnotationError(f"{source}: segment {n - 1}: field 'scene_end': the last segment "
                          f"always ends a scene, got false")
  # boundary[i]: a scene boundary between segment i - 1 and segment i (0 and n: the ends).
  boundary = [True] + [False] * (n - 1) + [True]
  for i in range(1, n):
    ends, starts = raw[i - 1][1], raw[i][0]
    if ends is not None and starts is not None and ends != starts:
      raise AnnotationError(
          f"{source}: segment {i}: field 'scene_start': {str(starts).lower()} disagrees with "
          f"segment {i - 1}'s scene_end {str(ends).lower()}; both mark the same boundary")
    boundary[i] = bool(ends or starts)
  return [(boundary[i], boundary[i + 1]) for i in range(n)]


def parse_annotation(data: Any, source: str, default_video: str) -> VideoAnnotation:
  """Validates a decoded annotation; `default_video` is used when it names no video."""
  if not isinstance(data, dict):
    raise AnnotationError(f"{source}: expected a JSON object with 'segments', "
                          f"got {type(data).__name__}")
  unknown = set(data) - _TOP_FIELDS
  if unknown:
    raise AnnotationError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: "
                          f"{sorted(_TOP_FIELDS)}")
  video = data.get("video", default_video)
  if not isinstance(video, str) or not video.strip():
    raise AnnotationError(f"{source}: field 'video' must be a file name, got {video!r}")
  video = os.path.join(os.path.dirname(source), video)
  raw_segments = data.get("segments")
  if not isinstance(raw_segments, list) or not raw_segments:
    raise AnnotationError(f"{source}: field 'segments' must be a non-empty list, "
                          f"got {raw_segments!r}")

  fields = []
  for i, seg in enumerate(raw_segments):
    where = f"{source}: segment {i}"
    if not isinstance(seg, dict):
      raise AnnotationError(f"{where}: expected an object, got {type(seg).__name__}")
    unknown = set(seg) - _SEGMENT_FIELDS
    if unknown:
      raise AnnotationError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: "
                            f"{sorted(_SEGMENT_FIELDS)}")
    text = seg.get("text")
    if not isinstance(text, str) or not text.strip():
      raise AnnotationError(f"{where}: field 'text' must be a non-empty string, got {text!r}")
    start, end = _number(seg, "start", where), _number(seg, "end", where)
    if abs(end - start - SEGMENT_SECONDS) > TOLERANCE_S:
      raise AnnotationError(f"{where}: field 'end': the segment is {end - start:.3f} s long "
                            f"(start {start:.3f}, end {end:.3f}), expected {SEGMENT_SECONDS} s")
    if i:
      prev_end = fields[-1][1]
      if abs(start - prev_end) > TOLERANCE_S:
        kind = "a gap" if start > prev_end else "an overlap"
        raise AnnotationError(
            f"{where}: field 'start': starts at {start:.3f} s but segment {i - 1} ends at "
            f"{prev_end:.3f} s ({kind} of {abs(start - prev_end):.3f} s); segments must be "
            f"consecutive")
      on_grid = fields[0][0] + SEGMENT_SECONDS * i
      if abs(start - on_grid) > TOLERANCE_S:
        raise AnnotationError(
            f"{where}: field 'start': starts at {start:.3f} s, off the {SEGMENT_SECONDS}-second "
            f"grid of segment 0 (expected {on_grid:.3f} s)")
    fields.append((start, end, text.strip(), _optional_bool(seg, "scene_start", where),
                   _optional_bool(seg, "scene_end", where)))

  marks = _scene_marks([f[3:] for f in fields], source)
  segments = tuple(AnnotatedSegment(start, end, text, scene_start, scene_end)
                   for (start, end, text, _, _), (scene_start, scene_end) in zip(fields, marks))
  return VideoAnnotation(source, video, segments)


def load_annotation(path: str | os.PathLike) -> VideoAnnotation:
  """Reads and validates an annotation file; its video defaults to the same name with .mp4."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise AnnotationError(f"{path}: cannot read annotation: {e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AnnotationError(f"{path}: not valid JSON: {e}") from e
  default_video = os.path.splitext(os.path.basename(path))[0] + ".mp4"
  return parse_annotation(data, path, default_video)


def check_against_video(annotation: VideoAnnotation, duration_s: float) -> None:
  """Raises AnnotationError when a segment ends after the video (`duration_s` seconds) does."""
  for i, seg in enumerate(annotation.segments):
    if seg.end > duration_s + TOLERANCE_S:
      raise AnnotationError(
          f"{annotation.path}: segment {i}: field 'end': ends at {seg.end:.3f} s, after the end "
          f"of the video {annotation.video} ({duration_s:.3f} s long)")
