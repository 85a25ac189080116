"""Wall time of a DiT forward pass and train step on random data: bench/dit_step.py's cases and
the ablation's per-mixer step times (python -m ttt_jax.ablate).

A train step is loss (MSE to a random target) + grad + optimizer update over all parameters,
jitted; times are the median of `repeats` calls after a first, compiling one.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(first call seconds incl. compile, median ms of `repeats` further calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))
  return first, statistics.median(times)


def time_dit(model: nnx.Module, *, batch: int, frames: int, segments: int, height: int,
             width: int, text_len: int, repeats: int, optimizer: str = "adam"
             ) -> dict[str, float]:
  """{"compile_s", "forward_ms", "train_step_ms"} of `model` (a DiT) on random latents
  [batch, frames, in_channels, height, width] and text [batch, segments, text_len, embed]."""
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

  fwd_compile, fwd_ms = time_call(lambda: forward(params), repeats)
  step_compile, step_ms = time_call(lambda: train_step(params, opt_state), repeats)
  return dict(compile_s=round(fwd_compile + step_compile, 2), forward_ms=round(fwd_ms, 3),
              train_step_ms=round(step_ms, 3))
