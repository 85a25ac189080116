"""Staged fine-tuning of the video DiT on precomputed latents.

  python -m ttt_jax.train --config=configs/tomjerry_3s.py[:runlocal] --workdir=DIR \
      [--config.data.latents=LATENTS_DIR] [--config.init_from=PREVIOUS_WORKDIR]
  python -m ttt_jax.train --config=configs/toy.py --workdir=DIR   # the whole toy job

Reads a dataset written by `python -m ttt_jax.data.precompute` (`config.data.latents`) with the
deterministic loader (batch k depends only on the seed and k), and trains with the paper's recipe
(../shared/PAPER.md, "Staged context extension"): v-prediction loss, 10% text dropout, AdamW with
per-group learning rates (TTT/mixer and gates faster than the rest in stage 1) and frozen groups in
later stages, global-norm clipping, bf16 compute with fp32 parameters and optimizer state. The
training state is the DiT and its `nnx.Optimizer`, whose `wrt` is an NNX filter of the trainable
parameter groups (`group_of`); shardings come from `nnx.get_partition_spec` and the mesh rules.

What lands in DIR:
  checkpoints/<step>/{params,opt_state,meta}  Orbax CheckpointManager: periodic + final, keep-N.
      Restarting with the same DIR resumes exactly (same data order, same noise, same losses).
  model/{params,config.json}  the final DiT, loadable by `load_dit` (sampling, next stage).
  metrics.jsonl               one line per step: step, loss, grad_norm, lr.
  events.out.tfevents.*       TensorBoard (clu writers).

Start (`checkpoint.restore_or_init`): resume the newest checkpoint, else hand off, else init.
Stage hand-off: `config.init_from` names the previous stage's workdir (or a converted CogVideoX
directory with params/ + config.json). Parameters only are loaded; mixer and gate parameters the
source lacks are initialised fresh; any other missing parameter, an unexpected one or a shape
mismatch stops with the full list. The optimizer starts fresh.

Metrics stay on the devices and are copied to the host every `train.log_every` steps and before
each checkpoint (as big_vision does): a NaN or inf loss or gradient in that range stops the run
with the step number, before a checkpoint of it is written; the last good checkpoint stays.

Faults: the resume uses the newest checkpoint that restores; a damaged one is moved to
`DIR/checkpoints_broken/` with a warning naming the step and the reason, and Orbax's temporary
directories of an interrupted save are removed. A checkpoint written for another model is an
error (the run does not fall back past it). SIGTERM (TPU preemption and maintenance; on multi-host
JAX's preemption sync point) saves a checkpoint at the step reached, flushes the metric writers
and raises `cli.Preempted`: the command exits 0 with one line saying how to resume. A run that
fails before its first step finishes leaves nothing behind in DIR (no checkpoints/, config.json,
metrics or events file).

Many processes (TPU VM slices, GPU clusters; `--distributed`): each process reads the rows of the
global batch its own devices hold (`loader.process_rows` of the batch sharding). Writes of global
arrays (checkpoints, the model export) run on every process; small files (config.json,
metrics.jsonl, model/config.json) on process 0 alone. DIR may be a gs:// path (etils.epath).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ttt_jax import checkpoint, cli, diffusion, writers
from ttt_jax.data import features
from ttt_jax.data.loader import process_rows
from ttt_jax.models.dit import DiT, DiTConfig
from ttt_jax.models.dit_convert import is_new_param
from ttt_jax.parallel import mesh as mesh_lib

Path = tuple[str, ...]
GROUPS = ("mixer", "gates", "attention", "rest")
# Leaves that get weight decay: the weight matrices. Biases, norm scales, gates, the TTT inner
# biases / LN and the inner learning-rate bias do not (the paper: "not on biases and norms").
_DECAYED = ("kernel", "W1", "W2", "lr_weight", "embedding", "pos_embedding")


# ---------------------------------------------------------------------------- parameter groups

def group_of(path: Path) -> str:
  """'mixer' | 'gates' | 'attention' | 'rest' for a DiT parameter path."""
  if path[0] == "blocks" and len(path) > 1:
    if path[1] in ("mixer", "mixer_reverse"):
      return "mixer"
    if path[1] in ("alpha", "beta"):
      return "gates"
    if path[1] == "attn1":
      return "attention"
  return "rest"


def label_of(path: Path) -> str:
  """The optimizer group of a trainable parameter: 'fast' (mixer_lr) or 'slow' (lr)."""
  return "fast" if group_of(path) in ("mixer", "gates") else "slow"


def in_group(group: str) -> nnx.filterlib.Filter:
  """NNX filter: the parameters of one group."""
  return nnx.All(nnx.Param, lambda path, _: group_of(tuple(map(str, path))) == group)


def trainable_filter(train: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """NNX filter of the parameters `train.trainable` names (groups of GROUPS, or 'all')."""
  trainable = tuple(train.trainable)
  unknown = set(trainable) - set(GROUPS) - {"all"}
  if unknown:
    raise ValueError(f"config.train.trainable has unknown group(s) {sorted(unknown)}; groups: "
                     f"{GROUPS} or 'all'")
  return nnx.Any(*(in_group(g) for g in (GROUPS if "all" in trainable else trainable)))


def _by_path(fn: Callable[[Path], Any], tree: Any) -> Any:
  """fn(path) at every leaf of `tree`; the path holds the dict keys only (an nnx.Variable's
  attribute level is not part of the parameter's name)."""
  def names(keypath):
    return tuple(str(getattr(k, "key", getattr(k, "idx", ""))) for k in keypath
                 if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))
  return jax.tree_util.tree_map_with_path(lambda kp, _: fn(names(kp)), tree)


