"""Benchmark: the fused Pallas TTT kernels against ttt_scan(impl="dual") and (impl="grad").

Prints one JSON object per (impl, mode) case: min and median seconds of --iters calls, and from
the min tokens/s and the fraction of matmul peak, where "peak" is the FLOP/s a plain batched
matmul of a comparable size achieves in the same process (bench/common.py)
(FLOPs are the inner loop's matmul FLOPs, counted analytically; fwd+bwd counts 3x the forward, the
usual convention, although the kernels recompute each checkpoint group once more).

Defaults are the paper's TTT-MLP shapes (head_dim 64, hidden 256, mini-batch 64) with few heads
and a short sequence so that it finishes in under two minutes on a CPU, where the kernels run in
the Pallas interpreter (reported as "interpret": true; those numbers say nothing about a TPU/GPU).

  python bench/ttt_kernel.py --heads 2 --seq 256
  python bench/ttt_kernel.py --heads 24 --seq 16384 --dtype bfloat16   # on an accelerator
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from common import call_times, matmul_rate, summary
from pallas_kernels import common
from ttt_jax.ttt import init_params, ttt_scan


def matmul_flops(inner: str, causal: bool, batch: int, heads: int, seq: int, d: int,
                 mini_batch_size: int) -> float:
  """Matmul FLOPs of one forward scan (2 per multiply-add).

  Per mini-batch of b tokens and hidden h (= 4d for mlp, d for linear): the inner forward on xk,
  the backward to the hidden layer (mlp), the weight updates and the read-out on xq; the causal
  read-out adds the b x b products of the dual form.
  """
  b = mini_batch_size
  if inner == "mlp":
    h = 4 * d
    per_mb = 14 * b * d * h + (4 * b * b * (d + h) if causal else 0)
  else:
    per_mb = 6 * b * d * d + (4 * b * b * d if causal else 0)
  return float(per_mb * (seq // b) * batch * heads)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--inner", choices=("mlp", "linear"), default="mlp")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--mini_batch_size", type=int, default=64)
  parser.add_argument("--checkpoint_group_size", type=int, default=16)
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--impls", default="pallas,dual,grad")
  parser.add_argument("--modes", default="fwd,fwd_bwd")
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args(argv)

  d, b = args.head_dim, args.mini_batch_size
  dtype = jnp.dtype(args.dtype)
  hidden = 4 * d if args.inner == "mlp" else d
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  params = init_params(args.inner, keys[0], args.heads, d)
  shape = (args.batch, args.heads, args.seq, d)
  # L2-normalised queries/keys as in the TTT layer, so the inner loop stays in its usual range.
  unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(
      jax.random.normal(k, shape))
  xq, xk = unit(keys[1]).astype(dtype), unit(keys[2]).astype(dtype)
  xv = jax.random.normal(keys[3], shape, dtype)
  eta = jnp.full(shape[:3], 0.1 / d / b, jnp.float32)

  fwd_flops = matmul_flops(args.inner, args.causal, args.batch, args.heads, args.seq, d, b)
  # A batched product of the inner loop's size: [batch*heads, seq, d] x [batch*heads, d, hidden].
  n = args.batch * args.heads
  peak = matmul_rate((n, args.seq, d), (n, d, hidden), dtype, args.iters)
  common_fields = {
      "inner": args.inner, "causal": args.causal, "batch": args.batch, "heads": args.heads,
      "seq": args.seq, "head_dim": d, "hidden": hidden, "mini_batch_size": b,
      "checkpoint_group_size": args.checkpoint_group_size, "dtype": args.dtype,
      "device": jax.devices()[0].device_kind,
      "matmul_peak_tflops": peak / 1e12,
  }
  for impl in args.impls.split(","):
    scan = lambda p, q, k, v, e, impl=impl: ttt_scan(
        args.inner, p, q, k, v, e, mini_batch_size=b, causal=args.causal, impl=impl,
        checkpoint_group_size=args.checkpoint_group_size)
    for mode in args.modes.split(","):
      if mode == "fwd":
        fn, flops = jax.jit(scan), fwd_flops
      else:
        loss = lambda *a: jnp.sum(scan(*a)[0].astype(jnp.float32))
        fn, flops = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), 3 * fwd_flops
      compile_s, times = call_times(fn, params, xq, xk, xv, eta, repeats=args.iters)
      t = min(times)
      print(json.dumps({
          "impl": impl, "mode": mode, **common_fields,
          "interpret": impl == "pallas" and common.kernel_platform(None)[0] == "interpret",
          "compile_and_first_run_s": round(compile_s, 3), **summary(times),
          "tokens_per_s": args.batch * args.seq / t,
          "tflops": flops / t / 1e12,
          "fraction_of_matmul_peak": flops / t / peak,
      }), flush=True)


if __name__ == "__main__":
  main()
