"""Benchmark of ttt_scan at the paper's per-head shapes; prints one JSON object per case.

  python bench/ttt_layer.py [--heads 2] [--seqs 1024,4096] [--batch 1] [--repeats 3]
      [--impls grad,dual_autodiff,dual] [--causal false,true] [--memory_seqs 4096,16384,65536]
      [--mini_batch_size 24 --checkpoint_group_size 4]   (the toy job's TTT-MLP: add --batch 8
      --head_dim 32)
      [--checkpoint_group_size 16,none]   (a row for each: none keeps every mini-batch's
      residuals, so impl=dual's backward runs no forward matmul again)

The first row of each length, `mini_batch_matmul_ceiling`, times the TTT-MLP step's matmul shapes
alone, chained mini-batch by mini-batch: the most of the dense rate that any TTT-MLP row's
`fraction_of_matmul` can reach on this machine.

Per case: tokens/s forward and forward+backward and their ratio; achieved FLOP/s over the FLOP/s
of a dense jnp.dot measured in the same process (`fraction_of_matmul`, so numbers from a noisy
shared machine compare across runs); XLA's compiled memory footprint (arguments + outputs +
temporaries) as `peak_bytes`. Full softmax attention at the same length is the quadratic
reference. FLOPs are model FLOPs (matmuls only): forward+backward counts 3x forward, not the
recompute. --memory_seqs adds compile-only rows (`fwd_bwd_peak_bytes`, nothing is run) to show how
the fwd+bwd footprint grows with the length.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
from common import call_times, matmul_rate, summary

from ttt_jax.ttt import init_params, ttt_scan


# The paper's training mini-batch sizes.
_PAPER_MINI_BATCH = {"mlp": 64, "linear": 16}


def _peak_bytes(fn, *args) -> int:
  mem = fn.lower(*args).compile().memory_analysis()
  if mem is None:
    return -1
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def ttt_forward_flops(inner: str, tokens_x_heads: int, d: int) -> float:
  # Per token and head: MLP has 7 matmuls of 2*d*4d (K through W1, W2; grad through W2^T; two
  # weight updates; Q through W1', W2'), Linear has 3 of 2*d*d.
  return tokens_x_heads * (7 * 8 * d * d if inner == "mlp" else 3 * 2 * d * d)


def _ttt_fns(inner, impl, causal, mb, group):
  """jitted forward and forward+backward (gradients w.r.t. W0, ln params, xq, xk, xv, eta)."""
  run = functools.partial(ttt_scan, inner, mini_batch_size=mb, impl=impl, causal=causal,
                          checkpoint_group_size=group)
  fwd = jax.jit(lambda *a: run(*a)[0])
  fwd_bwd = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2, 3, 4)))
  return fwd, fwd_bwd


def bench_ttt(inner, impl, causal, batch, heads, seq, d, mb, group, repeats, rate):
  params = init_params(inner, jax.random.key(0), heads, d)
  ks = jax.random.split(jax.random.key(1), 4)
  xq, xk, xv = (jax.random.normal(k, (batch, heads, seq, d)) for k in ks[:3])
  eta = jnp.full((batch, heads, seq), 0.1 / d / mb)
  fwd, fwd_bwd = _ttt_fns(inner, impl, causal, mb, group)
  args = (params, xq, xk, xv, eta)
  t_fwd, t_bwd = call_times(fwd, *args, repeats=repeats)[1], call_times(
      fwd_bwd, *args, repeats=repeats)[1]
  flops = ttt_forward_flops(inner, batch * seq * heads, d)
  return _record(f"ttt_{inner}", impl, batch, heads, seq, t_fwd, t_bwd, flops, rate,
                 _peak_bytes(fwd_bwd, *args), causal=causal, mini_batch_size=mb, head_dim=d,
                 checkpoint_group_size=group)


def ttt_memory(inner, impl, causal, batch, heads, seq, d, mb, group):
  """The compiled fwd+bwd footprint at one length, from shapes only (nothing is allocated)."""
  params = jax.eval_shape(lambda: init_params(inner, jax.random.key(0), heads, d))
  x = jax.ShapeDtypeStruct((batch, heads, seq, d), jnp.float32)
  eta = jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)
  return dict(mixer=f"ttt_{inner}", impl=impl, causal=causal, batch=batch, heads=heads, seq=seq,
              checkpoint_group_size=group,
              fwd_bwd_peak_bytes=_peak_bytes(_ttt_fns(inner, impl, causal, mb, group)[1],
                                             params, x, x, x, eta))


def bench_mini_batch_matmuls(batch, heads, seq, d, mb, repeats, rate):
  """The ceiling of the fractions: the TTT-MLP step's matmul shapes alone, one mini-batch after
  another as the scan runs them ([batch x heads] batched, n = seq / mb of them in a lax.scan).

  `K W1` is [b, d] x [d, 4d]; `H W2` contracts over the hidden, [b, 4d] x [4d, d]; `K^T G` (a
  weight gradient) over the mini-batch, [d, b] x [b, 4d]. The model FLOPs that the fractions
  count are matmuls of these shapes (or their transposes), so no schedule of them beats the
  fastest one's `fraction_of_matmul`, and neither the forward's fraction nor the fwd+bwd's (3x
  the forward's FLOPs over its time) can exceed `ceiling`."""
  n, bh, h = seq // mb, batch * heads, 4 * d
  ks = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(ks[0], (n, bh, mb, d))
  g = jax.random.normal(ks[1], (n, bh, mb, h))
  w = jax.random.normal(ks[2], (bh, d, h))
  w2 = jnp.swapaxes(w, 1, 2)

  def chain(product):
    def run(x, g, w, w2):
      # A while loop: one mini-batch's product after another, as the TTT scan runs them.
      return jax.lax.scan(lambda _, xg: (None, product(*xg, w, w2)), None, (x, g))[1]
    return jax.jit(run)

  # The weight gradient twice: as the step computes it, contracting both operands' first axis,
  # and from a K already transposed to [d, b] (a plain [d, b] x [b, 4d] product). On XLA:CPU the
  # two run at about the same rate: what slows it against `K W1` is that both of its operands
  # change every mini-batch (a fresh K slice and G), where `K W1` reuses the same W1.
  cases = {"b_d_x_d_4d": (lambda x, g, w, w2: jnp.einsum("zbd,zdh->zbh", x, w), x),
           "b_4d_x_4d_d": (lambda x, g, w, w2: jnp.einsum("zbh,zhd->zbd", g, w2), x),
           "d_b_x_b_4d": (lambda x, g, w, w2: jnp.einsum("zbd,zbh->zdh", x, g), x),
           "d_b_x_b_4d_pretransposed": (lambda xt, g, w, w2: jnp.einsum("zdb,zbh->zdh", xt, g),
                                        jnp.swapaxes(x, 2, 3))}
  flops = 2 * n * bh * mb * d * h
  rows = {}
  for name, (product, first) in cases.items():
    times = call_times(chain(product), first, g, w, w2, repeats=repeats)[1]
    rows[name] = round(flops / min(times) / rate, 4)
  return dict(case="mini_batch_matmul_ceiling", batch=batch, heads=heads, seq=seq, head_dim=d,
              mini_batch_size=mb, fraction_of_matmul=rows,
              ceiling=max(rows.values()), device=jax.devices()[0].device_kind)


