"""Sampling storyboards: a JSON list of 3-second segments.

    [
      {"text": "Tom chases Jerry across the kitchen ...", "scene_transition": true,
       "negative_text": "blurry, low quality"},
      {"text": "Jerry hides in a teacup ...", "scene_transition": false},
      ...
    ]

`text` (required, non-empty) is the segment's paragraph. `scene_transition` (bool, default: true
for the first segment, false otherwise) marks that this segment starts a new scene: it gets the
`<start_scene>` token and the previous segment the `<end_scene>` token (the last segment always
ends its scene). `negative_text` (default "") is the classifier-free-guidance negative prompt.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ttt_jax.data.tokenizer import segment_text

_FIELDS = {"text", "scene_transition", "negative_text"}


class StoryboardError(ValueError):
  """A malformed storyboard; the message names the file, segment and field."""


@dataclasses.dataclass(frozen=True)
class Segment:
  text: str
  scene_transition: bool
  negative_text: str = ""


def parse_storyboard(data: Any, source: str = "<storyboard>") -> list[Segment]:
  """Validates a decoded storyboard (a list of dicts) and returns its segments."""
  if not isinstance(data, list) or not data:
    raise StoryboardError(f"{source}: expected a non-empty JSON list of segments, "
                          f"got {type(data).__name__}")
  segments = []
  for i, seg in enumerate(data):
    where = f"{source}: segment {i}"
    if not isinstance(seg, dict):
      raise StoryboardError(f"{where}: expected an object, got {type(seg).__name__}")
    unknown = set(seg) - _FIELDS
    if unknown:
      raise StoryboardError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: "
                            f"{sorted(_FIELDS)}")
    text = seg.get("text")
    if not isinstance(text, str) or not text.strip():
      raise StoryboardError(f"{where}: field 'text' must be a non-empty string, got {text!r}")
    transition = seg.get("scene_transition", i == 0)
    if not isinstance(transition, bool):
      raise StoryboardError(f"{where}: field 'scene_transition' must be true or false, "
                            f"got {transition!r}")
    negative = seg.get("negative_text", "")
    if not isinstance(negative, str):
      raise StoryboardError(f"{where}: field 'negative_text' must be a string, got {negative!r}")
    segments.append(Segment(text.strip(), transition or i == 0, negative))
  return segments


def load_storyboard(path: str | os.PathLike) -> list[Segment]:
  """Reads and validates a storyboard JSON file."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise StoryboardError(f"{path}: cannot read storyboard: {e}") from e
  except json.JSONDecodeError as e:
    raise StoryboardError(f"{path}: not valid JSON: {e}") from e
  return parse_storyboard(data, os.fspath(path))


def segment_prompts(segments: list[Segment]) -> tuple[list[str], list[str]]:
  """Per-segment prompt texts with scene tokens, and the negative prompts."""
  prompts = []
  for i, seg in enumerate(segments):
    ends = i + 1 == len(segments) or segments[i + 1].scene_transition
    prompts.append(segment_text(seg.text, scene_start=seg.scene_transition, scene_end=ends))
  return prompts, [seg.negative_text for seg in segments]
