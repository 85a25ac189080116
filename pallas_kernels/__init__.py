"""Fused Pallas kernels for the TTT inner loop (TTT-MLP and TTT-Linear).

`ttt_scan_pallas` has the semantics of `ttt_jax.ttt.ttt_scan` (which calls it for impl="pallas");
of ttt_jax this package imports only ttt_jax/ttt/dual.py (pure jax: the step and its backward).
Kernels: common.py (forward and backward scans, custom_vjp).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from ttt_jax.ttt import dual


def _eta_inputs(eta: jax.Array, causal: bool, mini_batch_size: int) -> list[jax.Array]:
  """eta [B, H, S] (or causal [B, H, S, b]) -> [eta_col [B, H, S, 1]] (+ [eta_mat [B, H, S, b]]):
  `dual.eta_inputs` with the mini-batches laid end to end, as the kernels read them."""
  col, mat = dual.eta_inputs(eta, mini_batch_size, causal)
  seq_major = lambda a: a.reshape(*eta.shape[:3], a.shape[-1])
  return [seq_major(col)] + ([] if mat is None else [seq_major(mat)])


def ttt_scan_pallas(inner: str, params: dict[str, jax.Array], xq: jax.Array, xk: jax.Array,
                    xv: jax.Array, eta: jax.Array, *, mini_batch_size: int, causal: bool = False,
                    checkpoint_group_size: int = 1, eps: float = 1e-8,
                    interpret: bool | pltpu.InterpretParams | None = None,
                    platform: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mini-batch TTT over a sequence with the fused kernels; differentiable (custom_vjp).

  Args:
    inner: "mlp" or "linear".
    params: W1 [heads, d, h], b1 [heads, 1, h], (W2 [heads, h, d], b2 [heads, 1, d]) initial
      inner weights shared across the batch, and ln_weight, ln_bias [heads, d].
    xq, xk, xv: [batch, heads, seq, head_dim]; seq a multiple of mini_batch_size. Matmuls take
      their operands in xq's dtype (bf16 in, fp32 accumulation and fp32 inner state).
    eta: [batch, heads, seq] per-token step; with causal=True also [batch, heads, seq, b] where
      eta[..., t, s] is the step of token s of t's mini-batch in the weights t reads.
    mini_batch_size: tokens per inner step (b).
    causal: within-mini-batch causal read-out (dual form) instead of W_i for all tokens.
    checkpoint_group_size: the forward saves the weights every this many mini-batches and the
      backward recomputes one group at a time (1: weights at every mini-batch, each re-run).
      The kernels keep no activations, so there is no None (ttt_scan's "keep every
      mini-batch's residuals", impl="dual" only).
    eps: inner LayerNorm epsilon.
    interpret: run the kernels in the Pallas interpreter; None: unless `platform` is TPU or GPU. A
      pltpu.InterpretParams runs the TPU kernels (HBM-resident sequence, explicit DMAs) in the
      TPU interpreter on any backend.
    platform: the platform the program compiles for ("tpu", "gpu", "cpu"; see
      common.kernel_platform); None: jax.default_backend(). Not the host's backend when a CPU
      host compiles for TPU devices ahead of time.

  Returns:
    z [batch, heads, seq, head_dim] in xq's dtype, and the final inner weights (keys of params
    minus ln_*), each [batch, heads, ...] in the state dtype (float32, or float64 for float64).
  """
  if inner not in dual.WEIGHT_KEYS:
    raise ValueError(f"inner must be one of {tuple(dual.WEIGHT_KEYS)}, got {inner!r}")
  weight_keys = dual.WEIGHT_KEYS[inner]
  if xq.ndim != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
    raise ValueError(f"xq, xk, xv must be [batch, heads, seq, head_dim]; got {xq.shape}, "
                     f"{xk.shape}, {xv.shape}")
  batch, heads, seq, d = xq.shape
  b = mini_batch_size
  if seq % b:
    raise ValueError(f"seq {seq} must be a multiple of mini_batch_size {b} (the caller pads)")
  if eta.shape not in ((batch, heads, seq), (batch, heads, seq, b)):
    raise ValueError(f"eta must be {(batch, heads, seq)} or {(batch, heads, seq, b)}, got "
                     f"{eta.shape}")
  if checkpoint_group_size is None or checkpoint_group_size < 1:
    raise ValueError(f"checkpoint_group_size must be an int >= 1, got {checkpoint_group_size}: "
                     "the kernels recompute each group in the backward and keep no residuals "
                     "(checkpoint_group_size=None, every mini-batch's residuals kept, is "
                     "impl='dual''s)")
  state_dtype = jnp.promote_types(jnp.result_type(*params.values()), jnp.float32)
  state_dtype = jnp.promote_types(state_dtype, xq.dtype)
  n_mb = seq // b
  platform, interpret_arg = common.kernel_platform(interpret, platform)
  cfg = common.ScanConfig(
      inner=inner, causal=causal, eps=float(eps),
      mini_batch_size=b, group_size=min(checkpoint_group_size, n_mb),
      platform=platform, interpret=interpret_arg,
      mxu_dtype=jnp.dtype(xq.dtype).name)
  w0 = tuple(params[k].astype(state_dtype) for k in weight_keys)
  ln_w, ln_b = (params[k].astype(state_dtype).reshape(heads, 1, d)
                for k in ("ln_weight", "ln_bias"))
  xs = (xq, xk.astype(xq.dtype), xv.astype(xq.dtype),
        *_eta_inputs(eta.astype(state_dtype), causal, b))
  z, final = common.fused_scan(cfg, w0, ln_w, ln_b, xs)
  return z, dict(zip(weight_keys, final))


__all__ = ["ttt_scan_pallas"]
