"""Storyboard validation (errors name file, segment and field) and mp4/contact-sheet writing."""
import json

import numpy as np
import pytest

from ttt_jax.data.storyboard import (Segment, StoryboardError, load_storyboard, parse_storyboard,
                                     segment_prompts)
from ttt_jax.data.video_io import contact_sheet, from_uint8, read_mp4, to_uint8, write_mp4


def test_parse_defaults_and_scene_tokens(tmp_path):
  path = tmp_path / "story.json"
  path.write_text(json.dumps([
      {"text": " Tom naps. "},
      {"text": "Jerry sneaks.", "negative_text": "blurry"},
      {"text": "New room.", "scene_transition": True},
  ]))
  segs = load_storyboard(path)
  assert segs == [Segment("Tom naps.", True), Segment("Jerry sneaks.", False, "blurry"),
                  Segment("New room.", True)]
  prompts, negatives = segment_prompts(segs)
  assert prompts == ["<start_scene>Tom naps.", "Jerry sneaks.<end_scene>",
                     "<start_scene>New room.<end_scene>"]
  assert negatives == ["", "blurry", ""]


@pytest.mark.parametrize("data,match", [
    ([], "non-empty JSON list"),
    ({"text": "x"}, "non-empty JSON list"),
    (["x"], "segment 0: expected an object"),
    ([{"text": "a"}, {"text": ""}], "segment 1: field 'text'"),
    ([{"text": "a"}, {"txt": "b"}], r"segment 1: unknown field\(s\) \['txt'\]"),
    ([{"text": "a", "scene_transition": "yes"}], "segment 0: field 'scene_transition'"),
    ([{"text": "a", "negative_text": 3}], "segment 0: field 'negative_text'"),
])
def test_malformed_storyboards_name_segment_and_field(data, match):
  with pytest.raises(StoryboardError, match=match):
    parse_storyboard(data, "story.json")


def test_unreadable_file_errors(tmp_path):
  with pytest.raises(StoryboardError, match="cannot read"):
    load_storyboard(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("[{")
  with pytest.raises(StoryboardError, match="bad.json: not valid JSON"):
    load_storyboard(bad)


def test_mp4_roundtrip_frame_count_size_fps(tmp_path):
  rng = np.random.default_rng(0)
  # Smooth content so H.264 keeps it close; frame k has mean brightness rising with k.
  video = np.linspace(-0.8, 0.8, 17)[:, None, None, None] + 0.05 * rng.standard_normal(
      (17, 24, 40, 3))
  write_mp4(tmp_path / "v.mp4", to_uint8(video), fps=16)
  frames, fps = read_mp4(tmp_path / "v.mp4")
  assert frames.shape == (17, 24, 40, 3) and fps == 16
  means = frames.reshape(17, -1).mean(axis=1)
  np.testing.assert_allclose(means, to_uint8(video).reshape(17, -1).mean(axis=1), atol=4)
  assert not list(tmp_path.glob("*.tmp*"))


def test_contact_sheet_and_bad_video():
  frames = np.arange(5)[:, None, None, None] * np.ones((5, 2, 3, 3), np.uint8)
  sheet = contact_sheet(frames, [0, 2, 4], columns=2)
  assert sheet.shape == (4, 6, 3)
  assert sheet[0, 0, 0] == 0 and sheet[0, 3, 0] == 2 and sheet[2, 0, 0] == 4 and sheet[2, 3, 0] == 0
  with pytest.raises(ValueError, match="NaN"):
    to_uint8(np.array([np.nan]))
  with pytest.raises(ValueError, match="uint8"):
    write_mp4("x.mp4", np.zeros((2, 4, 4, 3), np.float32))


def test_from_uint8_inverts_to_uint8():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  x = from_uint8(pixels)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(to_uint8(x), pixels)
