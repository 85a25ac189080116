"""Device mesh and logical-axis rules: sharding is declared here once.

Layers name their axes ('embed', 'heads', 'mlp', 'length', ...) and never mention devices. A rules
table maps each logical name to mesh axes; scaling out changes the mesh shape and the table, not
the model. Mesh axes:
  data     pure data parallelism (parameters replicated)
  fsdp     data parallelism with parameters and optimizer state sharded over it (ZeRO-3 style)
  context  the sequence axis of activations: a minute of video is ~351k tokens
  tensor   heads / MLP hidden split (Megatron style)

Activations are pinned by `constrain` while the train step traces under `activation_rules`:
the residual stream [batch, seq, width] is split over (data x fsdp) by batch and over context by
sequence; q/k/v over tensor by heads; the MLP hidden over tensor.

Pallas kernels, which XLA cannot partition (splash attention, the impl="pallas" TTT scan), run
inside the `jax.shard_map` of `sequence_to_heads` (below): each device on its batch
("activation_batch") and heads ("activation_heads", and context's share of them) with the
whole sequence; per-head weights shared by the batch (the TTT's W0 and inner LayerNorm) are
replicated over the batch axes and their gradient summed over them. The kernels compile for
the mesh's devices (`compile_platform`), so a CPU host compiling for compile-only TPU devices
(ttt_jax/plan.py) gets Mosaic kernels, not the interpreter.

Context parallelism (Ulysses, as DeepSpeed-Ulysses): the residual stream [batch, seq, width]
and the block inputs saved for the backward pass stay split by sequence over context
(C devices) in every block. Everything per token runs there: adaLN, the q/k/v projections, the
QK-norms, TTT's L2 norms, RoPE by global frame, target normalisation and η, the output
projections, the MLP. Attention and the TTT scan need whole sequences (a segment's attention
spans a segment; the scan runs the whole video, the reverse pass in another order), and 21
segments do not split evenly over 2-16 devices, so `sequence_to_heads` swaps the split: q, k, v
(and η) [batch, seq/C, heads/T, d] go through one tiled `all_to_all` over context to
[batch, seq, heads/(C*T), d] inside `jax.shard_map`; each device then does the per-segment
layout on whole sequences of its heads (models/dit.Layout's gather into segments, RoPE
restarting per segment, attention, the merge averaging the overlap frame; or the reverse pass's
permutation, the scan and its inverse), and one `all_to_all` brings the output back to
[batch, seq/C, heads/T, d] before the output projection. The heads must divide by C x tensor
(48: 2, 4, 8, 16 devices); anything else is refused. Outside the blocks the canonical order is
made before the patch projection ([batch, seq, in_channels·p²]) and the text is whole on every
device, and the output head runs per token before the video tokens are gathered
([batch, seq, out_channels·p²]), so no collective moves a whole [seq, width] stream.
The baseline mixers (swa, mamba2, gated_deltanet) still see whole sequences through XLA's
partitioner: they all-gather.

Bytes per block at 63 s (configs/tomjerry_63s.py: N = 21 x 458 text + 253 x 1350 video =
351,168 tokens, width w = 48 heads x 64 = 3072, bf16, b = 2 bytes; η float32): the forward
pass has 12 all-to-alls of an [N, w] bf16 array per sample (attention: q, k, v in, output
back; the TTT forward and reverse passes: xq, xk, xv in, z back) and 2 of η [N, 48] float32:
  V = 12 · N · w · 2 + 2 · N · 48 · 4 = 25.89 GB + 0.13 GB = 26.03 GB per sample,
the sum of the arrays passing through them. Each device holds 1/(C·T) of each and keeps 1/C of
what it holds, so it sends (and receives)
  V · (C − 1) / (C² · T) per sample per block:
2.85 GB at C=8, T=1 (236 MB per q/k/v all-to-all); 1.52 GB at C=16; 2.44 GB at C=4, T=2.
Training moves it three times a block under remat "full" (forward, recomputed forward, the
transposed all-to-alls of the backward pass). Gathering the sequence instead, as XLA did before,
costs each device (C − 1)/C · N · w · 2 = 1.89 GB at C=8 per gathered [N, w] array, and every
context device then repeated the same attention and scan.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

Initializer = Callable[..., jax.Array]

# Logical name -> mesh axes (tried in order; a mesh axis is used at most once per array).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("conv_in", None),
) + (
    # Activations have names of their own (maxtext's idea): a parameter's "embed" is sharded
    # over fsdp, but the residual stream's width stays whole on each device, its batch split
    # over data x fsdp and its sequence over context.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
)

# (mesh, rules) while a step is traced under `activation_rules`; `constrain` reads the last.
_ACTIVE: list[tuple[Mesh, tuple[tuple[str, Any], ...]]] = []


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Attaches logical axis `names` (one per parameter dimension) to a parameter initializer.

  Eager sharding is off: the names are metadata only, so modules build without a mesh; a sharded
  model is made by `shard_module`, or by jitting the constructor with `nnx.get_partition_spec`
  out-shardings.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def make_mesh(data: int = -1, fsdp: int = 1, context: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES; one size may be -1 (the rest).

  Raises:
    ValueError: if the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, context, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  # Auto axes: XLA propagates shardings from the annotated inputs/outputs of a jitted step.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types, devices=devices)
  except NotImplementedError:
    # A TPU torus whose axes the sizes are not products of (fsdp=64 x context=2 on a 4x4x8
    # v5p-256): split a physical axis, as maxtext does, rather than refuse the mesh.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Iterable[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array whose axes carry logical `names`.

  A dimension is sharded over a rule's mesh axes only if its size divides evenly and none of
  those mesh axes is used by an earlier dimension; otherwise it is replicated (tiny local
  configs on 8 devices stay valid).
  """
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.State:
  """NamedSharding for every array variable of an nnx.State (a model's, an nnx.Optimizer's),
  from the logical axis names `nnx.get_partition_spec` reads off its metadata; a variable
  without names is replicated, one without an array (optax's masked leaves) stays empty."""
  def sharding(variable, spec):
    if not hasattr(variable.get_value(), "shape"):
      return variable
    names = tuple(spec.get_value()) or None
    return variable.replace(NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh,
                                                                 rules)))
  return jax.tree.map(sharding, state, nnx.get_partition_spec(state),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `module` on `mesh` per its logical names (in place); returns it."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module


def activation_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for an activation, e.g. names ('batch', 'length', 'embed')."""
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                     ) -> Iterator[None]:
  """While tracing under this context, `constrain` pins activations to `mesh` per `rules`.

  Outside it `constrain` returns its input: modules run unsharded in tests and sampling, and a
  jitted step decides its activation layout only where it is traced inside the context.
  """
  _ACTIVE.append((mesh, tuple(tuple(r) for r in rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`jax.lax.with_sharding_constraint` of activation `x` by its logical `names`, under the
  innermost `activation_rules`; x unchanged outside one."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def compile_platform() -> str:
  """The platform the program being traced compiles for: that of the innermost
  `activation_rules` mesh's devices ("tpu" for `get_topology_desc`'s compile-only devices on a
  CPU host), else jax's default backend. Pallas kernels pick Mosaic, Triton or the interpreter
  by it."""
  if _ACTIVE:
    return _ACTIVE[-1][0].devices.flat[0].platform
  return jax.default_backend()


def _rule_axes(name: str, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that logical `name` maps to under `rules`."""
  target = dict(rules).get(name)
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in axes if mesh.shape[a] > 1)


