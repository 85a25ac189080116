"""tomjerry_storyboard: annotations, resampling, the tfds builder and its error reports.

The test videos carry their frame index as 8 black/white stripes (a binary number) in the middle
columns, between a red left band and a blue right band that the 32x32 centre crop must cut off,
so every resampled frame tells which source frame it came from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ttt_jax.data import annotations as ann_lib
from ttt_jax.data import features
from ttt_jax.data import video_io
from ttt_jax.data.builders import tomjerry_storyboard as tjs

SRC_H, SRC_W = 64, 96
H, W, FPS = 32, 32, 16


def _video(num_frames: int) -> np.ndarray:
  """uint8 [num_frames, 64, 96, 3]: frame i shows i in binary, most significant stripe on top."""
  frames = np.zeros((num_frames, SRC_H, SRC_W, 3), np.uint8)
  frames[:, :, :16] = (255, 0, 0)
  frames[:, :, -16:] = (0, 0, 255)
  for i in range(num_frames):
    for bit in range(8):
      if i >> (7 - bit) & 1:
        frames[i, bit * 8:(bit + 1) * 8, 16:-16] = 255
  return frames


def _decode_indices(video: np.ndarray) -> np.ndarray:
  """[T, 32, 32, 3] resampled frames -> int [T]: the source frame each shows."""
  stripe = H // 8
  gray = video[:, stripe // 2::stripe, 4:-4].mean(axis=(2, 3))  # [T, 8] middle row of each bit
  bits = (gray > 128).astype(np.int64)
  return bits @ (1 << np.arange(7, -1, -1))


def _segments(start: float, count: int, **marks) -> list[dict]:
  """`count` consecutive 3-second segments from `start`; marks: {index: {field: value}}."""
  segs = [{"start": start + 3 * i, "end": start + 3 * (i + 1), "text": f"Paragraph {i}."}
          for i in range(count)]
  for i, fields in marks.items():
    segs[int(i)].update(fields)
  return segs


def _write(folder, name: str, segments=None, seconds: float | None = None, fps: int = 24,
           raw: str | None = None) -> None:
  """Writes NAME.json (segments, or raw text) and NAME.mp4 (`seconds` long; none when None)."""
  path = os.path.join(folder, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if raw is not None or segments is not None:
    with open(path + ".json", "w") as f:
      f.write(raw if raw is not None else json.dumps({"segments": segments}))
  if seconds is not None:
    video_io.write_mp4(path + ".mp4", _video(round(seconds * fps)), fps=fps)


# The bad cases: name -> (annotation segments, video seconds, words the error must contain).
BAD = {
    "bad_len": (_segments(0, 2, **{"1": {"end": 5.5}}), 1, ["segment 1", "'end'", "2.500 s"]),
    "bad_text": (_segments(0, 2, **{"1": {"text": ""}}), 1, ["segment 1", "'text'"]),
    "bad_gap": (_segments(0, 1) + _segments(3.5, 1), 1, ["segment 1", "'start'", "a gap"]),
    "too_long": (_segments(0, 2), 4, ["segment 1", "'end'", "after the end of the video"]),
    "corrupt": (_segments(0, 1), None, ["corrupt.mp4", "cannot read video"]),
    "missing": (_segments(0, 1), None, ["missing.mp4", "not found"]),
    "orphan": (None, 1, ["orphan.mp4", "no annotation"]),
}


def _write_bad(folder, name: str) -> None:
  segments, seconds, _ = BAD[name]
  _write(folder, name, segments, seconds)
  if name == "corrupt":
    with open(os.path.join(folder, "corrupt.mp4"), "wb") as f:
      f.write(np.random.default_rng(0).bytes(4096))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """Three usable videos (24 and 30 fps, one in a subfolder) and every bad case."""
  folder = tmp_path_factory.mktemp("source")
  # Starts half a second in; segment 1 opens a new scene.
  _write(folder, "ep_a", _segments(0.5, 3, **{"1": {"scene_start": True}}), seconds=10)
  # Ends exactly where the video does: the last frame wants the frame after the last one.
  _write(folder, "s2/ep_b", _segments(0, 2), seconds=6, fps=30)
  _write(folder, "short", _segments(0, 1), seconds=4)
  for name in BAD:
    _write_bad(folder, name)
  return folder


def _read(builder, split: str = "train") -> dict[str, dict]:
  data = builder.as_data_source()[split]
  examples = [data[i] for i in range(len(data))]
  return {ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]: ex for ex in examples}


def _texts(ex) -> list[str]:
  return [t.decode() if isinstance(t, bytes) else t for t in ex["texts"]]


def test_source_frame_indices_24_and_30_fps():
  # 16 fps from 24: 1.5 source frames a frame, ties to the later frame; from 30: 1.875.
  np.testing.assert_array_equal(tjs.source_frame_indices(0.0, 5, 16, 24.0), [0, 2, 3, 5, 6])
  np.testing.assert_array_equal(tjs.source_frame_indices(1.0, 4, 16, 30.0), [30, 32, 34, 36])


def test_resize_crop_keeps_the_centre():
  out = tjs.resize_crop(_video(182)[181], H, W)
  assert out.shape == (H, W, 3) and out.dtype == np.uint8
  assert _decode_indices(out[None])[0] == 181
  # The red and blue bands are cropped off (column 0 may blend in a little of the red).
  assert np.abs(out[:, 1:, 0].astype(int) - out[:, 1:, 2]).max() < 40


def test_build_skip_reads_back_schema_timing_and_report(source, tmp_path):
  builder = tjs.build(source, tmp_path, segments=1, height=H, width=W, fps=FPS, on_error="skip")
  examples = _read(builder)
  assert sorted(examples) == ["ep_a/0", "ep_a/1", "ep_a/2", "s2/ep_b/0", "s2/ep_b/1", "short/0"]
  starts = {"ep_a": (0.5, 24), "s2/ep_b": (0.0, 30), "short": (0.0, 24)}
  for key, ex in examples.items():
    features.check_example(ex, H, W)
    name, first = key.rsplit("/", 1)
    assert ex["video"].shape == (features.num_frames(1, FPS), H, W, 3)
    assert int(ex["fps"]) == FPS and _texts(ex) == [f"Paragraph {first}."]
    start, src_fps = starts[name]
    times = start + 3 * int(first) + np.arange(ex["video"].shape[0]) / FPS
    # Frame k is the source frame nearest start + k / fps: within one source frame of it.
    np.testing.assert_allclose(_decode_indices(ex["video"]), times * src_fps, atol=1.0)
  marks = {k: (ex["scene_start"].tolist(), ex["scene_end"].tolist()) for k, ex in examples.items()}
  assert marks["ep_a/0"] == ([True], [True]) and marks["ep_a/1"] == ([True], [False])
  assert marks["ep_a/2"] == ([False], [True]) and marks["s2/ep_b/0"] == ([True], [False])

  report = builder.skip_report()
  assert builder.skip_report_path.parent == builder.data_path
  reasons = {os.path.splitext(os.path.basename(r["file"]))[0]: r["reason"] for r in report}
  assert sorted(reasons) == sorted(BAD)
  for name, (_, _, words) in BAD.items():
    assert f"{name}." in reasons[name]  # names the file
    for word in words:
      assert word in reasons[name], (name, reasons[name])


def test_longer_examples_windows_and_held_out_split(source, tmp_path):
  two = tjs.build(source, tmp_path / "a", segments=2, height=H, width=W, fps=FPS,
                  on_error="skip", test_videos=["s2/ep_b"])
  assert sorted(_read(two)) == ["ep_a/0"]
  (ep_b,) = _read(two, "test").values()
  assert ep_b["video"].shape == (features.num_frames(2, FPS), H, W, 3)
  np.testing.assert_array_equal(ep_b["scene_start"], [True, False])
  np.testing.assert_array_equal(ep_b["scene_end"], [False, True])
  assert [r for r in two.skip_report() if "short.json" in r["file"]][0]["reason"].endswith(
      "fewer than the 2 of one example")

  overlapping = tjs.build(source, tmp_path / "b", segments=2, height=H, width=W, fps=FPS,
                          stride=1, on_error="skip")
  examples = _read(overlapping)
  assert sorted(examples) == ["ep_a/0", "ep_a/1", "s2/ep_b/0"]
  assert _texts(examples["ep_a/1"]) == ["Paragraph 1.", "Paragraph 2."]
  times = 3.5 + np.arange(features.num_frames(2, FPS)) / FPS
  np.testing.assert_allclose(_decode_indices(examples["ep_a/1"]["video"]), times * 24, atol=1.0)


@pytest.mark.parametrize("name", sorted(BAD))
def test_build_fail_raises_naming_file_segment_field(name, tmp_path):
  folder = tmp_path / "source"
  _write(folder, "good", _segments(0, 1), seconds=4)
  _write_bad(folder, name)
  with pytest.raises(ValueError) as error:
    tjs.build(folder, tmp_path / "data", segments=1, height=H, width=W, fps=FPS)
  assert isinstance(error.value, (ann_lib.AnnotationError, tjs.VideoError))
  assert f"{name}." in str(error.value)
  for word in BAD[name][2]:
    assert word in str(error.value)


@pytest.mark.parametrize("raw, words", [
    ("{not json", ["not valid JSON"]),
    (json.dumps([{"text": "a"}]), ["expected a JSON object"]),
    (json.dumps({"segments": []}), ["'segments'"]),
    (json.dumps({"segments": [{"start": 0, "end": 3}]}), ["segment 0", "'text'"]),
    (json.dumps({"segments": [{"start": 0, "end": 3, "text": "a", "scene_stat": True}]}),
     ["segment 0", "scene_stat"]),
    (json.dumps({"segments": _segments(0, 1), "fps": 24}), ["unknown field", "fps"]),
    (json.dumps({"segments": [{"start": True, "end": 3, "text": "a"}]}), ["segment 0", "'start'"]),
    (json.dumps({"segments": _segments(0, 1) + _segments(2.5, 1)}),
     ["segment 1", "'start'", "an overlap"]),
    (json.dumps({"segments": _segments(0, 2, **{"0": {"scene_end": True},
                                                "1": {"scene_start": False}})}),
     ["segment 1", "'scene_start'", "disagrees"]),
    (json.dumps({"segments": _segments(0, 2, **{"0": {"scene_start": False}})}),
     ["segment 0", "'scene_start'"]),
    (json.dumps({"segments": _segments(0, 2, **{"1": {"scene_end": False}})}),
     ["segment 1", "'scene_end'"]),
])
def test_annotation_errors(raw, words, tmp_path):
  path = tmp_path / "ep.json"
  path.write_text(raw)
  with pytest.raises(ann_lib.AnnotationError) as error:
    ann_lib.load_annotation(path)
  assert str(path) in str(error.value)
  for word in words:
    assert word in str(error.value)


def test_annotation_defaults_and_grid(tmp_path):
  path = tmp_path / "ep.json"
  # Within one frame of the grid is fine (annotators work on 24 / 30 fps frame boundaries).
  segs = [{"start": 0.0, "end": 3.04, "text": " a "},
          {"start": 3.04, "end": 6.0, "text": "b", "scene_start": True}, _segments(6, 1)[0]]
  path.write_text(json.dumps({"segments": segs}))
  annotation = ann_lib.load_annotation(path)
  assert annotation.video == str(tmp_path / "ep.mp4")
  assert [s.text for s in annotation.segments] == ["a", "b", "Paragraph 0."]
  assert [(s.scene_start, s.scene_end) for s in annotation.segments] == [
      (True, True), (True, False), (False, True)]
  ann_lib.check_against_video(annotation, 9.0)
  with pytest.raises(ann_lib.AnnotationError, match="segment 2: field 'end'"):
    ann_lib.check_against_video(annotation, 8.9)


def test_resample_past_the_end_of_the_video(source):
  with pytest.raises(tjs.VideoError, match="short.mp4: the video ends after 96 frames"):
    list(tjs.resample_windows(source / "short.mp4", [0.0, 1.5], segments=1, fps=FPS,
                              height=H, width=W))


def test_build_does_not_import_tensorflow(source, tmp_path):
  script = textwrap.dedent(f"""
      import sys
      from ttt_jax.data.builders import tomjerry_storyboard as tjs
      b = tjs.build({str(source / "s2")!r}, {str(tmp_path)!r}, segments=1, height=8, width=8,
                    fps=16)
      assert len(b.as_data_source()["train"]) == 2
      print("tensorflow" in sys.modules)
  """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, cwd=repo)
  assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
