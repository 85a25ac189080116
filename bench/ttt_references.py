"""Our TTT-MLP against the public references' at the same shapes and inputs; prints one JSON object.

  python bench/ttt_references.py --ttt_video_dit PATH [--ttt_lm_jax PATH]
      [--batch 1 --heads 4 --head_dim 64 --mini_batch_size 64 --seq 4096] [--repeats 3]
      [--checkpoint_group_size 16,none]

PATH is a local checkout of github.com/test-time-training/ttt-video-dit (resp. ttt-lm-jax); nothing
is downloaded. Either reference may be left out; its systems are then skipped. Defaults: the shapes
of issue 15 (4 heads x 64, MLP hidden 256, mini-batch 64, 4096 tokens, batch 1). Every system
runs in its own process (both references are a package named `ttt`, and torch and XLA would share
the CPU's threads within one) on the same inputs, built from one seed: L2-normalised xq, xk,
normal xv, W0 of std 0.02 with perturbed LayerNorm parameters, eta = 0.1 sigmoid(.) / head_dim /
mini_batch_size per token (causal: times 1 / (t + 1) of the token's place t in its mini-batch,
ttt-lm-jax's token_idx). fwd: outputs only; fwd+bwd: the gradient of sum(z) w.r.t. every input
and parameter. Each system's z is written out and compared with its counterpart's (`max_abs_diff`
in the JSON), so the pairs compute the same thing.

Systems:
  ours_noncausal[_gN]: ttt_scan(impl="dual", causal=False), one per --checkpoint_group_size
    (none: every mini-batch's residuals kept, no forward re-run in the backward).
  matmul_bound_noncausal: the non-causal TTT-MLP's 7 + 14 matmuls a mini-batch alone, at their
    shapes and chained through the weights, with a written-out backward that keeps every
    residual (`_matmul_bound`): the fastest a fwd+bwd of the dual form can run here while XLA
    does its matmuls. Its ratio to ttt_video_dit is the most that any backward of ours can
    reach against that reference on this machine.
  ttt_video_dit: its TTT-MLP op, ttt/models/ssm/ops/ttt_mlp.py (`ttt_mlp`, the plain PyTorch path
    of TTTMLP with use_kernel=False; the ThunderKittens kernel needs an H100), on torch CPU in
    fp32, its `compute_mini_batch` torch.compile'd as in the reference (compile excluded from
    the times), checkpoint groups of --video_dit_checkpoint_group_size (16, its training
    configs). Its eta [B, H, n, b, b] repeats each token's step along the rows (non-causal).
    Its module imports wandb, which the op does not use: a missing wandb is an empty module.
  ours_causal[_gN]: ttt_scan(impl="dual", causal=True) with the per-source eta [B, H, S, b], and
    inner LayerNorm eps 1e-6 (flax's LayerNorm default, which ttt-lm-jax uses).
  ttt_lm_jax: TTTMLPBase.ttt of ttt/models/ttt_layer.py, the TTT core of its TTT-MLP layer (dual
    form, causal, lax.scan rematerialised every --lm_jax_remat_group_size mini-batches: 4, its
    configs), run through flax's `apply` with the same W0, LayerNorm, xq, xk, xv and eta.
  ttt_lm_jax_layer: its whole TTTMLP layer (x [B, S, width] -> [B, S, width]: projections,
    causal convolutions, RoPE, the learned eta, the TTT core, post-norm, gate, output projection),
    gradients w.r.t. its parameters and x.
  ours_in_ttt_lm_jax_layer[_gN]: the same layer and parameters with its `ttt` (the core) replaced
    by our ttt_scan.
  The reference is written for jax 0.4 and flax 0.7: for newer jax, its calls of jnp.clip with
  a_min are mapped to min, and its training utilities (ttt/infra/jax_utils.py, which import
  transformers and wandb) are replaced by the two functions the layer takes from them (a
  sharding constraint, a no-op on one device, and the remat policy by name).

Ratios in the JSON: ours over each reference in tok/s (e.g. `ours_noncausal_g16 / ttt_video_dit`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

_PAIRS = {  # reference -> the system of ours that runs the same computation
    "ttt_video_dit": "ours_noncausal",
    "ttt_lm_jax": "ours_causal",
    "ttt_lm_jax_layer": "ours_in_ttt_lm_jax_layer",
}
_LN_EPS = {"ours_noncausal": 1e-8, "ours_causal": 1e-6}


def _inputs(args, causal: bool) -> dict[str, np.ndarray]:
  """The TTT core's inputs in our layout, float32: xq, xk, xv [B, H, S, d]; eta [B, H, S]
  (causal: [B, H, S, b]); W1 [H, d, 4d], b1 [H, 1, 4d], W2 [H, 4d, d], b2 [H, 1, d]; ln_weight,
  ln_bias [H, d]."""
  rng = np.random.default_rng(0)
  B, H, S, d, b = args.batch, args.heads, args.seq, args.head_dim, args.mini_batch_size
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  x = dict(xq=unit(normal(B, H, S, d)), xk=unit(normal(B, H, S, d)), xv=normal(B, H, S, d))
  eta = 0.1 / (1 + np.exp(-normal(B, H, S))) / d / b
  if causal:
    token_idx = 1.0 / (np.arange(S) % b + 1)
    eta = token_idx[:, None] * eta.reshape(B, H, S // b, 1, b).repeat(b, axis=3).reshape(
        B, H, S, b)
  x.update(eta=eta, W1=0.02 * normal(H, d, 4 * d), b1=0.02 * normal(H, 1, 4 * d),
           W2=0.02 * normal(H, 4 * d, d), b2=0.02 * normal(H, 1, d),
           ln_weight=1 + 0.1 * normal(H, d), ln_bias=0.1 * normal(H, d))
  return {k: v.astype(np.float32) for k, v in x.items()}


def _record(name, args, fwd_times, fwd_bwd_times, compile_s, **extra):
  """One system's JSON: min and median seconds, and tok/s from the mins."""
  tokens, t_fwd, t_bwd = args.batch * args.seq, min(fwd_times), min(fwd_bwd_times)
  return dict(system=name, **extra, fwd_s=round(t_fwd, 5), fwd_bwd_s=round(t_bwd, 5),
              fwd_median_s=round(float(np.median(fwd_times)), 5),
              fwd_bwd_median_s=round(float(np.median(fwd_bwd_times)), 5),
              fwd_tokens_per_s=round(tokens / t_fwd, 1),
              fwd_bwd_tokens_per_s=round(tokens / t_bwd, 1),
              fwd_bwd_over_fwd=round(t_fwd / t_bwd, 3),
              compile_and_first_calls_s=round(compile_s, 1))


