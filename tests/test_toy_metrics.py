"""toy_metrics: persistence and text following on the truth, on corruptions and after an mp4
round trip; frame statistics against a naive loop."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ttt_jax.data import toy_metrics as metrics
from ttt_jax.data import toy_toons as toy
from ttt_jax.data import video_io

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


def test_persistence_is_one_on_truth(story, truth):
  score = metrics.persistence_score(truth, story)
  assert score["overall"] == 1.0
  assert score["room"] == score["color"] == score["shape"] == [1.0] * story.segments
  assert metrics.persistence_score(truth, story.facts) == score  # facts alone suffice


@pytest.mark.parametrize("name,limit", [("other_facts", 0.05), ("noise", 0.05),
                                        ("colors_swapped", 0.7), ("room_recolored", 0.7)])
def test_persistence_drops_on_corruptions(story, truth, name, limit):
  score = metrics.persistence_score(_corrupt(name, story, truth), story)
  assert score["overall"] <= limit, score
  if name == "colors_swapped":  # colours are all there, bound to the wrong shapes
    assert score["color_later"] == 1.0 and score["shape_later"] == 0.0
  if name == "room_recolored":
    assert score["room_later"] == 0.0 and score["shape_later"] == 1.0
  if name != "noise":  # segment 1 is the truth in the spliced videos
    assert score["room"][0] == score["color"][0] == score["shape"][0] == 1.0


def test_text_following(story, truth):
  result = metrics.text_following_score(truth, story)
  assert result["mean"] == 1.0
  assert result["predicted"] == [list(a) for a in story.actions]
  for name in ("reversed", "frozen", "identity_swapped"):
    assert metrics.text_following_score(_corrupt(name, story, truth), story)["mean"] <= 0.6, name
  # Persistence alone cannot see an identity swap; text following can.
  swapped = _corrupt("identity_swapped", story, truth)
  assert metrics.persistence_score(swapped, story)["overall"] == 1.0


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
    scores[name] = (metrics.persistence_score(decoded, story)["overall"],
                    metrics.text_following_score(decoded, story)["mean"],
                    metrics.colour_at_place(decoded, story)["stated_later"])
  assert min(scores["truth"]) >= 0.95, scores
  assert scores["wrong"][0] <= 0.05 and scores["wrong"][2] <= 0.05, scores


@pytest.mark.parametrize("name,later", [(None, "stated"), ("colors_swapped", "swapped"),
                                        ("other_facts", "third"), ("empty", "background")])
def test_colour_at_place_classes(story, truth, name, later):
  if name == "empty":  # the room alone after segment 1: nothing where the characters are
    video = truth.copy()
    video[FIRST:] = np.where(np.arange(story.height)[:, None, None]
                             < story.height - toy.geometry(story.height, story.width).floor,
                             toy.ROOM_COLORS[story.room], toy.FLOOR_COLORS[story.floor])
  else:
    video = truth if name is None else _corrupt(name, story, truth)
  got = metrics.colour_at_place(video, story)
  assert got["stated"][0] == 1.0  # segment 1 is the truth in every case
  for k in metrics.PLACE_CLASSES:
    want = 1.0 if k == later else 0.0
    assert got[f"{k}_later"] == want and all(v == want for v in got[k][1:]), (k, got)


def test_colour_at_place_by_scene():
  """Colours swapped only after the scene cut count as swapped there, stated in segment 1's."""
  story = toy.generate_story(4, 5)
  assert story.scene_start == (True, False, True, False, False)
  a, b = story.characters
  swapped = toy.render(dataclasses.replace(story, characters=(
      dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))))
  video = toy.render(story)
  cut = 1 + 2 * 3 * FPS  # the first frame of segment 3
  video[cut:] = swapped[cut:]
  got = metrics.colour_at_place(video, story)
  assert got["stated_first_scene"] == 1.0 and got["swapped_first_scene"] == 0.0
  assert got["stated_after_cut"] == 0.0 and got["swapped_after_cut"] == 1.0
  assert got["stated_later"] == 0.25
  uncut = toy.generate_story(1, 5)  # a cut only at segment 5
  assert uncut.scene_start == (True, False, False, False, True)
  got = metrics.colour_at_place(toy.render(uncut), uncut)
  assert got["stated_after_cut"] == 1.0 and got["stated_first_scene"] == 1.0
  no_cut = toy.generate_story(5, 2)
  assert metrics.colour_at_place(toy.render(no_cut), no_cut)["stated_after_cut"] is None


def test_metrics_reject_bad_layout(truth, story):
  with pytest.raises(ValueError, match="segments"):
    metrics.persistence_score(truth[:-1], story)
  with pytest.raises(ValueError, match="segments"):
    metrics.text_following_score(truth[:FIRST], story)
  with pytest.raises(ValueError, match="segments"):
    metrics.colour_at_place(truth[:FIRST], story)
  with pytest.raises(ValueError, match="frames are"):
    metrics.colour_at_place(truth[:, :16], story)


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
  got = metrics.frame_statistics(crop)
  assert got == {"flatness": pytest.approx(np.mean(pairs)),
                 "stability": pytest.approx(np.mean(steps))}
  video_io.write_mp4(tmp_path / "t.mp4", truth, fps=FPS)
  toon = metrics.frame_statistics(video_io.read_mp4(tmp_path / "t.mp4")[0])
  assert toon["flatness"] >= 0.9 and toon["stability"] >= 0.95, toon
  blocks = np.kron(rng.integers(0, 256, (len(truth), 8, 12, 3)), np.ones((1, 4, 4, 1)))
  noise = metrics.frame_statistics(blocks.astype(np.uint8))
  assert noise["flatness"] < 0.8 and noise["stability"] < 0.2, noise
