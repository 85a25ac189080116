"""Percentile bootstrap over independent units (storyboards): the intervals of `evaluate` (mean
scores) and `elo` (ratings).

A resample draws n of the n units with replacement; `resample_counts` gives, for each resample,
how often each unit was drawn, so that any statistic linear in per-unit data (a sum of scores, a
table of wins) is one matrix product over all resamples. The interval is the (1 - c) / 2 and
(1 + c) / 2 percentiles of the resampled statistic (Efron's percentile interval).
"""
from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
  """int [resamples, n]: how often each of n units is drawn in each resample of size n."""
  if n < 1:
    raise ValueError("the bootstrap needs at least one unit (storyboard)")
  draws = rng.integers(0, n, size=(resamples, n))
  counts = np.zeros((resamples, n), np.int64)
  np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
  return counts


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi): percentiles of `samples` [resamples, ...] along axis 0 (NaN resamples skipped)."""
  tail = 100 * (1 - confidence) / 2
  return (np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0))


def mean_interval(values: np.ndarray, *, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, np.ndarray]:
  """Means over units of `values` [units, ...] with percentile-bootstrap intervals.

  NaN marks a missing value (a storyboard without that segment): each mean, original or
  resampled, is over the units that have the value. Returns {"mean", "lo", "hi"}, each shaped
  values.shape[1:].
  """
  values = np.asarray(values, np.float64)
  present = ~np.isnan(values)
  filled = np.where(present, values, 0.0).reshape(len(values), -1)
  counts = resample_counts(len(values), resamples, np.random.default_rng(seed))
  with np.errstate(invalid="ignore", divide="ignore"):
    sampled = (counts @ filled) / (counts @ present.reshape(len(values), -1))
    mean = filled.sum(0) / present.reshape(len(values), -1).sum(0)
  lo, hi = percentile_interval(sampled, confidence)
  shape = values.shape[1:]
  return {"mean": mean.reshape(shape), "lo": lo.reshape(shape), "hi": hi.reshape(shape)}