# ---------------------------------------------------------------------------------------------
# Each system, in its own process: (record, z [B, H, S, d] for the cores, [B, S, width] for the
# layers).


def _name(base: str, group) -> str:
  """A system's name: `base` for a reference (group False), base_gN / base_gnone for ours."""
  return base if group is False else f"{base}_g{'none' if group is None else group}"


def _time_jax(fwd, inputs, repeats):
  """Times of jit(fwd) and of jit(grad of sum(fwd)) w.r.t. every input; their first calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from common import call_times  # pylint: disable=g-import-not-at-top
  fwd = jax.jit(fwd)
  fwd_bwd = jax.jit(jax.grad(lambda *a: fwd(*a).sum(), argnums=tuple(range(len(inputs)))))
  first_fwd, t_fwd = call_times(fwd, *inputs, repeats=repeats)
  first_bwd, t_bwd = call_times(fwd_bwd, *inputs, repeats=repeats)
  return t_fwd, t_bwd, first_fwd + first_bwd, np.asarray(fwd(*inputs))


def _ours(args, causal: bool, group):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ttt_jax.ttt import ttt_scan  # pylint: disable=g-import-not-at-top
  x = {k: jnp.asarray(v) for k, v in _inputs(args, causal).items()}
  base = "ours_causal" if causal else "ours_noncausal"

  def fwd(params, xq, xk, xv, eta):
    return ttt_scan("mlp", params, xq, xk, xv, eta, mini_batch_size=args.mini_batch_size,
                    causal=causal, impl="dual", checkpoint_group_size=group,
                    eps=_LN_EPS[base])[0]

  params = {k: x[k] for k in ("W1", "b1", "W2", "b2", "ln_weight", "ln_bias")}
  t_fwd, t_bwd, first, z = _time_jax(fwd, (params, x["xq"], x["xk"], x["xv"], x["eta"]),
                                     args.repeats)
  return _record(_name(base, group), args, t_fwd, t_bwd, first,
                 checkpoint_group_size=group), z


def _video_dit(args):
  sys.path.insert(0, args.ttt_video_dit)
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.modules["wandb"] = types.ModuleType("wandb")
  import torch  # pylint: disable=g-import-not-at-top
  from ttt.models.ssm.ops import ttt_mlp  # pylint: disable=g-import-not-at-top
  B, H, S, d, b = args.batch, args.heads, args.seq, args.head_dim, args.mini_batch_size
  n = S // b
  group = min(args.video_dit_checkpoint_group_size, n)  # as its TTTMLP.ttt clamps it
  names = ("xq", "xk", "xv", "eta", "W1", "b1", "W2", "b2", "ln_weight", "ln_bias")
  x = _inputs(args, causal=False)
  inputs = [torch.from_numpy(x[k]) for k in names]

  def fn(xq, xk, xv, eta, w1, b1, w2, b2, ln_w, ln_b):
    # Its layer's layout: [B, H, n, b, d]; eta [B, H, n, b, b], every row the tokens' steps;
    # the initial weights tiled over the batch (TTTMLP.ttt).
    mb = lambda a: a.reshape(B, H, n, b, d)
    eta = eta.reshape(B, H, n, 1, b).repeat(1, 1, 1, b, 1)
    tile = lambda p: torch.tile(p.unsqueeze(0), dims=(B, 1, 1, 1))
    out = ttt_mlp(mb(xk), mb(xq), mb(xv), eta, ln_w, ln_b, tile(w1), tile(b1), tile(w2),
                  tile(b2), group)
    return out.reshape(B, S, H, d).permute(0, 2, 1, 3)  # from [B, n, b, H, d]

  def fwd():
    with torch.no_grad():
      return fn(*inputs)

  def fwd_bwd():
    fn(*(a.clone().requires_grad_() for a in inputs)).sum().backward()

  start = time.perf_counter()
  z = fwd().numpy()
  fwd_bwd()  # torch.compile's first calls compile the mini-batch's forward and backward
  first = time.perf_counter() - start
  times = lambda f: [_timed(f) for _ in range(args.repeats)]
  t_fwd, t_bwd = times(fwd), times(fwd_bwd)
  return _record("ttt_video_dit", args, t_fwd, t_bwd, first, checkpoint_group_size=group,
                 torch=torch.__version__, torch_threads=torch.get_num_threads()), z


def _matmul_bound(args):
  """The non-causal TTT-MLP's matmuls alone: the fastest any fwd+bwd of this algorithm can run
  here while XLA does its matmuls (record, None: no z to compare, the function is another).

  The inner model with its nonlinearities and LayerNorm taken out (f(x) = x W1 W2, loss
  f(k) - v), so every remaining op is one of the dual step's matmuls or a subtraction it also
  does: 7 a mini-batch forward, 14 backward, at the step's shapes ([b, d] x [d, 4d],
  [b, 4d] x [4d, d] and the weight-gradient [d, b] x [b, 4d], each batched over batch x heads),
  chained mini-batch by mini-batch through the weights as the scan chains them. The backward is
  written out, residuals kept (no forward re-run), so fwd+bwd is 3x the forward's matmuls: the
  least that any fwd+bwd does. Its gradients are checked against jax.grad of the same forward.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from common import call_times  # pylint: disable=g-import-not-at-top
  B, H, S, d, b = args.batch, args.heads, args.seq, args.head_dim, args.mini_batch_size
  x = _inputs(args, causal=False)
  # [n, batch x heads, b, d]: mini-batch i of every (batch, head), as our scan slices it.
  mb = lambda a: jnp.asarray(a.reshape(B * H, S // b, b, d).transpose(1, 0, 2, 3))
  q, k, v = mb(x["xq"]), mb(x["xk"]), mb(x["xv"])
  w1 = jnp.asarray(np.tile(x["W1"], (B, 1, 1)))
  w2 = jnp.asarray(np.tile(x["W2"], (B, 1, 1)))
  dot = jnp.einsum
  # One step size for every token, an argument (the step's own per-token eta costs an
  # element-wise product more); ke = eta k is the update's K, as the step scales it. The timed
  # runs use the benchmark's size of step; the gradient check a large one, so that the inner
  # loop's terms of the weight gradients are not lost under the direct ones.

  def step(eta, w, qkv):
    (w1, w2), (q, k, ke, v) = w, qkv
    z1 = dot("zbd,zdh->zbh", k, w1)
    g2 = dot("zbh,zhd->zbd", z1, w2) - v
    g1 = dot("zbd,zhd->zbh", g2, w2)
    w1n = w1 - dot("zbd,zbh->zdh", ke, g1)
    w2n = w2 - dot("zbh,zbd->zhd", z1, eta * g2)
    hq = dot("zbd,zdh->zbh", q, w1n)
    return (w1n, w2n), (dot("zbh,zhd->zbd", hq, w2n), (w1, w2, z1, g1, g2, hq))

  def fwd(eta, q, k, ke, v, w1, w2):
    return jax.lax.scan(functools.partial(step, eta), (w1, w2), (q, k, ke, v))[1][0]

  def back(eta, carry, res):
    (dw1n, dw2n), ((w1, w2, z1, g1, g2, hq), (q, k, ke), (w1n, w2n)) = carry, res
    dout = jnp.ones_like(hq[..., :d])  # d sum(z) / dz
    dhq = dot("zbd,zhd->zbh", dout, w2n)
    dw2n = dw2n + dot("zbh,zbd->zhd", hq, dout)
    dq = dot("zbh,zdh->zbd", dhq, w1n)
    dw1n = dw1n + dot("zbd,zbh->zdh", q, dhq)
    # w1n = w1 - ke^T g1, w2n = w2 - z1^T (eta g2)
    dke = -dot("zbh,zdh->zbd", g1, dw1n)
    dg1 = -dot("zbd,zdh->zbh", ke, dw1n)
    dz1 = -dot("zbd,zhd->zbh", eta * g2, dw2n)
    dg2 = -eta * dot("zbh,zhd->zbd", z1, dw2n) + dot("zbh,zhd->zbd", dg1, w2)  # g1 = g2 w2^T
    dw2 = dw2n + dot("zbh,zbd->zhd", dg1, g2)
    dz1 = dz1 + dot("zbd,zhd->zbh", dg2, w2)  # g2 = z1 w2 - v
    dw2 = dw2 + dot("zbh,zbd->zhd", z1, dg2)
    dk = dot("zbh,zdh->zbd", dz1, w1)  # z1 = k w1
    dw1 = dw1n + dot("zbd,zbh->zdh", k, dz1)
    return (dw1, dw2), (dq, dk, dke, -dg2)

  def fwd_bwd(eta, q, k, ke, v, w1, w2):
    (w1n, w2n), (_, res) = jax.lax.scan(functools.partial(step, eta), (w1, w2), (q, k, ke, v))
    # The weights after each mini-batch: the next one's start, the last one's final weights.
    nxt = lambda a, last: jnp.concatenate([a[1:], last[None]])
    zeros = (jnp.zeros_like(w1), jnp.zeros_like(w2))
    (dw1, dw2), grads = jax.lax.scan(
        functools.partial(back, eta), zeros,
        (res, (q, k, ke), (nxt(res[0], w1n), nxt(res[1], w2n))), reverse=True)
    return (*grads, dw1, dw2)

  eta = jnp.float32(0.1 / d / b)
  inputs = (eta, q, k, eta * k, v, w1, w2)
  fwd, fwd_bwd = jax.jit(fwd), jax.jit(fwd_bwd)
  first_fwd, t_fwd = call_times(fwd, *inputs, repeats=args.repeats)
  first_bwd, t_bwd = call_times(fwd_bwd, *inputs, repeats=args.repeats)
  eta = jnp.float32(1.0 / b)  # the check's step
  inputs = (q[:4], k[:4], eta * k[:4], v[:4], 30 * w1, 30 * w2)
  got = fwd_bwd(eta, *inputs)
  want = jax.grad(lambda *a: fwd(eta, *a).sum(), argnums=tuple(range(len(inputs))))(*inputs)
  err = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want))
  if not err <= 1e-4:  # NaN fails too
    raise AssertionError(f"the written-out backward is off jax.grad by {err:.2e} (relative)")
  return _record("matmul_bound_noncausal", args, t_fwd, t_bwd, first_fwd + first_bwd,
                 matmuls_per_mini_batch=dict(fwd=7, fwd_bwd=21),
                 grad_check_relative_error=err), None


