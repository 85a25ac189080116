"""Wall time of a DiT forward pass and train step on random data: bench/dit_step.py's cases and
the ablation's per-mixer step times (python -m ttt_jax.ablate).

A train step is loss (MSE to a random target) + grad + optimizer update over all parameters,
jitted; times are the median and the min of `repeats` calls after a first, compiling one.
`call_times` and `summary` are also what the bench/ scripts time with (bench/common.py).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


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
  """{prefix + 'min_s', prefix + 'median_s'} of raw call times: the min is the best the machine
  did (what the code can do), the median how it usually went (a wide gap: the machine was
  busy)."""
  return {f"{prefix}min_s": min(times), f"{prefix}median_s": statistics.median(times)}


def time_dit(model: nnx.Module, *, batch: int, frames: int, segments: int, height: int,
             width: int, text_len: int, repeats: int, optimizer: str = "adam"
             ) -> dict[str, float]:
  """{"compile_s", "forward_ms", "train_step_ms"} (medians) and "forward_min_ms",
  "train_step_min_ms" of `model` (a DiT) on random latents [batch, frames, in_channels, height,
  width] and text [batch, segments, text_len, embed]."""
  cfg = model.config
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal(
      (batch, frames, cfg.in_channels, height, width)), jnp.float32)
  text = jnp.asarray(rng.standard_normal(
      (batch, segments, text_len, cfg.text_embed_dim)), jnp.float32)
  t = jnp.full((batch,), 500.0)
  target = jnp.asarray(rng.standard_normal(latents.shape), jnp.float32)
  tx = optax.adam(1e-4) if optimizer == "adam" else optax.sgd(1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def forward(p):
    return nnx.merge(graphdef, p)(latents, text, t)

  @jax.jit
  def train_step(p, s):
    loss_fn = lambda q: jnp.mean((nnx.merge(graphdef, q)(latents, text, t) - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  fwd_compile, fwd = call_times(forward, params, repeats=repeats)
  step_compile, step = call_times(train_step, params, opt_state, repeats=repeats)
  fwd, step = summary(fwd), summary(step)
  ms = lambda seconds: round(1e3 * seconds, 3)
  return dict(compile_s=round(fwd_compile + step_compile, 2),
              forward_ms=ms(fwd["median_s"]), forward_min_ms=ms(fwd["min_s"]),
              train_step_ms=ms(step["median_s"]), train_step_min_ms=ms(step["min_s"]))
