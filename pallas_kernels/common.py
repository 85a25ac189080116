"""Fused Pallas kernels for the mini-batch TTT scan, shared by TTT-MLP and TTT-Linear.

One kernel program per (batch, head). The head's inner weights stay on chip (loop carry) for the
whole scan over mini-batches; the kernel reads one mini-batch of xq/xk/xv/eta at a time and writes
only z, the final weights and (for the backward) the weights at every `group_size`-th mini-batch
boundary. The math of a mini-batch is not here: it is ttt_jax/ttt/dual.py (`dual.forward`, the
step, and `dual.backward`, its hand-derived backward), the same functions that impl="dual" of
ttt_scan runs under lax.scan. These kernels add the grid, the BlockSpecs and the DMAs.

Backward kernel, per (batch, head), in reverse group order: recompute the group's per-mini-batch
weights from its checkpoint into a workspace, then walk the group backwards, pulling the cotangent
of the weights and of z through `dual.backward` of each mini-batch. It returns the gradients of
xq, xk, xv, eta, of W0 and of the LayerNorm per (batch, head); the caller sums them over batch.

Layout inside the kernels (the batch and head axes are squeezed away by the BlockSpecs):
  weights W1 [d, h], b1 [1, h], (W2 [h, d], b2 [1, d]); ln_weight, ln_bias [1, d];
  xq, xk, xv [seq, d]; eta_col [seq, 1] (the step each token takes in its mini-batch's final
  weights); causal only: eta_mat [seq, b] (row t, column s: the step of token s in the weights
  that token t reads, zero for s > t).

Backends (`ScanConfig.platform`): Mosaic on TPU, Triton on GPU, the Pallas interpreter elsewhere.
On TPU everything that grows with the sequence stays in HBM and the kernels copy one mini-batch
(or one checkpoint) at a time through VMEM; the copies are synchronous, not yet double-buffered
against the matmuls. Only interpreters have run these kernels (tests on CPU, including the TPU
kernels in Pallas' TPU interpreter, which simulates HBM/VMEM and the DMAs); for TPU they compile
ahead of time (libtpu on a CPU host, bf16, forward and backward, sharded over a v5p-8:
tests/test_aot_compile.py), for GPU they are known to lower to Triton IR; neither has been run or
timed on hardware.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

# The step and its backward, written once for the XLA scan and these kernels (pure jax).
from ttt_jax.ttt import dual


# ---------------------------------------------------------------------------------------------
# Kernels.


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Static description of one scan (hashable: it keys the custom_vjp and the kernels)."""
  inner: str  # "mlp" or "linear": the inner model of dual.forward
  causal: bool
  eps: float
  mini_batch_size: int
  group_size: int
  # "tpu", "gpu", "interpret" (any platform, as plain JAX) or "tpu_interpret" (the TPU kernels in
  # Pallas' TPU interpreter, which simulates HBM, VMEM and the DMAs between them).
  platform: str
  mxu_dtype: str
  # pallas_call's `interpret`: False, True, or a pltpu.InterpretParams for "tpu_interpret".
  interpret: Any = False

  @property
  def dma(self) -> bool:
    """Whether streamed arrays stay in HBM and are copied slice by slice (the TPU kernels)."""
    return self.platform in ("tpu", "tpu_interpret")

  @property
  def weight_keys(self) -> tuple[str, ...]:
    return dual.WEIGHT_KEYS[self.inner]

  def dots(self, acc_dtype) -> dual.Dots:
    return dual.Dots(jnp.dtype(self.mxu_dtype), acc_dtype)


# Arrays that grow with the sequence (x, z and their gradients, checkpoints, the backward's
# workspace) are "streamed": on TPU they stay in HBM (pl.ANY) and the kernels DMA one slice at a
# time through VMEM, so VMEM bounds neither the sequence length nor the number of checkpoints.
# Elsewhere they are ordinary blocks (on GPU, Triton reads blocks from global memory on access).