def sequence_to_heads(f: Callable[[Any, Any, Any], Any]) -> Callable[..., Any]:
  """Ulysses context parallelism: `f` on the whole sequence of each device's heads.

  Returns g(tokens, per_head=(), shared=()) -> f's output, where
    tokens    a pytree of arrays [batch, seq, heads, ...] laid out as the residual stream:
              batch over "activation_batch", seq over "activation_length" (context), heads over
              "activation_heads" (tensor);
    per_head  a pytree of per-head arrays [heads, ...] (inner weights), shared by the batch;
    shared    a pytree of arrays every device needs whole (RoPE tables);
  and f(tokens, per_head, shared) maps tokens [batch/B, seq, heads/(C*T), ...] to a pytree of
  [batch/B, seq, heads/(C*T), ...] on one device (B = data x fsdp, C = context, T = tensor
  devices), seeing per_head's [heads/(C*T), ...] rows of the same heads. Under the innermost
  `activation_rules` g runs f inside `jax.shard_map` with a tiled `all_to_all` over the context
  axes on the way in (sequence split -> heads split) and on the way out (heads -> sequence);
  device (t, c) holds heads t*H/T + c*H/(C*T) + [0, H/(C*T)), hence per_head's spec
  (tensor, context). Outside the rules, or on one device, g is f on the whole arrays.

  per_head's gradient is summed over the batch axes by shard_map's transpose of an input
  replicated over them (check_vma=False: Pallas' out_shapes inside f carry no varying-axes
  types). A mesh axis that no rule here maps to (e.g. fsdp when the batch does not divide)
  replicates: its devices compute the same blocks.

  Raises:
    ValueError: if the sequence does not split over context, or the heads over context x tensor.
  """
  def call(tokens: Any, per_head: Any = (), shared: Any = ()) -> Any:
    if not _ACTIVE or _ACTIVE[-1][0].size == 1:
      return f(tokens, per_head, shared)
    mesh, rules = _ACTIVE[-1]
    batch, seq, heads = jax.tree.leaves(tokens)[0].shape[:3]
    seq_axes = _rule_axes("activation_length", mesh, rules)
    head_axes = _rule_axes("activation_heads", mesh, rules)
    context = int(np.prod([mesh.shape[a] for a in seq_axes]))
    tensor = int(np.prod([mesh.shape[a] for a in head_axes]))
    sizes = (f"context={context} ({'x'.join(seq_axes) or '-'}) x tensor={tensor} "
             f"({'x'.join(head_axes) or '-'})")
    if seq % context:
      raise ValueError(f"a sequence of {seq} tokens does not split over {sizes}: "
                       f"{seq} % {context} = {seq % context}")
    if heads % (context * tensor):
      raise ValueError(f"{heads} heads do not split over {sizes}: sequence-to-heads (Ulysses) "
                       f"context parallelism needs heads divisible by {context * tensor}")
    batch_spec = logical_to_spec(("activation_batch",), (batch,), mesh, rules)[0]
    axis = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
    token_spec = PartitionSpec(batch_spec, axis(seq_axes), axis(head_axes))
    head_spec = PartitionSpec(axis(head_axes + seq_axes))
    specs = lambda tree, spec: jax.tree.map(lambda _: spec, tree)

    def local(tokens, per_head, shared):
      if seq_axes:
        tokens = jax.lax.all_to_all(tokens, axis(seq_axes), 2, 1, tiled=True)
      out = f(tokens, per_head, shared)
      if seq_axes:
        out = jax.lax.all_to_all(out, axis(seq_axes), 1, 2, tiled=True)
      return out

    # One spec, a prefix of f's whole output: every leaf is laid out as the tokens (tracing f
    # once more only to learn its output's structure would double the trace time).
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(specs(tokens, token_spec), specs(per_head, head_spec),
                                   specs(shared, PartitionSpec())),
                         out_specs=token_spec, check_vma=False)(tokens, per_head, shared)
  return call
