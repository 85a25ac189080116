"""Sequence mixers by name, so an ablation changes one config string."""
from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx

from ttt_jax.mixers.common import count_params
from ttt_jax.mixers.gated_deltanet import GatedDeltaNet
from ttt_jax.mixers.mamba2 import Mamba2
from ttt_jax.mixers.swa import SlidingWindowAttention
from ttt_jax.mixers.ttt import TTTLayer

MIXERS = ("none", "swa", "mamba2", "gated_deltanet", "ttt_linear", "ttt_mlp")

# The one option per mixer that sets its size, as a function of an integer m >= 1 (and heads);
# the parameter count grows with m, which `matched_options` relies on.
_SIZE_KNOBS: dict[str, Callable[[int, int], dict[str, int]]] = {
    "mamba2": lambda m, num_heads: {"inner_width": m * num_heads},  # head_dim m
    "gated_deltanet": lambda m, num_heads: {"value_head_dim": m},
}


def _constructor(name: str) -> Callable[..., nnx.Module]:
  if name in ("ttt_linear", "ttt_mlp"):
    return functools.partial(TTTLayer, inner=name.removeprefix("ttt_"))
  return {"swa": SlidingWindowAttention, "mamba2": Mamba2, "gated_deltanet": GatedDeltaNet}[name]


def build_mixer(name: str, width: int, num_heads: int, *, rngs: nnx.Rngs,
                **options: Any) -> nnx.Module | None:
  """Builds the sequence mixer `name` (one of MIXERS).

  Every mixer maps `[batch, seq, width] -> [batch, seq, width]` and is called as
  `mixer(x, *, rope=None, reverse=False)`. The DiT passes `rope` (cos, sin `[seq, head_dim]`)
  and reorders its reverse pass itself (models/dit.py), so it calls every mixer forward;
  `reverse=True` is for a plain sequence read right to left.

  Args:
    name: one of MIXERS; "none" gives None (the block skips the mixer).
    width: model width.
    num_heads: heads.
    rngs: parameter initialisation.
    **options: passed to the mixer's constructor. `param_budget=n` (mamba2 and gated_deltanet)
      first sets the mixer's size knob so its parameter count is as close to n as possible;
      `param_budget="ttt_mlp"` (any mixer name) takes n from that mixer at this width and heads
      with its default options, so a config can say "as large as the TTT-MLP layer".

  Raises:
    ValueError: unknown name (the message lists MIXERS).
    TypeError: an option the mixer does not take (the message names it).
  """
  if name not in MIXERS:
    raise ValueError(f"unknown mixer {name!r}; expected one of {MIXERS}")
  if name == "none":
    if options:
      raise TypeError(f"mixer 'none' takes no options, got {sorted(options)}")
    return None
  budget = options.pop("param_budget", None)
  if isinstance(budget, str):
    budget = count_params(nnx.eval_shape(
        lambda: build_mixer(budget, width, num_heads, rngs=nnx.Rngs(0))))
  if budget is not None:
    options.update(matched_options(name, width, num_heads, budget, **options))
  return _constructor(name)(width, num_heads, rngs=rngs, **options)


def matched_options(name: str, width: int, num_heads: int, target_params: int,
                    **options: Any) -> dict[str, int]:
  """The size option that brings mixer `name` closest to `target_params` parameters.

  For fair ablations (e.g. target = the TTT-MLP layer's count). Sweeps one knob with the other
  `options` fixed: mamba2's head_dim (returned as inner_width = num_heads * head_dim), or
  gated_deltanet's value_head_dim. Parameters are counted on abstract modules (no allocation).

  Raises:
    ValueError: `name` has no size knob, or even its smallest size exceeds the target.
  """
  if name not in _SIZE_KNOBS:
    raise ValueError(f"mixer {name!r} has no size knob; matching supports {tuple(_SIZE_KNOBS)}")
  knob = _SIZE_KNOBS[name]

  @functools.cache
  def count(m: int) -> int:
    return count_params(nnx.eval_shape(lambda: build_mixer(
        name, width, num_heads, rngs=nnx.Rngs(0), **options, **knob(m, num_heads))))

  if count(1) > target_params:
    raise ValueError(f"smallest {name} has {count(1)} parameters > target {target_params}")
  lo, hi = 1, 2  # count(lo) <= target; grow hi until count(hi) >= target, then bisect.
  while count(hi) < target_params:
    lo, hi = hi, 2 * hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if count(mid) >= target_params else (mid, hi)
  best = min((lo, hi), key=lambda m: abs(count(m) - target_params))
  return knob(best, num_heads)