def schedule_fn(train: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
  """Linear warm-up from 0, then a cosine from `peak` to `train.lr_end` (0 if unset; never above
  the peak, so a group whose peak is lr_end stays constant, as the reference's), or constant."""
  warmup = int(train.warmup_steps)
  if train.schedule == "cosine":
    end = min(float(train.get("lr_end", 0.0)), peak)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(int(train.steps), warmup + 1),
                                              end_value=end)
  if train.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"config.train.schedule must be 'cosine' or 'constant', got "
                   f"{train.schedule!r}")


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW per `label_of` group, over whatever parameters it is given
  (`nnx.Optimizer`'s wrt filter picks the trainable ones)."""
  def adamw(peak):
    return optax.adamw(schedule_fn(train, peak), b1=train.adam_b1, b2=train.adam_b2,
                       weight_decay=train.weight_decay,
                       mask=lambda tree: _by_path(lambda p: p[-1] in _DECAYED, tree))

  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.multi_transform({"fast": adamw(train.mixer_lr), "slow": adamw(train.lr)},
                            lambda tree: _by_path(label_of, tree)))


# ---------------------------------------------------------------------------- model and state

def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
  return DiTConfig.from_dict(config.model.to_dict())


@dataclasses.dataclass
class Setup:
  """Everything the loop needs that does not change per step. The training state is the
  nnx.State of (DiT, nnx.Optimizer): state[0] the model's parameters, state[1] the optimizer's
  step and optax state over the trainable ones."""
  cfg: DiTConfig
  graphdef: Any                   # of (model, optimizer)
  abstract: nnx.State             # the state's jax.ShapeDtypeStructs, with their shardings
  shardings: nnx.State            # NamedSharding per array
  trainable: nnx.filterlib.Filter
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh

  def create(self, seed: int, params: Any = None) -> tuple[DiT, nnx.Optimizer]:
    """A fresh (model, optimizer); `params` (nested dicts, any subset) replace the initial
    values of those parameters before the optimizer state is made."""
    model = DiT(self.cfg, rngs=nnx.Rngs(seed))
    if params:
      state = nnx.state(model, nnx.Param)
      state.replace_by_pure_dict(params)
      nnx.update(model, state)
    return model, nnx.Optimizer(model, self.tx, wrt=self.trainable)

  def items(self, state: nnx.State) -> dict[str, Any]:
    """The state as the checkpoint's items {"params", "opt_state"} (nested dicts)."""
    pure = nnx.to_pure_dict(state)
    return {"params": pure[0], "opt_state": pure[1]}

  def state(self, items: dict[str, Any]) -> nnx.State:
    """`items` back into the (model, optimizer) state."""
    state = jax.tree.map(lambda x: x, self.abstract)  # new Variables: abstract stays as it is
    nnx.replace_by_pure_dict(state, {0: items["params"], 1: items["opt_state"]})
    return state

  def trainable_abstract(self) -> nnx.State:
    """The trainable parameters' jax.ShapeDtypeStructs, with their shardings (the gradients')."""
    return nnx.state(nnx.merge(self.graphdef, self.abstract)[0], self.trainable)

  def init(self, seed: int, params: Any = None) -> dict[str, Any]:
    """`create`'s state as items, made sharded (no full copy on one device); XLA drops the
    initialisation of the parameters `params` gives."""
    make = lambda params: nnx.state(self.create(seed, params))
    return self.items(jax.jit(make, out_shardings=self.shardings, donate_argnums=0)(params))