def _timed(f) -> float:
  start = time.perf_counter()
  f()
  return time.perf_counter() - start


def _lm_jax_module(args, group=False):
  """(ttt-lm-jax's TTTMLP at our shapes, its config); with a group (int or None, not False) the
  same module with our ttt_scan, at that checkpoint_group_size, as its core."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  clip = jnp.clip
  jnp.clip = lambda x, a_min=None, a_max=None, **kw: clip(x, kw.pop("min", a_min),
                                                          kw.pop("max", a_max), **kw)
  utils = types.ModuleType("ttt.infra.jax_utils")
  utils.with_sharding_constraint = lambda x, spec: x
  utils.get_gradient_checkpoint_policy = lambda name: getattr(jax.checkpoint_policies, name)
  sys.modules["ttt.infra.jax_utils"] = utils
  sys.path.insert(0, args.ttt_lm_jax)
  from ttt.models import ttt_layer  # pylint: disable=g-import-not-at-top
  config = types.SimpleNamespace(
      hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
      mini_batch_size=args.mini_batch_size, max_sequence_length=args.seq, rope_theta=10000.0,
      initializer_range=0.02, ttt_base_lr=0.1, remat_mini_batch_group_size=min(
          args.lm_jax_remat_group_size, args.seq // args.mini_batch_size),
      output_ttt_stats=False, remat_conv="", conv_width=4)
  if group is False:
    return ttt_layer.TTTMLP(config=config), config

  from ttt_jax.ttt import ttt_scan  # pylint: disable=g-import-not-at-top

  class OursInTTTMLP(ttt_layer.TTTMLP):
    """Its layer with our TTT core; its parameters, projections and eta unchanged."""

    def ttt(self, XQ, XK, XV, eta, input_ids):  # pylint: disable=invalid-name
      del input_ids
      B, H, n, b, d = XQ.shape  # pylint: disable=invalid-name
      w1, w2, b1, b2 = self.ttt_params
      ln = self.ttt_norm_params["ttt_norm"]
      seq = lambda a: a.reshape(B, H, n * b, a.shape[-1])
      z, _ = ttt_scan("mlp", dict(W1=w1, b1=b1, W2=w2, b2=b2, ln_weight=ln["scale"],
                                  ln_bias=ln["bias"]), seq(XQ), seq(XK), seq(XV), seq(eta),
                      mini_batch_size=b, causal=True, impl="dual", checkpoint_group_size=group,
                      eps=_LN_EPS["ours_causal"])
      return jnp.transpose(z, (0, 2, 1, 3)).reshape(B, n * b, H * d), (None, None, None)

  return OursInTTTMLP(config=config), config


def _lm_jax_core(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  module, config = _lm_jax_module(args)
  B, H, S, d, b = args.batch, args.heads, args.seq, args.head_dim, args.mini_batch_size
  variables = module.init(jax.random.key(0), jnp.zeros((B, S, H * d)),
                          position_ids=jnp.arange(S)[None])
  x = {k: jnp.asarray(v) for k, v in _inputs(args, causal=True).items()}
  names = {"W1": "ttt_dense_0", "b1": "ttt_bias_0", "W2": "ttt_dense_1", "b2": "ttt_bias_1",
           "ln_weight": "ttt_norm/scale", "ln_bias": "ttt_norm/bias"}
  core = {theirs: x[ours] for ours, theirs in names.items()}
  rest = {k: v for k, v in variables["params"].items() if k not in core}
  mb = lambda a: a.reshape(B, H, S // b, b, a.shape[-1])

  def fwd(core, xq, xk, xv, eta):
    z, _ = module.apply({"params": {**rest, **core}}, mb(xq), mb(xk), mb(xv), mb(eta), None,
                        method=lambda m, *a: m.ttt(*a))
    return jnp.transpose(z.reshape(B, S, H, d), (0, 2, 1, 3))

  t_fwd, t_bwd, first, z = _time_jax(fwd, (core, x["xq"], x["xk"], x["xv"], x["eta"]),
                                     args.repeats)
  return _record("ttt_lm_jax", args, t_fwd, t_bwd, first,
                 remat_mini_batch_group_size=config.remat_mini_batch_group_size), z


def _lm_jax_layer(args, group=False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  module, config = _lm_jax_module(args, group)
  B, S = args.batch, args.seq
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, S, args.heads * args.head_dim),
                                                           np.float32))
  position_ids = jnp.broadcast_to(jnp.arange(S), (B, S))
  params = module.init(jax.random.key(0), x, position_ids=position_ids)["params"]
  fwd = lambda params, x: module.apply({"params": params}, x, position_ids=position_ids)[0]
  t_fwd, t_bwd, first, z = _time_jax(fwd, (params, x), args.repeats)
  extra = (dict(remat_mini_batch_group_size=config.remat_mini_batch_group_size)
           if group is False else dict(checkpoint_group_size=group))
  return _record(_name("ours_in_ttt_lm_jax_layer", group) if group is not False
                 else "ttt_lm_jax_layer", args, t_fwd, t_bwd, first, **extra), z


def _run_system(args):
  # '' runs a reference (group False), 'none' ours without rematerialisation.
  group = {"": False, "none": None}.get(args.system_group)
  if args.system_group not in ("", "none"):
    group = int(args.system_group)
  runs = {
      "ours_noncausal": lambda: _ours(args, False, group),
      "ours_causal": lambda: _ours(args, True, group),
      "ttt_video_dit": lambda: _video_dit(args),
      "ttt_lm_jax": lambda: _lm_jax_core(args),
      "ttt_lm_jax_layer": lambda: _lm_jax_layer(args),
      "ours_in_ttt_lm_jax_layer": lambda: _lm_jax_layer(args, group),
      "matmul_bound_noncausal": lambda: _matmul_bound(args),
  }
  record, z = runs[args.system]()
  if z is not None:
    np.save(args.system_out, z)
  print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver.


def _systems(args) -> list[tuple[str, str]]:
  """(system, its group argument: '' for the references) in run order."""
  groups = args.checkpoint_group_size.split(",")
  out = [("ours_noncausal", g) for g in groups] + [("matmul_bound_noncausal", "")]
  if args.ttt_video_dit:
    out.append(("ttt_video_dit", ""))
  if args.ttt_lm_jax:
    out += [("ours_causal", g) for g in groups] + [("ttt_lm_jax", "")]
    out += [("ours_in_ttt_lm_jax_layer", g) for g in groups] + [("ttt_lm_jax_layer", "")]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ttt_video_dit", default="", help="local checkout of ttt-video-dit")
  parser.add_argument("--ttt_lm_jax", default="", help="local checkout of ttt-lm-jax")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--mini_batch_size", type=int, default=64)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--checkpoint_group_size", default="16,none",
                      help="ours: comma-separated group sizes, none = no rematerialisation")
  parser.add_argument("--video_dit_checkpoint_group_size", type=int, default=16)
  parser.add_argument("--lm_jax_remat_group_size", type=int, default=4)
  parser.add_argument("--system", default="", help=argparse.SUPPRESS)  # one system, in a child
  parser.add_argument("--system_group", default="", help=argparse.SUPPRESS)
  parser.add_argument("--system_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.seq % args.mini_batch_size:
    parser.error(f"--seq {args.seq} must be a multiple of --mini_batch_size "
                 f"{args.mini_batch_size} (the references do not pad)")
  if args.system:
    _run_system(args)
    return

  records, outputs, failed = {}, {}, {}
  shared = list(argv if argv is not None else sys.argv[1:])
  with tempfile.TemporaryDirectory() as tmp:
    for system, group in _systems(args):
      out = os.path.join(tmp, f"{system}_{group}.npy")
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *shared,
                             "--system", system, "--system_group", group, "--system_out", out],
                            capture_output=True, text=True, check=False)
      if proc.returncode:
        failed[_name(system, False if not group else group)] = (
            proc.stderr.strip().splitlines() or ["no output"])[-1]
        continue
      record = json.loads(proc.stdout.strip().splitlines()[-1])
      records[record["system"]] = record
      if os.path.exists(out):
        outputs[record["system"]] = np.load(out)

  ratios = {}
  for ref, ours_base in _PAIRS.items():
    for name in (n for n in records if n.startswith(ours_base + "_g")):
      if ref not in records:
        continue
      ratios[f"{name} / {ref}"] = dict(
          fwd=round(records[name]["fwd_tokens_per_s"] / records[ref]["fwd_tokens_per_s"], 3),
          fwd_bwd=round(records[name]["fwd_bwd_tokens_per_s"]
                        / records[ref]["fwd_bwd_tokens_per_s"], 3),
          max_abs_diff=float(np.max(np.abs(outputs[name] - outputs[ref]))))
  if "matmul_bound_noncausal" in records and "ttt_video_dit" in records:
    bound, ref = records["matmul_bound_noncausal"], records["ttt_video_dit"]
    ratios["matmul_bound_noncausal / ttt_video_dit"] = dict(
        fwd=round(bound["fwd_tokens_per_s"] / ref["fwd_tokens_per_s"], 3),
        fwd_bwd=round(bound["fwd_bwd_tokens_per_s"] / ref["fwd_bwd_tokens_per_s"], 3))
  import jax  # pylint: disable=g-import-not-at-top
  print(json.dumps(dict(
      shape=dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                 mlp_hidden=4 * args.head_dim, mini_batch_size=args.mini_batch_size,
                 seq=args.seq),
      device=jax.devices()[0].device_kind, systems=records, ratios=ratios,
      failed=failed, not_run=[r for r, path in (("ttt_video_dit", args.ttt_video_dit),
                                               ("ttt_lm_jax", args.ttt_lm_jax)) if not path])))


if __name__ == "__main__":
  main()