def bench_attention(batch, heads, seq, d, repeats, rate):
  ks = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, d)) for key in ks)
  attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  fwd = jax.jit(attn)
  fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2)))
  t_fwd, t_bwd = (call_times(fwd, q, k, v, repeats=repeats)[1],
                  call_times(fwd_bwd, q, k, v, repeats=repeats)[1])
  flops = 4 * batch * heads * seq * seq * d  # QK^T and PV
  return _record("full_attention", "xla", batch, heads, seq, t_fwd, t_bwd, flops, rate,
                 _peak_bytes(fwd_bwd, q, k, v), head_dim=d)


def _record(mixer, impl, batch, heads, seq, fwd_times, fwd_bwd_times, fwd_flops, rate, peak,
            **extra):
  """One case's JSON: min and median seconds (`fwd_s`, `fwd_bwd_s` are the mins), and from the
  mins tokens/s and the fractions of the matmul rate."""
  tokens, t_fwd, t_bwd = batch * seq, min(fwd_times), min(fwd_bwd_times)
  return dict(
      mixer=mixer, impl=impl, batch=batch, heads=heads, seq=seq, **extra,
      fwd_s=round(t_fwd, 5), fwd_bwd_s=round(t_bwd, 5),
      fwd_median_s=round(summary(fwd_times)["median_s"], 5),
      fwd_bwd_median_s=round(summary(fwd_bwd_times)["median_s"], 5),
      fwd_tokens_per_s=round(tokens / t_fwd, 1), fwd_bwd_tokens_per_s=round(tokens / t_bwd, 1),
      fwd_bwd_over_fwd=round(t_fwd / t_bwd, 3),
      fwd_fraction_of_matmul=round(fwd_flops / t_fwd / rate, 4),
      fwd_bwd_fraction_of_matmul=round(3 * fwd_flops / t_bwd / rate, 4),
      peak_bytes=peak, device=jax.devices()[0].device_kind)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--seqs", default="1024,4096", help="comma-separated sequence lengths")
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--impls", default="grad,dual_autodiff,dual")
  parser.add_argument("--causal", default="false", help="comma-separated: false, true")
  parser.add_argument("--memory_seqs", default="",
                      help="comma-separated lengths for compile-only fwd+bwd footprint rows")
  parser.add_argument("--no_attention", action="store_true")
  parser.add_argument("--inners", default="mlp,linear")
  parser.add_argument("--mini_batch_size", type=int, default=None,
                      help="tokens per inner step; default the paper's 64 (MLP) / 16 (Linear)")
  parser.add_argument("--checkpoint_group_size", default="16",
                      help="comma-separated group sizes, each a row; none: no rematerialisation")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  causals = [{"false": False, "true": True}[c] for c in args.causal.split(",")]
  groups = [None if g == "none" else int(g) for g in args.checkpoint_group_size.split(",")]
  rate = matmul_rate((1024, 1024), (1024, 1024), repeats=args.repeats)
  print(json.dumps({"case": "dense_matmul_1024", "flops_per_s": round(rate),
                    "device": jax.devices()[0].device_kind}), flush=True)
  for seq in map(int, args.seqs.split(",")):
    for inner in args.inners.split(","):
      mb = args.mini_batch_size or _PAPER_MINI_BATCH[inner]
      if inner == "mlp":
        print(json.dumps(bench_mini_batch_matmuls(args.batch, args.heads, seq, args.head_dim,
                                                  mb, args.repeats, rate)), flush=True)
      for causal, impl, group in itertools.product(causals, args.impls.split(","), groups):
        print(json.dumps(bench_ttt(inner, impl, causal, args.batch, args.heads, seq,
                                   args.head_dim, mb, group, args.repeats, rate)), flush=True)
    if not args.no_attention:
      print(json.dumps(bench_attention(args.batch, args.heads, seq, args.head_dim, args.repeats,
                                       rate)), flush=True)
  for seq in (int(s) for s in args.memory_seqs.split(",") if s):
    for inner in args.inners.split(","):
      mb = args.mini_batch_size or _PAPER_MINI_BATCH[inner]
      for causal, impl, group in itertools.product(causals, args.impls.split(","), groups):
        print(json.dumps(ttt_memory(inner, impl, causal, args.batch, args.heads, seq,
                                    args.head_dim, mb, group)), flush=True)


if __name__ == "__main__":
  main()