def build_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  cfg, trainable = dit_config(config), trainable_filter(config.train)
  setup = Setup(cfg, None, None, None, trainable, make_optimizer(config.train), mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: setup.create(config.seed)))
  setup.graphdef, setup.shardings = graphdef, mesh_lib.state_shardings(abstract, mesh,
                                                                        _rules(config))
  setup.abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, setup.shardings)
  if not jax.tree.leaves(nnx.state(abstract[0], trainable)):
    raise ValueError(f"config.train.trainable={tuple(config.train.trainable)} selects no "
                     "parameter of this model")
  # Printed so that a baseline's size can be compared with TTT-MLP's (configs/mixers.py).
  mixer_params = count_params(nnx.state(abstract[0], in_group("mixer")))
  logging.info("mixer %s: %d parameters, %d a layer", cfg.mixer, mixer_params,
               mixer_params // cfg.num_layers)
  return setup


def count_params(tree: Any) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """config.mesh (data x fsdp x context x tensor; default: all devices on data) over devices."""
  m = config.get("mesh", ml_collections.ConfigDict())
  return mesh_lib.make_mesh(m.get("data", -1), m.get("fsdp", 1), m.get("context", 1),
                            m.get("tensor", 1), devices=devices)


def _rules(config):
  rules = config.get("mesh_rules")
  return tuple(tuple(r) for r in rules) if rules else mesh_lib.DEFAULT_RULES


# ---------------------------------------------------------------------------- the train step

def grad_accum_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """Micro-batches per step: config.train.grad_accum_steps, or with 0 as many as leave one
  sample a batch shard (global batch / (data x fsdp)), so that any mesh trains the same global
  batch. Every micro-batch must split evenly over data x fsdp: one that does not would be
  replicated on every device (`logical_to_spec` replicates what does not divide), which is
  refused here."""
  size, shards = int(config.train.batch_size), mesh.shape["data"] * mesh.shape["fsdp"]
  steps = int(config.train.get("grad_accum_steps", 1)) or max(size // shards, 1)
  if size % steps or (size // steps) % shards:
    raise ValueError(f"config.train.batch_size={size} in {steps} micro-batch(es) "
                     f"(train.grad_accum_steps) of {size / steps:g} does not split over data x "
                     f"fsdp = {shards} devices: the batch would be replicated; make the "
                     f"micro-batch a multiple of {shards}")
  return steps


def make_train_step(config: ml_collections.ConfigDict, setup: Setup, null_text: np.ndarray,
                    batch_shardings: dict[str, NamedSharding]):
  """jit-compiled (state, batch, step) -> (state, metrics); state: `Setup`'s (model, optimizer)
  nnx.State, donated; batch {"latents": [B, F, C, h, w], "text": [B, segments, L, D]}.

  With `grad_accum_steps` A > 1 the batch is cut into A micro-batches inside the step (a
  `lax.scan`), each holding B/A rows spread over data x fsdp as the batch is (no data moves), and
  the gradients are averaged: the timesteps, noise and text dropout are drawn for the whole
  batch first, so loss and gradient are the big-batch step's (the mean of equal-sized
  micro-batch means), up to summation order."""
  schedule = diffusion.make_schedule(**config.diffusion)
  train = config.train
  null = jnp.asarray(null_text, jnp.float32)
  weighting = train.get("loss_weighting", "snr_plus_one")
  accum = grad_accum_steps(config, setup.mesh)
  rules = _rules(config)
  grads_abstract = setup.trainable_abstract()

  def loss_fn(model, micro):
    """micro: {"latents", "text", "t", "noise", "drop"} of one micro-batch -> mean loss."""
    x0, text, t, noise = micro["latents"], micro["text"], micro["t"], micro["noise"]
    # Text dropout for classifier-free guidance: the whole example's texts become the null text.
    text = jnp.where(micro["drop"][:, None, None, None], null[None, None].astype(text.dtype),
                     text)
    v_pred = model(diffusion.add_noise(schedule, x0, noise, t), text, t)
    return diffusion.v_prediction_loss(schedule, v_pred.astype(jnp.float32), x0, noise, t,
                                       weighting=weighting)

  # Per stage: stages that resume one another must not replay the same noise and timesteps.
  stage_key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(config.stage.encode()))
  lr_fast = schedule_fn(train, train.mixer_lr)
  lr_slow = schedule_fn(train, train.lr)

  def micro_batches(batch, rng):
    """The batch and its draws as [A, B/A, ...]: micro-batch k holds rows k, A + k, 2A + k, ...,
    so that each device holds B/(A x data x fsdp) rows of every micro-batch."""
    x0 = batch["latents"]
    t_rng, n_rng, d_rng = jax.random.split(rng, 3)
    full = {**batch, "t": diffusion.sample_timesteps(
                t_rng, x0.shape[0], schedule, train.high_t_fraction, train.high_t_from),
            "noise": jax.random.normal(n_rng, x0.shape, jnp.float32),
            "drop": jax.random.uniform(d_rng, (x0.shape[0],)) < train.text_dropout}
    def cut(x):
      x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
      return mesh_lib.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(cut, full)

  def step_fn(state, batch, step):
    # The activation constraints are live while the step traces (ttt_jax/parallel/mesh.py).
    with mesh_lib.activation_rules(setup.mesh, rules):
      return update(state, batch, step)

  def update(state, batch, step):
    model, optimizer = nnx.merge(setup.graphdef, state)
    graphdef, params, rest = nnx.split(model, setup.trainable, ...)
    loss_and_grad = jax.value_and_grad(
        lambda params, micro: loss_fn(nnx.merge(graphdef, params, rest), micro))

    def accumulate(total, micro):
      loss, grads = loss_and_grad(params, micro)
      return jax.tree.map(jnp.add, total, (loss, grads)), None

    # The sum of gradients is sharded as the parameters are (not left to propagation).
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(jnp.zeros(a.shape, a.dtype), a.sharding),
        grads_abstract))
    (loss, grads), _ = jax.lax.scan(
        accumulate, zeros, micro_batches(batch, jax.random.fold_in(stage_key, step)))
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    optimizer.update(model, grads)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_slow(step),
               "lr_mixer": lr_fast(step)}
    return nnx.state((model, optimizer)), metrics

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(setup.shardings, batch_shardings, replicated),
                 out_shardings=(setup.shardings, replicated), donate_argnums=0)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def export_model(directory: str | os.PathLike, cfg: DiTConfig, params: Any) -> None:
  """Writes `directory/params` + `config.json` (what `load_dit` reads), replacing a previous one.
  Called on every process with the same global arrays (nested dicts): Orbax writes each
  process's shards and commits the checkpoint once. config.json is written last, by process 0,
  so an export cut short has none and `load_dit` (and `launch/stages.sh`) refuse it. No
  directory rename: a gs:// "directory" cannot be renamed atomically."""
  directory = checkpoint.as_path(directory)
  if jax.process_index() == 0 and directory.exists():
    directory.rmtree()
  _barrier(f"export {directory}: old removed")
  checkpoint.save_model(directory, cfg, params)
  _barrier(f"export {directory}: written")