def _streamed_views(refs: tuple[Any, ...], dma: bool) -> tuple[Any, ...]:
  """The program's (batch, head) slice of each streamed ref."""
  if not dma:
    return refs  # the BlockSpecs already sliced them
  bi, hi = pl.program_id(0), pl.program_id(1)
  return tuple(ref.at[bi, hi] for ref in refs)


def _load(ref, index, dma: bool) -> jax.Array:
  """ref[index] of a streamed ref."""
  if not dma:
    return ref[index]
  src = ref.at[index]

  def copy(buf):
    pltpu.sync_copy(src, buf)
    return buf[...]

  return pl.run_scoped(copy, pltpu.VMEM(src.shape, ref.dtype))


def _store(ref, index, val: jax.Array, dma: bool) -> None:
  """ref[index] = val for a streamed ref."""
  val = val.astype(ref.dtype)
  if not dma:
    ref[index] = val
    return

  def copy(buf):
    buf[...] = val
    pltpu.sync_copy(buf, ref.at[index])

  pl.run_scoped(copy, pltpu.VMEM(val.shape, ref.dtype))


def _rows(i: jax.Array, b: int) -> tuple[Any, slice]:
  """Index of mini-batch i in a [seq, ...] ref."""
  return pl.ds(pl.multiple_of(i * b, b), b), slice(None)


def _mini_batch(x_refs: tuple[Any, ...], i: jax.Array, cfg: ScanConfig,
                dtype) -> dual.MiniBatch:
  """Reads mini-batch i from the streamed (xq, xk, xv, eta_col[, eta_mat]) refs, as `dtype`."""
  rows = _rows(i, cfg.mini_batch_size)
  vals = [_load(ref, rows, cfg.dma).astype(dtype) for ref in x_refs]
  return dual.MiniBatch(*vals, *([None] * (5 - len(vals))))


def _store_tree(refs: tuple[Any, ...], index: Any, tree: tuple[jax.Array, ...],
                dma: bool) -> None:
  for ref, val in zip(refs, tree):
    _store(ref, index, val, dma)


