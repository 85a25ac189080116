"""Elo ratings from pairwise preferences, per axis and averaged, with bootstrap intervals.

  python -m ttt_jax.elo --records=prefs.jsonl --out=elo.json
  python -m ttt_jax.elo --judge=none=runs/a/none_seed0/eval/eval.json,ttt_mlp=... \
      --records=prefs.jsonl --out=elo.json     # the automatic metrics judge; writes prefs.jsonl

Each line of --records is one judgement (extra fields are kept out of the way, e.g. "segment"):

  {"storyboard": "...", "a": METHOD, "b": METHOD, "axis": AXIS, "winner": "a" | "b" | "tie"}

Ratings are the Bradley-Terry maximum-likelihood fit, P(i beats j) = 1 / (1 + 10^((E_j - E_i) /
400)), on the Elo scale centred at 1000 (the mean over the axis's methods), as LMSYS's arena and
the paper's Elo tables. A tie counts half a win to each side. A weak Gaussian prior (standard
deviation 10 logits, ~1700 Elo) keeps a method that won or lost every comparison finite; with a
few comparisons per pair it moves nothing. "average" is each method's mean over the axes it was
judged on.

Intervals: percentile bootstrap over storyboards (one resample draws storyboards with
replacement and keeps all their judgements, on every axis at once), since the judgements of one
storyboard share its video and are not independent. Output, as issue 17 specifies:

  {AXIS: {METHOD: {"elo": x, "lo": x, "hi": x}}, ..., "average": {METHOD: {...}}}

Judge mode: the eval.json files of several runs (python -m ttt_jax.evaluate) become records: for
each storyboard the runs share, each pair of methods and each metric of JUDGE_AXES, the higher
per-storyboard mean wins; scores within --tie of each other are a tie. The axes are the automatic
metrics, not the paper's human ones: persistence stands in for temporal consistency, frame quality
(colour and edge statistics) for aesthetics, and motion naturalness has no counterpart.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable

import numpy as np

from ttt_jax import bootstrap, cli

BASE, SCALE = 1000.0, 400.0 / np.log(10.0)  # Elo of the mean method; Elo points per logit
_PRIOR = 1e-2  # precision of the Gaussian prior on ratings, in 1 / logit^2
_FIELDS = ("storyboard", "a", "b", "axis", "winner")
_WINNERS = ("a", "b", "tie")
JUDGE_AXES = ("persistence", "text_following", "frame_quality")  # eval.json metric names
AVERAGE = "average"


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads and validates a JSON-lines preference file; errors name the file, line and field."""
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        records.append(check_record(line, f"{os.fspath(path)}:{number}"))
  if not records:
    raise ValueError(f"--records {os.fspath(path)}: no preference records")
  return records


def check_record(line: str | dict, where: str) -> dict[str, Any]:
  try:
    record = json.loads(line) if isinstance(line, str) else line
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON: {e}") from e
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [k for k in _FIELDS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}; a record has {list(_FIELDS)}")
  for key in ("a", "b", "axis"):
    if not isinstance(record[key], str) or not record[key]:
      raise ValueError(f"{where}: field {key!r} must be a non-empty string, got "
                       f"{record[key]!r}")
  if record["winner"] not in _WINNERS:
    raise ValueError(f"{where}: field 'winner' must be one of {list(_WINNERS)}, got "
                     f"{record['winner']!r}")
  if record["a"] == record["b"]:
    raise ValueError(f"{where}: 'a' and 'b' are both {record['a']!r}")
  if record["axis"] == AVERAGE:
    raise ValueError(f"{where}: axis {AVERAGE!r} is the output's average over axes")
  return record


def fit_ratings(wins: np.ndarray, prior: float = _PRIOR, iterations: int = 100) -> np.ndarray:
  """Bradley-Terry ratings in logits, mean zero, from wins [..., m, m] (wins[i, j]: times i beat
  j, ties counted half to each), by Newton's method on the log-posterior (concave: it converges
  from zero). Leading axes are independent problems (the bootstrap's resamples)."""
  wins = np.asarray(wins, np.float64)
  games = wins + np.swapaxes(wins, -1, -2)
  eye = np.eye(wins.shape[-1])
  r = np.zeros(wins.shape[:-1])
  for _ in range(iterations):
    p = 1.0 / (1.0 + np.exp(r[..., None, :] - r[..., :, None]))  # P(i beats j)
    grad = (wins - games * p).sum(-1) - prior * r
    w = games * p * (1.0 - p)
    # Ratings are defined up to a shift: -1/m along the all-ones direction makes the Hessian
    # invertible without moving the step, as the gradient has no component along it.
    hessian = w - eye * w.sum(-1)[..., None] - prior * eye - 1.0 / len(eye)
    step = np.linalg.solve(hessian, grad[..., None])[..., 0]
    r = r - step
    if np.abs(step).max() < 1e-9:
      break
  return r - r.mean(-1, keepdims=True)


def _win_tables(records: list[dict], storyboards: list[str], methods: list[str]) -> np.ndarray:
  """[storyboards, m, m] wins of one axis's records, ties half to each side."""
  s_index = {s: i for i, s in enumerate(storyboards)}
  m_index = {m: i for i, m in enumerate(methods)}
  tables = np.zeros((len(storyboards), len(methods), len(methods)))
  for r in records:
    s, a, b = s_index[str(r["storyboard"])], m_index[r["a"]], m_index[r["b"]]
    if r["winner"] == "tie":
      tables[s, a, b] += 0.5
      tables[s, b, a] += 0.5
    else:
      winner, loser = (a, b) if r["winner"] == "a" else (b, a)
      tables[s, winner, loser] += 1
  return tables


