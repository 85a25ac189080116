"""toy_toons: generator, texts and the tfds builder (the metrics: test_toy_metrics.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ttt_jax.data import features, storyboard, toy_metrics
from ttt_jax.data import toy_toons as toy
from ttt_jax.data.builders import toy_toons as toy_builder

FPS = 16


# --- Generation and texts ---------------------------------------------------------------------


def test_deterministic_by_seed():
  one, two = toy.generate_story(11, 3), toy.generate_story(11, 3)
  assert one == two
  assert toy.render(one).tobytes() == toy.render(two).tobytes()
  assert toy.story_texts(one) == toy.story_texts(two)
  assert toy.render(toy.generate_story(12, 3)).tobytes() != toy.render(one).tobytes()


def test_vocabulary_texts_hold_every_word_the_stories_write():
  vocabulary = {w.strip(".,") for t in toy.vocabulary_texts() for w in t.split()}
  written = {w.strip(".,") for seed in range(200)
             for t in toy.story_texts(toy.generate_story(seed, 4)) for w in t.split()}
  assert written <= vocabulary
  for words in (toy.ROOM_COLORS, toy.FLOOR_COLORS, toy.CHARACTER_COLORS, toy.SHAPES, toy.NAMES,
                toy.PLACES):
    assert set(words) <= vocabulary
  assert {w for a in toy.ACTIONS for w in a.split()} <= vocabulary
  assert toy.vocabulary_texts() == toy.vocabulary_texts()


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


def test_texts_say_where_each_character_starts_its_segment():
  """The place word against the rendered frame: the third, across and down, of the middle of the
  character's drawn pixels at the segment's first frame."""
  frames = features.frames_per_segment(FPS)
  names = {"northwest": (0, 0), "north": (1, 0), "northeast": (2, 0), "west": (0, 1),
           "centre": (1, 1), "east": (2, 1), "southwest": (0, 2), "south": (1, 2),
           "southeast": (2, 2)}
  seen = set()
  for seed in range(30):
    story = toy.generate_story(seed, 4)
    video = toy.render(story)
    for seg, text in enumerate(toy.story_texts(story)):
      # A segment starts where the last one ended, unless it cuts: then its first frame is one
      # step in (a move has not yet moved a pixel there; a jump has, so it is skipped).
      cut = seg > 0 and story.scene_start[seg]
      frame = video[seg * frames + cut]
      for c, action in zip(story.characters, story.actions[seg]):
        if cut and action == "jumps":
          continue
        ys, xs = np.nonzero((frame == toy.CHARACTER_COLORS[c.color]).all(-1))
        # The middle of the drawn box (a triangle's pixels lean to its base, its box does not).
        mid_x, mid_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        place = re.search(rf"{c.name} in the (\w+) ", text).group(1)
        want = (min(2, int(3 * mid_x / story.width)), min(2, int(3 * mid_y / story.height)))
        assert names[place] == want, (seed, seg, c, place, mid_x, mid_y)
        seen.add(place)
  assert seen == set(toy.PLACES)


@pytest.mark.parametrize("height,width", [(32, 48), (64, 96)])
def test_each_place_word_names_one_point(height, width):
  """Across stories, a place word always puts the sprite's box at the same pixels, and a move
  ends on another such point (the next segment's start), one lattice step away."""
  frames = features.frames_per_segment(FPS)
  g = toy.geometry(height, width)
  boxes = {}
  for seed in range(40):
    story = toy.generate_story(seed, 5, height=height, width=width)
    video = toy.render(story)
    for seg, (places, starts) in enumerate(zip(story.places, story.starts)):
      first = seg * frames  # the frame at progress 0 of the segment
      for c, place, start in zip(story.characters, places, starts):
        ys, xs = np.nonzero((video[first] == toy.CHARACTER_COLORS[c.color]).all(-1))
        if story.scene_start[seg] and seg > 0:  # the cut frame is one step in: use the start
          ys, xs = np.array([start[1]]), np.array([start[0]])
        box = (int(xs.min()), int(ys.min()))
        assert boxes.setdefault(place, box) == box, (seed, seg, place, box, boxes[place])
      for (x0, y0), (x1, y1), a in zip(starts, toy.trajectories(story)[(seg + 1) * frames],
                                       story.actions[seg]):
        dx, dy = toy._DIRECTIONS.get(a, (0, 0))  # pylint: disable=protected-access
        assert (x1 - x0, y1 - y0) == (dx * g.step_x, dy * g.step_y), (seed, seg, a)
  assert len(boxes) == len(toy.PLACES)
  assert sorted(boxes.values(), key=lambda b: (b[1], b[0])) == toy.lattice(g)


def test_storyboard_round_trip():
  story = toy.generate_story(3, 6)
  segments = storyboard.parse_storyboard(toy.story_to_storyboard(story))
  assert [s.text for s in segments] == toy.story_texts(story)
  assert tuple(s.scene_transition for s in segments) == story.scene_start


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
      assert toy_metrics.persistence_score(got["video"], story)["overall"] == 1.0
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


def test_latent_frames_follow_the_temporal_compression():
  # 16 fps: 48 frames a segment; CogVideoX keeps every 4th, the toy's autoencoder every 8th.
  assert features.latent_frames(3, 16) == 1 + 3 * 12 == features.latent_frames(3, 16, 4)
  assert features.latent_frames(3, 16, 8) == 1 + 3 * 6
  with pytest.raises(ValueError,
                     match="48 frames, not a multiple of the VAE's temporal compression 32"):
    features.latent_frames(1, 16, 32)
