"""Elo from preferences: synthetic judgements from known ratings give back their order, the
bootstrap intervals cover the truth at about their nominal rate, the fit is the Bradley-Terry
maximum of the likelihood; the judge mode and the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ttt_jax import elo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUTH = {"ttt_mlp": 1150.0, "gated_deltanet": 1050.0, "mamba2": 950.0, "none": 850.0}


def synthetic(rng, truth, comparisons, axes=("consistency",), storyboards=None):
  """Records drawn from the Elo model: P(a wins) = 1 / (1 + 10^((E_b - E_a) / 400))."""
  methods = list(truth)
  records = []
  for k in range(comparisons):
    a, b = rng.choice(len(methods), 2, replace=False)
    for axis in axes:
      p = 1 / (1 + 10 ** ((truth[methods[b]] - truth[methods[a]]) / 400))
      records.append({"storyboard": f"s{k if storyboards is None else k % storyboards}",
                      "a": methods[a], "b": methods[b], "axis": axis,
                      "winner": "a" if rng.random() < p else "b"})
  return records


def test_recovers_the_known_order_on_every_axis_and_on_average():
  records = synthetic(np.random.default_rng(0), TRUTH, 600, axes=("text", "consistency"))
  out = elo.ratings(records, resamples=200)
  assert set(out) == {"text", "consistency", "average"}
  for axis in out.values():
    assert sorted(axis, key=lambda m: -axis[m]["elo"]) == list(TRUTH)
    assert np.mean([v["elo"] for v in axis.values()]) == pytest.approx(1000, abs=0.05)
    for v in axis.values():
      assert v["lo"] <= v["elo"] <= v["hi"]
      assert set(v) == {"elo", "lo", "hi"}


def test_intervals_cover_the_truth_at_about_their_nominal_rate():
  rng = np.random.default_rng(1)
  covered = []
  for draw in range(60):
    out = elo.ratings(synthetic(rng, TRUTH, 300), resamples=300, confidence=0.9, seed=draw)
    covered += [out["consistency"][m]["lo"] <= e <= out["consistency"][m]["hi"]
                for m, e in TRUTH.items()]
  # 240 intervals at 90%: a binomial standard deviation of ~2%; the percentile bootstrap of a
  # maximum-likelihood fit is close to nominal at this size, not exact.
  assert 0.83 <= np.mean(covered) <= 0.96, np.mean(covered)


def test_fit_is_the_bradley_terry_maximum_likelihood():
  wins = np.array([[0, 7, 9], [3, 0, 6], [1, 4, 0]], float)
  r = elo.fit_ratings(wins, prior=0.0)

  def log_likelihood(r):
    p = 1 / (1 + np.exp(r[None, :] - r[:, None]))
    return (wins * np.log(p + np.eye(3))).sum()

  for i in range(3):  # no coordinate move improves it
    for d in (1e-3, -1e-3):
      assert log_likelihood(r + d * np.eye(3)[i]) < log_likelihood(r)
  # A batch of problems is solved one by one.
  batch = elo.fit_ratings(np.stack([wins, wins.T]), prior=0.0)
  np.testing.assert_allclose(batch[0], r, atol=1e-9)
  np.testing.assert_allclose(batch[1], -r, atol=1e-9)


def test_ties_count_half_and_a_clean_sweep_stays_finite():
  ties = [{"storyboard": str(i), "a": "x", "b": "y", "axis": "q", "winner": "tie"}
          for i in range(10)]
  out = elo.ratings(ties, resamples=50)
  assert out["q"]["x"]["elo"] == pytest.approx(out["q"]["y"]["elo"]) == pytest.approx(1000)
  sweep = [{**r, "winner": "a"} for r in ties]
  out = elo.ratings(sweep, resamples=50)
  assert 1000 < out["q"]["x"]["elo"] < 5000 and np.isfinite(out["q"]["y"]["lo"])


def eval_json(scores):
  """An eval.json with one per-storyboard mean per metric: scores {storyboard: value}."""
  return {"storyboards": [{"name": s, **{a: {"mean": v} for a in elo.JUDGE_AXES}}
                          for s, v in scores.items()]}


def test_judge_mode_turns_eval_json_into_records():
  evals = {"good": eval_json({"s1": 0.9, "s2": 0.8, "s3": 0.5}),
           "bad": eval_json({"s1": 0.1, "s2": 0.79, "s3": 0.2, "only_bad": 1.0})}
  records = elo.judge(evals, tie=0.05)
  assert len(records) == 3 * len(elo.JUDGE_AXES)  # shared storyboards only
  assert {(r["storyboard"], r["winner"]) for r in records} == {
      ("s1", "b"), ("s2", "tie"), ("s3", "b")}  # pairs are sorted: a="bad", b="good"
  assert all(r["a"] == "bad" and r["b"] == "good" for r in records)


def run(*args):
  return subprocess.run([sys.executable, "-m", "ttt_jax.elo", *args], cwd=REPO,
                        capture_output=True, text=True)


def test_command_line_judge_then_records(tmp_path):
  for name, scores in (("good", {"s1": 0.9, "s2": 0.8}), ("bad", {"s1": 0.2, "s2": 0.1})):
    (tmp_path / f"{name}.json").write_text(json.dumps(eval_json(scores)))
  prefs, out = tmp_path / "prefs.jsonl", tmp_path / "elo.json"
  done = run(f"--judge=good={tmp_path}/good.json,bad={tmp_path}/bad.json",
             f"--records={prefs}", f"--out={out}", "--resamples=100")
  assert done.returncode == 0, done.stderr
  assert len(prefs.read_text().splitlines()) == 2 * len(elo.JUDGE_AXES)
  result = json.loads(out.read_text())
  assert set(result) == {*elo.JUDGE_AXES, "average"}
  assert result["average"]["good"]["elo"] > result["average"]["bad"]["elo"]
  # Records alone give the same numbers.
  assert run(f"--records={prefs}", f"--out={tmp_path}/again.json",
             "--resamples=100").returncode == 0
  assert json.loads((tmp_path / "again.json").read_text()) == result


def test_command_line_errors_are_one_line(tmp_path):
  bad = tmp_path / "prefs.jsonl"
  bad.write_text(json.dumps({"storyboard": "s", "a": "x", "b": "y", "axis": "q",
                             "winner": "x"}) + "\n")
  done = run(f"--records={bad}", f"--out={tmp_path}/elo.json")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"python -m ttt_jax.elo: error: {bad}:1: field 'winner' must be one of "
      "['a', 'b', 'tie'], got 'x'"]
  done = run(f"--records={bad}", f"--out={tmp_path}/elo.json", "--judge=only_one")
  assert done.stderr.strip().splitlines()[-1] == (
      "python -m ttt_jax.elo: error: --judge entry 'only_one': expected METHOD=PATH/eval.json")