def _split(refs: tuple[Any, ...], *sizes: int) -> list[tuple[Any, ...]]:
  """Cuts the kernel's flat refs into consecutive groups of the given sizes."""
  bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
  return [refs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _step(cfg: ScanConfig, dtype, w: tuple[jax.Array, ...], ln_w: jax.Array, ln_b: jax.Array,
          mb: dual.MiniBatch) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """dual.step on weights as a tuple in cfg.weight_keys order."""
  w_new, z = dual.step(cfg.inner, dict(zip(cfg.weight_keys, w)), ln_w, ln_b, mb, eps=cfg.eps,
                       dots=cfg.dots(dtype))
  return tuple(w_new[k] for k in cfg.weight_keys), z


def _step_backward(cfg: ScanConfig, dtype, w: tuple[jax.Array, ...], ln_w: jax.Array,
                   ln_b: jax.Array, mb: dual.MiniBatch, dw_new: tuple[jax.Array, ...],
                   dz: jax.Array):
  """dual.recompute_backward on weights as tuples in cfg.weight_keys order.

  Returns (dW before the mini-batch as a tuple, d ln_w, d ln_b, MiniBatch of input cotangents).
  """
  keys = cfg.weight_keys
  dw, d_lnw, d_lnb, d_mb = dual.recompute_backward(
      cfg.inner, dict(zip(keys, w)), ln_w, ln_b, mb, dict(zip(keys, dw_new)), dz, eps=cfg.eps,
      dots=cfg.dots(dtype))
  return tuple(dw[k] for k in keys), d_lnw, d_lnb, d_mb


def _forward_kernel(*refs, cfg: ScanConfig, n_mb: int, save_checkpoints: bool):
  nw, nx = len(cfg.weight_keys), 5 if cfg.causal else 4
  w_refs, (lnw_ref, lnb_ref), x_refs, (z_ref,), final_refs, ckpt_refs = _split(
      refs, nw, 2, nx, 1, nw, nw if save_checkpoints else 0)
  x_refs, (z_ref,), ckpt_refs = (_streamed_views(r, cfg.dma)
                                 for r in (x_refs, (z_ref,), ckpt_refs))
  dtype, dma = final_refs[0].dtype, cfg.dma
  ln_w, ln_b = lnw_ref[...].astype(dtype), lnb_ref[...].astype(dtype)
  b, g = cfg.mini_batch_size, cfg.group_size

  def body(i, w):
    if save_checkpoints:
      # lax.rem/div, not % and //: i >= 0, and jnp's floor semantics lower to sign ops that
      # Mosaic only handles on some TPU generations.
      @pl.when(jax.lax.rem(i, g) == 0)
      def _():
        _store_tree(ckpt_refs, jax.lax.div(i, g), w, dma)
    w_new, z = _step(cfg, dtype, w, ln_w, ln_b, _mini_batch(x_refs, i, cfg, dtype))
    _store(z_ref, _rows(i, b), z, dma)
    return w_new

  w0 = tuple(ref[...].astype(dtype) for ref in w_refs)
  _store_tree(final_refs, ..., jax.lax.fori_loop(0, n_mb, body, w0), False)


def _backward_kernel(*refs, cfg: ScanConfig, n_mb: int):
  nw, nx = len(cfg.weight_keys), 5 if cfg.causal else 4
  (ckpt_refs, (lnw_ref, lnb_ref), x_refs, (dz_ref,), dfinal_refs, dx_refs, dw0_refs,
   (dlnw_ref, dlnb_ref), work_refs) = _split(refs, nw, 2, nx, 1, nw, nx, nw, 2, nw)
  ckpt_refs, x_refs, (dz_ref,), dx_refs, work_refs = (
      _streamed_views(r, cfg.dma) for r in (ckpt_refs, x_refs, (dz_ref,), dx_refs, work_refs))
  dtype, dma = dw0_refs[0].dtype, cfg.dma
  b, g = cfg.mini_batch_size, cfg.group_size
  n_groups = -(-n_mb // g)
  ln_w, ln_b = lnw_ref[...].astype(dtype), lnb_ref[...].astype(dtype)

  def group_body(rev, carry):
    grp = n_groups - 1 - rev
    start = grp * g
    count = jnp.minimum(g, n_mb - start)

    def recompute(j, w):
      _store_tree(work_refs, j, w, dma)
      return _step(cfg, dtype, w, ln_w, ln_b, _mini_batch(x_refs, start + j, cfg, dtype))[0]

    w_ckpt = tuple(_load(ref, grp, dma).astype(dtype) for ref in ckpt_refs)
    jax.lax.fori_loop(0, count, recompute, w_ckpt)

    def backprop(rev_j, carry):
      dw, dln_w, dln_b = carry
      i = start + count - 1 - rev_j
      w = tuple(_load(ref, i - start, dma).astype(dtype) for ref in work_refs)
      dw, d_lnw, d_lnb, d_mb = _step_backward(cfg, dtype, w, ln_w, ln_b,
                                              _mini_batch(x_refs, i, cfg, dtype), dw,
                                              _load(dz_ref, _rows(i, b), dma).astype(dtype))
      _store_tree(dx_refs, _rows(i, b), d_mb, dma)
      return dw, dln_w + d_lnw, dln_b + d_lnb

    return jax.lax.fori_loop(0, count, backprop, carry)

  dw_final = tuple(ref[...].astype(dtype) for ref in dfinal_refs)
  zeros = jnp.zeros_like(ln_w)
  dw0, dln_w, dln_b = jax.lax.fori_loop(0, n_groups, group_body, (dw_final, zeros, zeros))
  _store_tree(dw0_refs, ..., dw0, False)
  _store_tree((dlnw_ref, dlnb_ref), ..., (dln_w, dln_b), False)


# How each kernel operand is laid out: "head": [heads, ...], shared by the batch; "block":
# [batch, heads, ...], small; "stream": [batch, heads, ...], grows with the sequence (see above).
_HEAD, _BLOCK, _STREAM = "head", "block", "stream"


def _spec(shape: tuple[int, ...], kind: str, dma: bool) -> pl.BlockSpec:
  """A BlockSpec that hands each program its (batch, head) slice; trailing dims stay whole."""
  if kind == _STREAM and dma:
    return pl.BlockSpec(memory_space=pl.ANY)  # sliced by _streamed_views, copied by _load/_store
  lead = (pl.squeezed,) * (1 if kind == _HEAD else 2)
  rest = tuple(shape[len(lead):])
  index_map = lambda bi, hi: ((hi,) if kind == _HEAD else (bi, hi)) + (0,) * len(rest)
  return pl.BlockSpec(lead + rest, index_map)


def _compiler_params(platform: str) -> pl.CompilerParams | None:
  """Picks the backend: Mosaic on TPU, Triton on GPU.

  Not Mosaic GPU: its blocks are staged whole in shared memory, and a head's sequence does not
  fit (paper shapes need > 400 KB); Triton blocks stay in global memory and the kernel loads one
  mini-batch at a time.
  """
  if platform == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  if platform == "gpu":
    # Untuned. A head's fp32 state alone is 2 x 64 x 256 x 4 B at the paper's shapes; more warps
    # give the program more registers for it.
    return pltr.CompilerParams(num_warps=8)
  return None


def _call(kernel, cfg: ScanConfig, ins: list[tuple[jax.Array, str]],
          outs: list[tuple[jax.ShapeDtypeStruct, str]]) -> list[jax.Array]:
  """pallas_call over the grid (batch, heads); ins and outs pair each operand with its kind."""
  batch, heads = next(a.shape[:2] for a, kind in ins if kind != _HEAD)
  return pl.pallas_call(
      kernel, grid=(batch, heads), out_shape=[o for o, _ in outs],
      in_specs=[_spec(a.shape, kind, cfg.dma) for a, kind in ins],
      out_specs=[_spec(o.shape, kind, cfg.dma) for o, kind in outs],
      interpret=cfg.interpret, compiler_params=_compiler_params(cfg.platform),
  )(*(a for a, _ in ins))


def _forward(cfg: ScanConfig, w0, ln_w, ln_b, xs, save_checkpoints: bool):
  """Returns z [B, H, S, d], final weights [B, H, ...], checkpoints [B, H, n_ckpt, ...] (or ())."""
  batch, heads, seq, _ = xs[0].shape
  n_mb = seq // cfg.mini_batch_size
  n_ckpt = -(-n_mb // cfg.group_size)
  sds = jax.ShapeDtypeStruct
  outs = [(sds(xs[0].shape, xs[0].dtype), _STREAM)]
  outs += [(sds((batch, heads) + w.shape[1:], w.dtype), _BLOCK) for w in w0]
  if save_checkpoints:
    outs += [(sds((batch, heads, n_ckpt) + w.shape[1:], w.dtype), _STREAM) for w in w0]
  ins = [(a, _HEAD) for a in (*w0, ln_w, ln_b)] + [(x, _STREAM) for x in xs]
  kernel = functools.partial(_forward_kernel, cfg=cfg, n_mb=n_mb,
                             save_checkpoints=save_checkpoints)
  res = _call(kernel, cfg, ins, outs)
  nw = len(w0)
  return res[0], tuple(res[1:1 + nw]), tuple(res[1 + nw:])


def _backward(cfg: ScanConfig, ckpts, ln_w, ln_b, xs, dz, dfinal):
  """Per-(batch, head) gradients: (dxs, dw0 [B, H, ...], dln_w [B, H, 1, d], dln_b)."""
  batch = xs[0].shape[0]
  n_mb = xs[0].shape[2] // cfg.mini_batch_size
  sds = jax.ShapeDtypeStruct
  dtype = ckpts[0].dtype
  outs = [(sds(x.shape, x.dtype), _STREAM) for x in xs]
  outs += [(sds(c.shape[:2] + c.shape[3:], dtype), _BLOCK) for c in ckpts]
  outs += [(sds((batch,) + ln_w.shape, dtype), _BLOCK)] * 2
  # Workspace for the weights inside one group; an output so that it needs no backend-specific
  # scratch type.
  outs += [(sds(c.shape[:2] + (cfg.group_size,) + c.shape[3:], dtype), _STREAM) for c in ckpts]
  ins = ([(c, _STREAM) for c in ckpts] + [(ln_w, _HEAD), (ln_b, _HEAD)]
         + [(x, _STREAM) for x in (*xs, dz)] + [(d, _BLOCK) for d in dfinal])
  kernel = functools.partial(_backward_kernel, cfg=cfg, n_mb=n_mb)
  res = _call(kernel, cfg, ins, outs)
  nx, nw = len(xs), len(ckpts)
  return (tuple(res[:nx]), tuple(res[nx:nx + nw]), res[nx + nw], res[nx + nw + 1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_scan(cfg: ScanConfig, w0: tuple[jax.Array, ...], ln_w: jax.Array, ln_b: jax.Array,
               xs: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The differentiable fused scan.

  Args:
    cfg: static configuration.
    w0: initial weights in cfg.weight_keys order, each [heads, ...] (state dtype).
    ln_w, ln_b: [heads, 1, d].
    xs: (xq, xk, xv [batch, heads, seq, d], eta_col [batch, heads, seq, 1]
      [, eta_mat [batch, heads, seq, b]]).

  Returns:
    z [batch, heads, seq, d] in xq's dtype and the final weights, each [batch, heads, ...].
  """
  z, final, _ = _forward(cfg, w0, ln_w, ln_b, xs, save_checkpoints=False)
  return z, final


def _fused_scan_fwd(cfg, w0, ln_w, ln_b, xs):
  z, final, ckpts = _forward(cfg, w0, ln_w, ln_b, xs, save_checkpoints=True)
  return (z, final), (ckpts, ln_w, ln_b, xs)


def _fused_scan_bwd(cfg, res, cotangents):
  ckpts, ln_w, ln_b, xs = res
  dz, dfinal = cotangents
  dxs, dw0, dln_w, dln_b = _backward(cfg, ckpts, ln_w, ln_b, xs, dz, dfinal)
  # W0 and the LayerNorm are shared across the batch.
  dw0 = tuple(jnp.sum(d, axis=0).astype(w.dtype) for d, w in zip(dw0, ckpts))
  return dw0, jnp.sum(dln_w, axis=0).astype(ln_w.dtype), jnp.sum(dln_b, axis=0).astype(
      ln_b.dtype), dxs


fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def kernel_platform(interpret: Any, platform: str | None = None) -> tuple[str, Any]:
  """(ScanConfig.platform, ScanConfig.interpret) for ttt_scan_pallas's `interpret` argument.

  `platform`: that of the devices the program compiles for ("tpu", "gpu", "cuda", "rocm",
  "cpu"); None: jax.default_backend(). A CPU host compiling for compile-only TPU devices passes
  "tpu" and gets the Mosaic kernels.
  None: interpret unless that platform is a TPU or GPU; True: interpret; False: compile;
  a pltpu.InterpretParams: the TPU kernels in the TPU interpreter.
  """
  if isinstance(interpret, pltpu.InterpretParams):
    return "tpu_interpret", interpret
  platform = platform or jax.default_backend()
  backend = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  if interpret or (interpret is None and backend not in ("tpu", "gpu")):
    return "interpret", True
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"the Pallas kernels compile for TPU or GPU only, not {backend!r}; "
                     "pass interpret=True (or None)")
  return backend, False