# ---------------------------------------------------------------------------- the batches

_BATCH_AXES = {"latents": ("batch",) + (None,) * 4, "text": ("batch",) + (None,) * 3}


def batch_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> tuple[dict[str, NamedSharding], np.ndarray]:
  """({"latents", "text"} -> sharding of the global batch, the rows of it this process's devices
  hold: int64 [R], sorted)."""
  size = int(config.train.batch_size)
  shardings = {k: mesh_lib.activation_sharding(mesh, names, (size,) + (1,) * (len(names) - 1),
                                               _rules(config))
               for k, names in _BATCH_AXES.items()}
  rows = {k: process_rows(shardings[k], (size,) + (1,) * (len(names) - 1))
          for k, names in _BATCH_AXES.items()}
  if not np.array_equal(rows["latents"], rows["text"]):  # one logical axis: they cannot differ
    raise ValueError(f"the latents and text batch shardings hold different rows: {rows}")
  return shardings, rows["latents"]


def to_global(local: dict[str, Any], step: int, batch_size: int,
              shardings: dict[str, NamedSharding], rows: np.ndarray) -> dict[str, jax.Array]:
  """This process's `rows` of the global batch at `step` ([R, ...] each) -> the global batch:
  {"latents": [B, F, C, h, w], "text": [B, segments, L, D]} jax Arrays with `shardings`."""
  out = {}
  for k, sharding in shardings.items():
    value = np.asarray(local[k])
    if value.shape[0] != len(rows):
      raise ValueError(f"loader.batch({step}, rows) gave {value.shape[0]} rows of {k!r} for the "
                       f"{len(rows)} rows asked")
    # Reads this process's rows of the global batch from `value` in sorted order: `rows`' order.
    out[k] = jax.make_array_from_process_local_data(sharding, value,
                                                    (batch_size,) + value.shape[1:])
  return out


