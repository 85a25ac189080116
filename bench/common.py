"""What the bench scripts share: raw call times, their min and median, and the matmul rate of
the same run.

Scripts time with `call_times` and report `summary` of the raw times: the min is the best the
machine did (what the code can do), the median how it usually went (a wide gap says the machine
was busy). Rates are divided by `matmul_rate`, measured in the same process, so numbers from a
noisy shared machine compare across runs. Run the scripts from the repository root
(`python bench/<script>.py`): this folder is then first on sys.path.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def call_times(fn: Callable[..., Any], *args: Any, repeats: int) -> tuple[float, list[float]]:
  """(seconds of the first call, compile included; seconds of each of the next `repeats`
  calls), each call waited for (`jax.block_until_ready`)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, times


def summary(times: Sequence[float], prefix: str = "") -> dict[str, float]:
  """{prefix + 'min_s', prefix + 'median_s'} of raw call times."""
  return {f"{prefix}min_s": min(times), f"{prefix}median_s": statistics.median(times)}


def matmul_rate(lhs: Sequence[int], rhs: Sequence[int], dtype: Any = jnp.float32,
                repeats: int = 3) -> float:
  """FLOP/s of one (batched) jnp.matmul of ones of shapes `lhs` [..., m, k] and `rhs`
  [..., k, n], accumulated in float32, from its fastest of `repeats` (at least 3) calls."""
  a, b = jnp.ones(tuple(lhs), dtype), jnp.ones(tuple(rhs), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  _, times = call_times(matmul, a, b, repeats=max(repeats, 3))
  batch = int(np.prod(lhs[:-2]))
  return 2.0 * batch * lhs[-2] * lhs[-1] * rhs[-1] / min(times)
