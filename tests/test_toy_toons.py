"""toy_toons: generator, texts, metrics (on truth, corruptions, mp4), and the tfds builder."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ttt_jax.data import features, storyboard, video_io
from ttt_jax.data import toy_toons as toy
from ttt_jax.data.builders import toy_toons as toy_builder

FPS = 16
FIRST = 1 + 3 * FPS  # frames of the first segment, shared first frame included


def _next(names, current, avoid=()):
  """A palette name other than `current` and `avoid`."""
  return next(n for n in names if n != current and n not in avoid)


def _after_first(truth: np.ndarray, other: toy.Story) -> np.ndarray:
  """`truth` for segment 1, then `other` (same motion, changed looks) from segment 2 on."""
  video = truth.copy()
  video[FIRST:] = toy.render(other)[FIRST:]
  return video


@pytest.fixture(scope="module")
def story():
  s = toy.generate_story(2, 5)
  # The corruptions below rely on these; a generator change that breaks them should say so.
  assert len({c.shape for c in s.characters}) == 2 and len({c.color for c in s.characters}) == 2
  assert s.actions[1:] and any(a[0] != a[1] for a in s.actions[1:])
  return s


@pytest.fixture(scope="module")
def truth(story):
  return toy.render(story)


def _corrupt(name: str, story: toy.Story, truth: np.ndarray) -> np.ndarray:
  a, b = story.characters
  if name == "other_facts":  # every stated fact wrong after segment 1
    colors = [c for c in toy.CHARACTER_COLORS if c not in (a.color, b.color)]
    other = dataclasses.replace(
        story, room=_next(toy.ROOM_COLORS, story.room), floor=_next(toy.FLOOR_COLORS, story.floor),
        characters=(dataclasses.replace(a, color=colors[0], shape=b.shape),
                    dataclasses.replace(b, color=colors[1], shape=a.shape)))
    return _after_first(truth, other)
  if name == "noise":
    return np.random.default_rng(0).integers(0, 256, truth.shape, dtype=np.uint8)
  if name == "colors_swapped":  # each character wears the other's colour
    return _after_first(truth, dataclasses.replace(story, characters=(
        dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))))
  if name == "room_recolored":
    return _after_first(truth, dataclasses.replace(story, room=_next(toy.ROOM_COLORS, story.room)))
  if name == "identity_swapped":  # whole appearances swapped: A looks like B and vice versa
    return _after_first(truth, dataclasses.replace(story, characters=(
        dataclasses.replace(a, color=b.color, shape=b.shape),
        dataclasses.replace(b, color=a.color, shape=a.shape))))
  if name == "reversed":
    return truth[::-1].copy()
  if name == "frozen":
    return np.repeat(truth[:1], len(truth), axis=0)
  raise ValueError(name)


# --- Generation and texts ---------------------------------------------------------------------


def test_deterministic_by_seed():
  one, two = toy.generate_story(11, 3), toy.generate_story(11, 3)
  assert one == two
  assert toy.render(one).tobytes() == toy.render(two).tobytes()
  assert toy.story_texts(one) == toy.story_texts(two)
  assert toy.render(toy.generate_story(12, 3)).tobytes() != toy.render(one).tobytes()


@pytest.mark.parametrize("segments,height,width", [(1, 32, 48), (3, 32, 48), (2, 64, 96)])
def test_example_follows_schema(segments, height, width):
  story = toy.generate_story(5, segments, height=height, width=width)
  example = toy.make_example(story)
  features.check_example(example, height, width)
  assert example["video"].dtype == np.uint8
  assert example["video"].shape == (features.num_frames(segments, FPS), height, width, 3)
  assert toy.Story.from_json(example["story"]) == story
  start, end = example["scene_start"], example["scene_end"]
  assert start[0] and end[-1] and (end[:-1] == start[1:]).all()


def test_sprites_stay_in_frame_and_apart():
  for seed in range(20):
    story = toy.generate_story(seed, 6)
    g = toy.geometry(story.height, story.width)
    xy = toy.trajectories(story)  # [frames, characters, 2]
    assert (xy >= 0).all() and (xy[..., 0] <= g.width - g.sprite).all()
    assert (xy[..., 1] <= g.height - g.sprite).all()
    gap = np.abs(xy[:, 0] - xy[:, 1])
    assert ((gap[:, 0] > g.sprite) | (gap[:, 1] > g.sprite)).all()


def test_facts_only_in_first_segment():
  for seed in range(20):
    story = toy.generate_story(seed, 4)
    texts = toy.story_texts(story)
    first = texts[0].lower()
    for word in (story.room, story.floor, *(w for c in story.characters for w in (c.color,
                                                                                  c.shape))):
      assert word in first
    for text in texts[1:]:
      words = set(re.findall(r"[a-z]+", text.lower()))
      assert not words & toy.FACT_WORDS, text
      assert all(c.name in text for c in story.characters)


def test_storyboard_round_trip():
  story = toy.generate_story(3, 6)
  segments = storyboard.parse_storyboard(toy.story_to_storyboard(story))
  assert [s.text for s in segments] == toy.story_texts(story)
  assert tuple(s.scene_transition for s in segments) == story.scene_start


# --- Metrics ----------------------------------------------------------------------------------


def test_persistence_is_one_on_truth(story, truth):
  score = toy.persistence_score(truth, story)
  assert score["overall"] == 1.0
  assert score["room"] == score["color"] == score["shape"] == [1.0] * story.segments
  assert toy.persistence_score(truth, story.facts) == score  # facts alone suffice


@pytest.mark.parametrize("name,limit", [("other_facts", 0.05), ("noise", 0.05),
                                        ("colors_swapped", 0.7), ("room_recolored", 0.7)])
def test_persistence_drops_on_corruptions(story, truth, name, limit):
  score = toy.persistence_score(_corrupt(name, story, truth), story)
  assert score["overall"] <= limit, score
  if name == "colors_swapped":  # colours are all there, bound to the wrong shapes
    assert score["color_later"] == 1.0 and score["shape_later"] == 0.0
  if name == "room_recolored":
    assert score["room_later"] == 0.0 and score["shape_later"] == 1.0
  if name != "noise":  # segment 1 is the truth in the spliced videos
    assert score["room"][0] == score["color"][0] == score["shape"][0] == 1.0


def test_text_following(story, truth):
  result = toy.text_following_score(truth, story)
  assert result["mean"] == 1.0
  assert result["predicted"] == [list(a) for a in story.actions]
  for name in ("reversed", "frozen", "identity_swapped"):
    assert toy.text_following_score(_corrupt(name, story, truth), story)["mean"] <= 0.6, name
  # Persistence alone cannot see an identity swap; text following can.
  swapped = _corrupt("identity_swapped", story, truth)
  assert toy.persistence_score(swapped, story)["overall"] == 1.0


@pytest.mark.parametrize("height,width", [(32, 48), (64, 96)])
def test_metrics_survive_mp4(tmp_path, height, width):
  story = toy.generate_story(4, 3, height=height, width=width)
  truth = toy.render(story)
  wrong = _corrupt("other_facts", story, truth)
  scores = {}
  for name, video in (("truth", truth), ("wrong", wrong)):
    path = tmp_path / f"{name}.mp4"
    video_io.write_mp4(path, video, fps=FPS)
    decoded, fps = video_io.read_mp4(path)
    assert decoded.shape == video.shape and fps == FPS
    scores[name] = (toy.persistence_score(decoded, story)["overall"],
                    toy.text_following_score(decoded, story)["mean"])
  assert min(scores["truth"]) >= 0.95, scores
  assert scores["wrong"][0] <= 0.05, scores


def test_metrics_reject_bad_layout(truth, story):
  with pytest.raises(ValueError, match="segments"):
    toy.persistence_score(truth[:-1], story)
  with pytest.raises(ValueError, match="segments"):
    toy.text_following_score(truth[:FIRST], story)


# --- tfds builder -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  builder = toy_builder.build(tmp_path_factory.mktemp("tfds"), segments=2, num_train=4,
                              num_test=2)
  return builder, builder.as_data_source()


def test_builder_matches_direct_generation(built):
  builder, source = built
  cfg = builder.builder_config
  for split, count in (("train", 4), ("test", 2)):
    assert len(source[split]) == count
    expected = {}
    for i in range(count):
      ex = toy.make_example(toy.generate_story(toy_builder.story_seed(cfg.seed, split, i),
                                               cfg.segments, cfg.fps, cfg.height, cfg.width))
      expected[ex["id"]] = ex
    for i in range(count):
      got = source[split][i]
      features.check_example(got, cfg.height, cfg.width)
      want = expected.pop(got["id"].decode())
      assert got["video"].tobytes() == want["video"].tobytes()
      assert [t.decode() for t in got["texts"]] == want["texts"]
      assert got["fps"] == FPS
      np.testing.assert_array_equal(got["scene_start"], want["scene_start"])
      np.testing.assert_array_equal(got["scene_end"], want["scene_end"])
      story = toy.Story.from_json(got["story"])
      assert toy.persistence_score(got["video"], story)["overall"] == 1.0
    assert not expected  # every example read back once


def test_train_and_test_are_disjoint(built):
  _, source = built
  ids = {split: {source[split][i]["id"] for i in range(len(source[split]))} for split in source}
  assert not ids["train"] & ids["test"]
  videos = {split: {source[split][i]["video"].tobytes() for i in range(len(source[split]))}
            for split in source}
  assert not videos["train"] & videos["test"]
  seeds = {s: {toy_builder.story_seed(7, s, i) for i in range(1000)} for s in ("train", "test")}
  assert not seeds["train"] & seeds["test"]
  assert not seeds["train"] & {toy_builder.story_seed(8, "train", i) for i in range(1000)}


def test_builds_and_reads_without_tensorflow(tmp_path):
  code = (
      "import sys\n"
      "from ttt_jax.data.builders import toy_toons\n"
      f"b = toy_toons.build({os.fspath(tmp_path)!r}, segments=1, num_train=2, num_test=1)\n"
      "assert b.as_data_source()['test'][0]['video'].shape == (49, 32, 48, 3)\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def test_config_validation():
  assert toy_builder.make_config(3).name == "9s_32x48_16fps_train1024_test64_seed0"
  with pytest.raises(ValueError, match="fps"):
    toy_builder.make_config(1, fps=10)
  with pytest.raises(ValueError, match="16x16"):
    toy_builder.make_config(1, height=8)


def test_frame_statistics_against_a_naive_loop(tmp_path, story, truth):
  """flatness / stability by a pixel-by-pixel loop on a small crop; a toon scores high after an
  mp4 round trip, block noise low."""
  rng = np.random.default_rng(0)
  crop = rng.integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)
  crop[:, :2] = crop[0, 0, 0]  # some flat pixels
  near = lambda a, b: max(abs(int(x) - int(y)) for x, y in zip(a, b)) <= 24
  pairs = [near(crop[f, i, j], crop[f, i + 1, j]) for f in range(3) for i in range(3)
           for j in range(5)]
  pairs += [near(crop[f, i, j], crop[f, i, j + 1]) for f in range(3) for i in range(4)
            for j in range(4)]
  steps = [near(crop[f, i, j], crop[f + 1, i, j]) for f in range(2) for i in range(4)
           for j in range(5)]
  got = toy.frame_statistics(crop)
  assert got == {"flatness": pytest.approx(np.mean(pairs)),
                 "stability": pytest.approx(np.mean(steps))}
  video_io.write_mp4(tmp_path / "t.mp4", truth, fps=FPS)
  toon = toy.frame_statistics(video_io.read_mp4(tmp_path / "t.mp4")[0])
  assert toon["flatness"] >= 0.9 and toon["stability"] >= 0.95, toon
  blocks = np.kron(rng.integers(0, 256, (len(truth), 8, 12, 3)), np.ones((1, 4, 4, 1)))
  noise = toy.frame_statistics(blocks.astype(np.uint8))
  assert noise["flatness"] < 0.8 and noise["stability"] < 0.2, noise