def global_batch(loader: Any, step: int, batch_size: int, shardings: dict[str, NamedSharding],
                 rows: np.ndarray) -> dict[str, jax.Array]:
  """The global batch at `step` built from this process's `rows` of it (`loader.batch`)."""
  return to_global(loader.batch(step, rows), step, batch_size, shardings, rows)


def _local_batches(loader: Any, start: int, stop: int, rows: np.ndarray
                   ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(step, this process's rows of its batch) for start <= step < stop: `loader.iterate` (which
  reads ahead in a background thread) when it has one, else `loader.batch` step by step."""
  if hasattr(loader, "iterate"):
    return loader.iterate(start, stop - start, rows)
  return ((step, loader.batch(step, rows)) for step in range(start, stop))


def _check_batch_shapes(config, batch, patch_size: int):
  c = config
  f = features.latent_frames(c.segments)
  lat, text = batch["latents"], batch["text"]
  if lat.shape[1] != f or lat.shape[2] != c.model.in_channels:
    raise ValueError(f"dataset latents {lat.shape[1:]} (frames, channels, h, w) do not match the "
                     f"config: {f} latent frames for {c.segments} segments, "
                     f"{c.model.in_channels} channels")
  if lat.shape[3] % patch_size or lat.shape[4] % patch_size:
    raise ValueError(f"dataset latents are {lat.shape[3]}x{lat.shape[4]} (h, w): each must be a "
                     f"multiple of the DiT's patch_size {patch_size}")
  if text.shape[1] != c.segments or text.shape[3] != c.model.text_embed_dim:
    raise ValueError(f"dataset text embeddings {text.shape[1:]} (segments, length, dim) do not "
                     f"match the config: {c.segments} segments, text_embed_dim "
                     f"{c.model.text_embed_dim}")


# ---------------------------------------------------------------------------- the loop

# What a fresh run writes in its workdir: removed again if it fails before its first step ends.
# (tensorboardX writes the hparams into a hparams/ folder of their own.)
_RUN_FILES = ("checkpoints", "config.json", "metrics.jsonl", "events.out.tfevents.*", "hparams")


def _remove_run_files(workdir: epath.Path, before: set[str] | None) -> None:
  for pattern in _RUN_FILES:
    for path in workdir.glob(pattern):
      if before is None or path.name not in before:
        path.rmtree() if path.is_dir() else path.unlink()
  if before is None and workdir.is_dir() and not any(workdir.iterdir()):
    workdir.rmdir()


def train(config: ml_collections.ConfigDict, workdir: str, *, loader: Any = None,
          mesh: jax.sharding.Mesh | None = None,
          on_step: Callable[[int, int, dict[str, float]], None] | None = None,
          hooks: Sequence[Callable[[int], Any]] = ()) -> dict[str, Any]:
  """Runs (or resumes) one stage. Returns a summary dict (final step, last loss, paths).

  Args:
    config: a stage config (configs/tomjerry_*.py).
    workdir: output directory; an existing one with checkpoints is resumed.
    loader: anything with `batch(step, rows) -> {"latents", "text"}` (rows: the global-batch
      rows this process's devices hold, int64 [R]; the arrays [R, ...]) and `null_text` [L, D],
      and optionally `iterate(start, num_steps, rows)` yielding (step, batch) (read ahead);
      default: a `LatentLoader` over config.data.latents.
    mesh: default: config.mesh (all devices on the data axis).
    on_step: called as on_step(step, total_steps, metrics) for each step when its metrics reach
      the host (every train.log_every steps; a progress bar).
    hooks: each called as hook(step) after each step and its checkpoint (the resume tests
      install their fault injection here).

  Raises:
    FloatingPointError: non-finite loss or gradient (names the step and the last good checkpoint).
    ValueError: bad config, dataset/config mismatch, hand-off mismatch, a checkpoint written for
      another model.
    cli.Preempted: SIGTERM (or a preemption sync point); the checkpoint of the step reached is
      saved.
  """
  workdir = checkpoint.as_path(workdir)
  before = {p.name for p in workdir.iterdir()} if workdir.is_dir() else None
  progress = {"resumed": False, "steps_done": 0}
  try:
    with cli.sigterm_received() as sigterm:
      return _train(config, workdir, loader, mesh, sigterm, progress, on_step, hooks)
  except cli.Preempted:
    raise
  except BaseException:
    if jax.process_index() == 0 and not progress["resumed"] and progress["steps_done"] == 0:
      _remove_run_files(workdir, before)
    raise


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, loader: Any,
           mesh: jax.sharding.Mesh | None, sigterm: list[int], progress: dict[str, Any],
           on_step, hooks) -> dict[str, Any]:
  """`train`'s body; records in `progress` whether it resumed and how many steps it finished."""
  workdir.mkdir(parents=True, exist_ok=True)
  if mesh is None:
    mesh = mesh_from_config(config)
  if loader is None:
    from ttt_jax.data.loader import LatentLoader  # pylint: disable=g-import-not-at-top
    if not config.data.latents:
      raise ValueError("config.data.latents is empty: point it at a `python -m "
                       "ttt_jax.data.precompute` output")
    loader = LatentLoader(config.data.latents, batch_size=config.train.batch_size,
                          seed=config.seed)
  setup = build_setup(config, mesh)
  writer = writers.metric_writers.create_default_writer(
      os.fspath(workdir), just_logging=jax.process_index() > 0)
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  log = contextlib.ExitStack()
  try:
    start = checkpoint.restore_or_init(
        mngr, setup.items(setup.abstract), lambda params: setup.init(config.seed, params),
        init_from=config.get("init_from"), new_ok=is_new_param)
    progress["resumed"] = start.resumed
    if not start.resumed:
      _record_start(config, workdir, writer, start.items["params"])
    write_jsonl = log.enter_context(writers.jsonl_log(workdir / "metrics.jsonl", start.step))
    metrics = writers.StepMetrics(write_jsonl, writer, config.train, mngr, progress, on_step)
    state = _loop(config, setup, loader, setup.state(start.items), start, mngr, writer, metrics,
                  sigterm, hooks)
    mngr.wait_until_finished()
    export_model(workdir / "model", setup.cfg, setup.items(state)["params"])
    writer.flush()
    return {"stage": config.stage, "step": int(config.train.steps), "workdir": str(workdir),
            "model": str(workdir / "model"), "last": metrics.last,
            "initialised_fresh": start.fresh, "skipped_checkpoints": start.skipped}
  finally:
    log.close()
    mngr.close()
    writer.close()


def _record_start(config: ml_collections.ConfigDict, workdir: epath.Path, writer: Any,
                  params: Any) -> None:
  """A fresh run's config.json, parameter overview and hyperparameters."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  # Statistics of arrays spread over hosts are computed on the devices ("global"), by every
  # process; the plain form fetches each whole array to the host.
  writers.parameter_overview.log_parameter_overview(
      params, jax_logging_process=0,
      include_stats="global" if jax.process_count() > 1 else True)
  t = config.train
  writer.write_hparams({"stage": config.stage, "steps": int(t.steps),
                        "batch_size": int(t.batch_size), "lr": float(t.lr),
                        "mixer_lr": float(t.mixer_lr)})


def _loop(config: ml_collections.ConfigDict, setup: Setup, loader: Any, state: nnx.State,
          start: checkpoint.Start, mngr, writer, metrics: writers.StepMetrics,
          sigterm: list[int], hooks: Sequence[Callable[[int], Any]]) -> nnx.State:
  """Steps start.step .. train.steps: the batch (read ahead), the step, its metrics, the
  periodic checkpoint, the hooks; a checkpoint and `cli.Preempted` on SIGTERM. Returns the
  final state."""
  train_cfg, total = config.train, int(config.train.steps)
  batch_sh, rows = batch_shardings(config, setup.mesh)
  step_fn = make_train_step(config, setup, loader.null_text, batch_sh)
  actions = writers.periodic_actions
  progress = [actions.ReportProgress(num_train_steps=total, writer=writer,
                                     every_steps=int(train_cfg.log_every))]
  if train_cfg.get("profile_steps", 0) and jax.process_index() == 0:
    workdir = checkpoint.as_path(mngr.directory).parent  # the manager's is workdir/checkpoints
    progress.append(actions.Profile(logdir=os.fspath(workdir),
                                    num_profile_steps=int(train_cfg.profile_steps)))
  multi_host = jax.process_count() > 1

  def save(done):
    metrics.flush()  # a step whose loss is not finite gets no checkpoint
    checkpoint.save_step(mngr, done, **setup.items(state), meta={
        "step": done, "stage": config.stage, "initialised_fresh": start.fresh})

  for step, local in _local_batches(loader, start.step, total, rows):
    if step == start.step:
      _check_batch_shapes(config, local, setup.cfg.patch_size)
    batch = to_global(local, step, int(train_cfg.batch_size), batch_sh, rows)
    state, step_metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
    done = step + 1
    metrics.add(done, step_metrics)
    for action in progress:
      action(done)
    saved = done % int(train_cfg.checkpoint_every) == 0 or done == total
    if saved:
      save(done)
    for hook in hooks:
      hook(done)
    if done < total and (sigterm or (multi_host and mngr.reached_preemption(done))):
      if not saved:
        save(done)
      mngr.wait_until_finished()
      writer.flush()
      raise cli.Preempted(done, str(epath.Path(mngr.directory) / str(done)),
                          "SIGTERM" if sigterm else "a preemption notice")
  metrics.flush()
  return state


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.distributed:  # multi-host (TPU pod, multi-node GPU): before any device use
    ids = flags.FLAGS.local_device_ids
    jax.distributed.initialize(local_device_ids=[int(i) for i in ids] if ids else None)
  if config.get("pipeline"):  # configs/toy.py: the whole toy job, not one stage
    from ttt_jax import toy_job  # pylint: disable=g-import-not-at-top
    toy_job.run(config, workdir)  # prints its own lines; the numbers are in summary.json
  else:
    print(json.dumps(train(config, workdir)))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]")
  flags.DEFINE_string("workdir", None, "output directory (resumed if it has checkpoints)")
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
  # Under SLURM, JAX gives each process the one GPU of its SLURM_LOCALID; a process per node
  # names all of them (launch/slurm.sh --tasks=node).
  flags.DEFINE_list("local_device_ids", None, "with --distributed: this process's local devices")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
