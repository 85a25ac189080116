"""evaluate's pieces without a model: the bootstrap against numpy and scipy, the frame-quality
measure on renderings and on noise, means over storyboards of different lengths. (The command
itself runs on a trained toy run in tests/test_ablate.py.)"""
import numpy as np
import pytest
from scipy import stats

from ttt_jax import bootstrap, evaluate
from ttt_jax.data import toy_toons


def test_bootstrap_is_numpys_resample_and_percentile():
  values = np.random.default_rng(0).standard_normal((30, 3))
  out = bootstrap.mean_interval(values, resamples=500, confidence=0.9, seed=7)
  rng = np.random.default_rng(7)
  means = values[rng.integers(0, 30, size=(500, 30))].mean(1)  # [resamples, 3]
  np.testing.assert_allclose(out["mean"], values.mean(0), rtol=1e-12)
  np.testing.assert_allclose(out["lo"], np.percentile(means, 5, axis=0), rtol=1e-12)
  np.testing.assert_allclose(out["hi"], np.percentile(means, 95, axis=0), rtol=1e-12)


def test_bootstrap_agrees_with_scipy_percentile_interval():
  values = np.random.default_rng(1).exponential(size=40)
  ours = bootstrap.mean_interval(values[:, None], resamples=20000, seed=0)
  theirs = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20000,
                           confidence_level=0.95, random_state=1).confidence_interval
  # Different draws: Monte Carlo error of a 2.5% percentile at 20000 resamples is ~0.005.
  assert ours["lo"][0] == pytest.approx(theirs.low, abs=0.02)
  assert ours["hi"][0] == pytest.approx(theirs.high, abs=0.02)


def test_missing_values_are_left_out_of_each_mean():
  values = np.array([[1.0, np.nan], [3.0, 5.0], [5.0, np.nan]])
  out = bootstrap.mean_interval(values, resamples=200)
  np.testing.assert_allclose(out["mean"], [3.0, 5.0])
  assert out["lo"][1] == out["hi"][1] == 5.0  # one value: every resample that has it gives it
  assert 1.0 <= out["lo"][0] < 3.0 < out["hi"][0] <= 5.0


@pytest.fixture(scope="module")
def story():
  return toy_toons.generate_story(3, segments=3)


def test_frame_quality_is_one_on_the_rendering_and_low_on_noise(story):
  truth = toy_toons.render(story)
  perfect = evaluate.frame_quality(truth, truth, story.fps)
  assert perfect["per_segment"] == [1.0, 1.0, 1.0] and perfect["mean"] == 1.0
  noise = np.random.default_rng(0).integers(0, 256, truth.shape, dtype=np.uint8)
  bad = evaluate.frame_quality(noise, truth, story.fps)
  assert bad["mean"] < 0.3 and min(bad["colour_distance"]) > 0.8
  # The story's rendering in another room: the palette differs, the edges hardly.
  other_room = toy_toons.render(
      toy_toons.Story(**{**story.__dict__, "room": "gray" if story.room != "gray" else "teal"}))
  moved = evaluate.frame_quality(other_room, truth, story.fps)
  assert 0.3 < moved["mean"] < 0.9 and max(moved["edge_distance"]) < 0.05


def test_score_and_summary_of_storyboards_of_different_lengths(story):
  short = toy_toons.generate_story(5, segments=2)
  scored = [{"name": "a", **evaluate.score(toy_toons.render(story), story)},
            {"name": "b", **evaluate.score(toy_toons.render(short), short)}]
  for s in scored:
    for metric in evaluate.METRICS:
      assert s[metric]["mean"] == 1.0  # the metrics' own reference
  # story: segment 2 in segment 1's scene, segment 3 after a cut; short: no cut.
  assert story.scene_start == (True, False, True) and short.scene_start == (True, False)
  truth = {"stated_segment_1": 1.0, "stated": 1.0, "swapped": 0.0, "third": 0.0,
           "background": 0.0, "stated_first_scene": 1.0, "swapped_first_scene": 0.0}
  assert scored[0]["colour_at_place"] == {**truth, "stated_after_cut": 1.0,
                                          "swapped_after_cut": 0.0}
  assert scored[1]["colour_at_place"] == {**truth, "stated_after_cut": None,
                                          "swapped_after_cut": None}
  # Over storyboards, each key over those that have it.
  mean = evaluate.mean_place_shares([{"stated": 1.0, "stated_after_cut": None},
                                     {"stated": 0.5, "stated_after_cut": 0.25}])
  assert mean == {"stated": 0.75, "stated_after_cut": 0.25}
  assert evaluate.mean_place_shares([{"stated_after_cut": None}]) == {"stated_after_cut": None}
  summary = evaluate.summarise(scored, resamples=100)
  assert summary["persistence"]["mean"] == 1.0
  assert len(summary["text_following"]["per_segment"]["mean"]) == 3  # the longest storyboard