def ratings(records: Iterable[dict], *, resamples: int = bootstrap.RESAMPLES,
            confidence: float = bootstrap.CONFIDENCE, seed: int = 0) -> dict[str, Any]:
  """{AXIS: {METHOD: {"elo", "lo", "hi"}}, "average": {...}} (module docstring)."""
  records = [check_record(r, f"record {i}") for i, r in enumerate(records)]
  if not records:
    raise ValueError("no preference records")
  storyboards = sorted({str(r["storyboard"]) for r in records})
  counts = bootstrap.resample_counts(len(storyboards), resamples, np.random.default_rng(seed))
  axes = sorted({r["axis"] for r in records})
  point, sampled = {}, {}  # axis -> {method: Elo}, axis -> {method: [resamples] Elo}
  for axis in axes:
    on_axis = [r for r in records if r["axis"] == axis]
    methods = sorted({m for r in on_axis for m in (r["a"], r["b"])})
    tables = _win_tables(on_axis, storyboards, methods)
    full = BASE + SCALE * fit_ratings(tables.sum(0))
    boot = BASE + SCALE * fit_ratings(np.einsum("rs,sij->rij", counts, tables))
    point[axis] = dict(zip(methods, full))
    sampled[axis] = {m: boot[:, i] for i, m in enumerate(methods)}
  everyone = sorted({m for table in point.values() for m in table})
  point[AVERAGE] = {m: np.mean([point[a][m] for a in axes if m in point[a]]) for m in everyone}
  sampled[AVERAGE] = {m: np.mean([sampled[a][m] for a in axes if m in sampled[a]], axis=0)
                      for m in everyone}
  out = {}
  for axis in [*axes, AVERAGE]:
    out[axis] = {}
    for method, elo in point[axis].items():
      lo, hi = bootstrap.percentile_interval(sampled[axis][method], confidence)
      out[axis][method] = {"elo": round(float(elo), 2), "lo": round(float(lo), 2),
                           "hi": round(float(hi), 2)}
  return out


def judge(evals: dict[str, dict[str, Any]], tie: float = 0.0) -> list[dict[str, Any]]:
  """Preference records from eval.json contents {method: eval}: per shared storyboard, pair of
  methods and JUDGE_AXES metric, the higher per-storyboard mean wins (a tie within `tie`)."""
  if len(evals) < 2:
    raise ValueError(f"--judge needs the eval.json of at least two methods, got {len(evals)}")
  scores = {m: {s["name"]: s for s in e["storyboards"]} for m, e in evals.items()}
  shared = sorted(set.intersection(*(set(s) for s in scores.values())))
  if not shared:
    raise ValueError(f"--judge: the eval.json files of {sorted(evals)} share no storyboard name")
  records = []
  for name in shared:
    for a, b in itertools.combinations(sorted(evals), 2):
      for axis in JUDGE_AXES:
        diff = scores[a][name][axis]["mean"] - scores[b][name][axis]["mean"]
        winner = "tie" if abs(diff) <= tie else ("a" if diff > 0 else "b")
        records.append({"storyboard": name, "a": a, "b": b, "axis": axis, "winner": winner})
  return records


def read_evals(entries: list[str]) -> dict[str, dict[str, Any]]:
  """{method: eval.json contents} from --judge entries METHOD=PATH."""
  evals = {}
  for entry in entries:
    method, has_path, path = entry.partition("=")
    if not has_path or not method or not path:
      raise ValueError(f"--judge entry {entry!r}: expected METHOD=PATH/eval.json")
    if method in evals:
      raise ValueError(f"--judge names method {method!r} twice")
    with open(path, encoding="utf-8") as f:
      try:
        evals[method] = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"--judge {path}: not valid JSON: {e}") from e
    if "storyboards" not in evals[method]:
      raise ValueError(f"--judge {path}: no 'storyboards' (expected python -m ttt_jax.evaluate's "
                       "eval.json)")
  return evals


def write_records(path: str, records: list[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.judge:
    write_records(f.records, judge(read_evals(f.judge), f.tie))
  result = ratings(read_records(f.records), resamples=f.resamples, confidence=f.confidence,
                   seed=f.seed)
  with open(f.out, "w", encoding="utf-8") as out:
    json.dump(result, out, indent=2)
  print(json.dumps(result[AVERAGE]))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("records", None, "preference records, JSON lines (written in --judge mode)")
  flags.DEFINE_string("out", None, "where to write the Elo JSON")
  flags.DEFINE_list("judge", [], "METHOD=eval.json,...: the automatic metrics judge")
  flags.DEFINE_float("tie", 0.0, "judge mode: score differences up to this are ties")
  flags.DEFINE_integer("resamples", bootstrap.RESAMPLES, "bootstrap resamples")
  flags.DEFINE_float("confidence", bootstrap.CONFIDENCE, "interval coverage")
  flags.DEFINE_integer("seed", 0, "bootstrap seed")
  flags.mark_flags_as_required(["records", "out"])
  cli.run_absl(main)
