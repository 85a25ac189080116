"""What the bench scripts share: raw call times, their min and median, and the matmul rate of
the same run.

Scripts time with `call_times` and report `summary` of the raw times (both from
ttt_jax/step_timing.py, which the ablation's step timing uses too): the min is the best the
machine did (what the code can do), the median how it usually went (a wide gap says the machine
was busy). Rates are divided by `matmul_rate`, measured in the same process, so numbers from a
noisy shared machine compare across runs. Run the scripts from the repository root
(`python bench/<script>.py`): this folder is then first on sys.path.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.step_timing import call_times, summary  # pylint: disable=unused-import


def matmul_rate(lhs: Sequence[int], rhs: Sequence[int], dtype: Any = jnp.float32,
                repeats: int = 3) -> float:
  """FLOP/s of one (batched) jnp.matmul of ones of shapes `lhs` [..., m, k] and `rhs`
  [..., k, n], accumulated in float32, from its fastest of `repeats` (at least 3) calls."""
  a, b = jnp.ones(tuple(lhs), dtype), jnp.ones(tuple(rhs), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  _, times = call_times(matmul, a, b, repeats=max(repeats, 3))
  batch = int(np.prod(lhs[:-2]))
  return 2.0 * batch * lhs[-2] * lhs[-1] * rhs[-1] / min(times)
