"""Staged fine-tuning of the video DiT on precomputed latents.

  python -m ttt_jax.train --config=configs/tomjerry_3s.py[:runlocal] --workdir=DIR \
      [--config.data.latents=LATENTS_DIR] [--config.init_from=PREVIOUS_WORKDIR]
  python -m ttt_jax.train --config=configs/toy.py --workdir=DIR   # the whole toy pipeline

Reads a dataset written by `python -m ttt_jax.data.precompute` (`config.data.latents`) with the
deterministic loader (batch k depends only on the seed and k), and trains with the paper's recipe
(../shared/PAPER.md, "Staged context extension"): v-prediction loss, 10% text dropout, AdamW with
per-group learning rates (TTT/mixer and gates faster than the rest in stage 1) and frozen groups in
later stages, global-norm clipping, bf16 compute with fp32 parameters and optimizer state.

What lands in DIR:
  checkpoints/<step>/{params,opt_state,meta}  Orbax CheckpointManager: periodic + final, keep-N.
      Restarting with the same DIR resumes exactly (same data order, same noise, same losses).
  model/{params,config.json}  the final DiT, loadable by `load_dit` (sampling, next stage).
  metrics.jsonl               one line per step: step, loss, grad_norm, lr.
  events.out.tfevents.*       TensorBoard (clu writers).

Stage hand-off: `config.init_from` names the previous stage's workdir (or a converted CogVideoX
directory with params/ + config.json). Parameters only are loaded; mixer and gate parameters the
source lacks are initialised fresh; any other missing parameter, an unexpected one or a shape
mismatch stops with the full list. The optimizer starts fresh.

A NaN or inf loss or gradient stops the run with the step number; the last good checkpoint stays.

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
import signal
import threading
import zlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ttt_jax import checkpoint, cli, diffusion
from ttt_jax.data.loader import process_rows
from ttt_jax.models.dit import DiT, DiTConfig
from ttt_jax.models.dit_convert import is_new_param, save_dit
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


def _labels(flat: dict[Path, Any], train: ml_collections.ConfigDict) -> dict[Path, str]:
  """Optimizer label per parameter: 'fast' (mixer_lr), 'slow' (lr) or 'frozen'."""
  trainable = tuple(train.trainable)
  unknown = set(trainable) - set(GROUPS) - {"all"}
  if unknown:
    raise ValueError(f"config.train.trainable has unknown group(s) {sorted(unknown)}; groups: "
                     f"{GROUPS} or 'all'")
  labels = {}
  for path in flat:
    group = group_of(path)
    if "all" not in trainable and group not in trainable:
      labels[path] = "frozen"
    else:
      labels[path] = "fast" if group in ("mixer", "gates") else "slow"
  if all(v == "frozen" for v in labels.values()):
    raise ValueError(f"config.train.trainable={trainable} selects no parameter of this model")
  return labels


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


def make_optimizer(train: ml_collections.ConfigDict, trainable_paths: Iterable[Path],
                   labels: dict[Path, str]) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW per label group, over the trainable parameters only."""
  trainable_paths = list(trainable_paths)

  def adamw(peak):
    decay_mask = lambda tree: traverse_util.unflatten_dict(
        {p: p[-1] in _DECAYED for p in traverse_util.flatten_dict(tree)})
    return optax.adamw(schedule_fn(train, peak), b1=train.adam_b1, b2=train.adam_b2,
                       weight_decay=train.weight_decay, mask=decay_mask)

  label_tree = traverse_util.unflatten_dict({p: labels[p] for p in trainable_paths})
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.multi_transform({"fast": adamw(train.mixer_lr), "slow": adamw(train.lr)},
                            label_tree))


# ---------------------------------------------------------------------------- model and state

def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
  return DiTConfig.from_dict(config.model.to_dict())


@dataclasses.dataclass
class Setup:
  """Everything the loop needs that does not change per step."""
  cfg: DiTConfig
  graphdef: Any
  rest: Any                       # non-parameter state of the model (empty for the DiT)
  abstract: dict[Path, jax.ShapeDtypeStruct]  # every parameter, flat
  shardings: dict[Path, NamedSharding]
  labels: dict[Path, str]
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh

  def split(self, flat: dict[Path, Any]) -> tuple[dict, dict]:
    """Flat params -> (trainable nested dict, frozen nested dict)."""
    tr = {p: v for p, v in flat.items() if self.labels[p] != "frozen"}
    fr = {p: v for p, v in flat.items() if self.labels[p] == "frozen"}
    return traverse_util.unflatten_dict(tr), traverse_util.unflatten_dict(fr) if fr else {}


def build_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  cfg = dit_config(config)
  abstract_model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  shard_state = mesh_lib.state_shardings(params, mesh, _rules(config))
  abstract = traverse_util.flatten_dict(params.to_pure_dict())
  shardings = traverse_util.flatten_dict(shard_state.to_pure_dict())
  labels = _labels(abstract, config.train)
  # Printed so that a baseline's size can be compared with TTT-MLP's (configs/mixers.py).
  mixer_params = sum(int(np.prod(a.shape)) for p, a in abstract.items() if group_of(p) == "mixer")
  logging.info("mixer %s: %d parameters, %d a layer", cfg.mixer, mixer_params,
               mixer_params // cfg.num_layers)
  trainable = [p for p in abstract if labels[p] != "frozen"]
  tx = make_optimizer(config.train, trainable, labels)
  return Setup(cfg, graphdef, rest, abstract, shardings, labels, tx, mesh)


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """config.mesh (data x fsdp x context x tensor; default: all devices on data) over devices."""
  m = config.get("mesh", ml_collections.ConfigDict())
  return mesh_lib.make_mesh(m.get("data", -1), m.get("fsdp", 1), m.get("context", 1),
                            m.get("tensor", 1), devices=devices)


def _rules(config):
  rules = config.get("mesh_rules")
  return tuple(tuple(r) for r in rules) if rules else mesh_lib.DEFAULT_RULES


def init_params(setup: Setup, seed: int, paths: list[Path] | None = None
                ) -> dict[Path, jax.Array]:
  """Fresh parameters (all, or only `paths`: XLA drops the init of the others), created
  sharded (no full copy on one device)."""
  paths = list(setup.abstract) if paths is None else paths

  def init():
    model = DiT(setup.cfg, rngs=nnx.Rngs(seed))
    flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    return [flat[p] for p in paths]

  out = jax.jit(init, out_shardings=[setup.shardings[p] for p in paths])()
  return dict(zip(paths, out))


def opt_shardings(setup: Setup, opt_abstract: Any) -> Any:
  """Optimizer-state shardings: each per-parameter leaf like its parameter, the rest replicated."""
  trainable, _ = setup.split({p: setup.shardings[p] for p in setup.abstract})
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  masked = optax.transforms.MaskedNode
  return optax.tree_map_params(
      setup.tx, lambda leaf, s: leaf if isinstance(leaf, masked) else s, opt_abstract, trainable,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))


# ---------------------------------------------------------------------------- the train step

def make_train_step(config: ml_collections.ConfigDict, setup: Setup, null_text: np.ndarray,
                    batch_shardings: dict[str, NamedSharding], opt_sh: Any):
  """jit-compiled (params_trainable, params_frozen, opt_state, batch, step) -> (..., metrics)."""
  schedule = diffusion.make_schedule(**config.diffusion)
  train = config.train
  null = jnp.asarray(null_text, jnp.float32)
  weighting = train.get("loss_weighting", "snr_plus_one")

  def loss_fn(trainable, frozen, batch, rng):
    model = nnx.merge(setup.graphdef, _merge(trainable, frozen), setup.rest, copy=True)
    x0, text = batch["latents"], batch["text"]
    t_rng, n_rng, d_rng = jax.random.split(rng, 3)
    t = diffusion.sample_timesteps(t_rng, x0.shape[0], schedule)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    # Text dropout for classifier-free guidance: the whole example's texts become the null text.
    drop = jax.random.uniform(d_rng, (x0.shape[0],)) < train.text_dropout
    text = jnp.where(drop[:, None, None, None], null[None, None].astype(text.dtype), text)
    # The activation constraints are live while the step traces (ttt_jax/parallel/mesh.py).
    with mesh_lib.activation_rules(setup.mesh, _rules(config)):
      v_pred = model(diffusion.add_noise(schedule, x0, noise, t), text, t)
    return diffusion.v_prediction_loss(schedule, v_pred.astype(jnp.float32), x0, noise, t,
                                       weighting=weighting)

  # Per stage: stages that resume one another must not replay the same noise and timesteps.
  stage_key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(config.stage.encode()))
  lr_fast = schedule_fn(train, train.mixer_lr)
  lr_slow = schedule_fn(train, train.lr)

  def step_fn(trainable, frozen, opt_state, batch, step):
    rng = jax.random.fold_in(stage_key, step)
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = setup.tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_slow(step),
               "lr_mixer": lr_fast(step)}
    return trainable, opt_state, metrics

  tr_sh, fr_sh = setup.split({p: setup.shardings[p] for p in setup.abstract})
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(
      step_fn,
      in_shardings=(tr_sh, fr_sh, opt_sh, batch_shardings, replicated),
      out_shardings=(tr_sh, opt_sh, replicated),
      donate_argnums=(0, 2))


# ---------------------------------------------------------------------------- checkpoints

def _checkpoint_manager(workdir: epath.Path, train: ml_collections.ConfigDict
                        ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(train.keep_checkpoints), create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                               item_names=("params", "opt_state", "meta"))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _stored_params_dir(source: str) -> epath.Path:
  """The parameter checkpoint of a previous stage's workdir or of a converted model dir."""
  source = checkpoint.as_path(source)
  ckpts = source / "checkpoints"
  if ckpts.is_dir():
    step = checkpoint.finished_step(source)
    if step is None:
      raise ValueError(f"config.init_from={source}: {ckpts} holds no finished checkpoint")
    return ckpts / str(step) / "params"
  for sub in ("model/params", "params"):
    if (source / sub).is_dir():
      return source / sub
  raise ValueError(f"config.init_from={source}: neither a training workdir (checkpoints/) nor a "
                   "model directory (params/ + config.json)")


def load_handoff(setup: Setup, source: str, seed: int) -> tuple[dict[Path, jax.Array], list[str]]:
  """Parameters from a previous stage; returns (flat params, names initialised fresh)."""
  directory = _stored_params_dir(source)
  stored = traverse_util.flatten_dict(checkpoint.stored_shapes(directory))
  with ocp.StandardCheckpointer() as ckptr:
    missing = sorted("/".join(p) for p in setup.abstract
                     if p not in stored and not is_new_param(p))
    unexpected = sorted("/".join(p) for p in stored if p not in setup.abstract)
    mismatched = sorted(f"{'/'.join(p)}: {tuple(stored[p].shape)} stored, "
                        f"{tuple(setup.abstract[p].shape)} expected"
                        for p in stored if p in setup.abstract
                        and tuple(stored[p].shape) != tuple(setup.abstract[p].shape))
    if missing or unexpected or mismatched:
      raise ValueError(
          f"config.init_from: {directory} does not fit this stage's model:\n"
          f"  missing parameters: {missing}\n  unexpected parameters: {unexpected}\n"
          f"  shape mismatches: {mismatched}")
    target = traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(setup.abstract[p].shape, setup.abstract[p].dtype,
                                sharding=setup.shardings[p]) for p in stored})
    restored = traverse_util.flatten_dict(ckptr.restore(directory, target))
  fresh = [p for p in setup.abstract if p not in restored]
  if fresh:
    restored.update(init_params(setup, seed, fresh))
  return {p: restored[p] for p in setup.abstract}, ["/".join(p) for p in fresh]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def export_model(directory: str | os.PathLike, cfg: DiTConfig,
                 params: dict[Path, jax.Array]) -> None:
  """Writes `directory/params` + `config.json` (what `load_dit` reads), replacing a previous one.
  Called on every process with the same global arrays: Orbax writes each process's shards and
  commits the checkpoint once. config.json is written last, by process 0, so an export cut short
  has none and `load_dit` (and `launch/stages.sh`) refuse it. No directory rename: a gs://
  "directory" cannot be renamed atomically."""
  directory = checkpoint.as_path(directory)
  if jax.process_index() == 0 and directory.exists():
    directory.rmtree()
  _barrier(f"export {directory}: old removed")
  save_dit(directory, cfg, traverse_util.unflatten_dict(params))
  _barrier(f"export {directory}: written")


# ---------------------------------------------------------------------------- the loop

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


def global_batch(loader: Any, step: int, batch_size: int, shardings: dict[str, NamedSharding],
                 rows: np.ndarray, check: Callable[[dict], None] | None = None
                 ) -> dict[str, jax.Array]:
  """The global batch at `step` built from this process's `rows` of it
  (`loader.batch(step, rows)`): {"latents": [B, F, C, h, w], "text": [B, segments, L, D]} jax
  Arrays with `shardings`, B = batch_size. `check(local)` sees the rows read, first."""
  local = loader.batch(step, rows)
  if check is not None:
    check(local)
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


def _check_batch_shapes(config, batch, patch_size: int):
  c = config
  f = 1 + 12 * c.segments
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


@contextlib.contextmanager
def _jsonl_log(path: epath.Path, first_step: int):
  """Yields write(record) appending one JSON line per step to `path`, from process 0 only (the
  others get a no-op: one writer, no race on shared storage). Lines of earlier runs are kept up
  to step `first_step` (the restored checkpoint; 0: none), dropping those the checkpoint had not
  reached and a last line a hard kill cut short. The file is rewritten once and then held open:
  gs:// objects cannot be appended to (there, lines reach the bucket when the upload buffer
  fills and when the run ends)."""
  if jax.process_index() > 0:
    yield lambda record: None
    return

  def keep(line):
    try:
      return json.loads(line)["step"] <= first_step
    except (ValueError, KeyError, TypeError):
      return False

  kept = ([l + "\n" for l in path.read_text().splitlines() if l.strip() and keep(l)]
          if first_step and path.exists() else [])
  with path.open("w") as f:
    f.writelines(kept)
    f.flush()

    def write(record):
      f.write(json.dumps(record) + "\n")
      f.flush()

    yield write


@contextlib.contextmanager
def _sigterm_received():
  """Yields a list that gets the signal number when SIGTERM arrives (the loop checks it after
  each step). Not installed on multi-host runs, where JAX's preemption service owns SIGTERM and
  `reached_preemption` tells every host the same step, nor off the main thread."""
  received: list[int] = []
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


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
          on_step: Callable[[int, int, dict[str, float]], None] | None = None
          ) -> dict[str, Any]:
  """Runs (or resumes) one stage. Returns a summary dict (final step, last loss, paths).

  Args:
    config: a stage config (configs/tomjerry_*.py).
    workdir: output directory; an existing one with checkpoints is resumed.
    loader: anything with `batch(step, rows) -> {"latents", "text"}` (rows: the global-batch
      rows this process's devices hold, int64 [R]; the arrays [R, ...]) and `null_text` [L, D];
      default: a `LatentLoader` over config.data.latents.
    mesh: default: config.mesh (all devices on the data axis).
    on_step: called as on_step(step, total_steps, metrics) after each step (a progress bar).

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
    with _sigterm_received() as sigterm:
      return _train(config, workdir, loader, mesh, sigterm, progress, on_step)
  except cli.Preempted:
    raise
  except BaseException:
    if jax.process_index() == 0 and not progress["resumed"] and progress["steps_done"] == 0:
      _remove_run_files(workdir, before)
    raise


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, loader: Any,
           mesh: jax.sharding.Mesh | None, sigterm: list[int],
           progress: dict[str, Any], on_step=None) -> dict[str, Any]:
  """`train`'s body; records in `progress` whether it resumed and how many steps it finished."""
  workdir.mkdir(parents=True, exist_ok=True)
  train_cfg = config.train
  if mesh is None:
    mesh = mesh_from_config(config)
  if loader is None:
    from ttt_jax.data.loader import LatentLoader  # pylint: disable=g-import-not-at-top
    if not config.data.latents:
      raise ValueError("config.data.latents is empty: point it at a `python -m "
                       "ttt_jax.data.precompute` output")
    loader = LatentLoader(config.data.latents, batch_size=train_cfg.batch_size, seed=config.seed)

  setup = build_setup(config, mesh)
  batch_sh, rows = batch_shardings(config, mesh)
  total_batch = int(train_cfg.batch_size)

  tr_abs, _ = setup.split(setup.abstract)
  opt_abs = jax.eval_shape(setup.tx.init, tr_abs)
  opt_sh = opt_shardings(setup, opt_abs)
  step_fn = make_train_step(config, setup, loader.null_text, batch_sh, opt_sh)

  from ttt_jax.writers import metric_writers, parameter_overview, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(os.fspath(workdir),
                                                just_logging=jax.process_index() > 0)
  mngr = _checkpoint_manager(workdir, train_cfg)
  log = contextlib.ExitStack()
  try:
    params_abs = traverse_util.unflatten_dict(setup.abstract)
    start, restored, skipped = checkpoint.restore_newest(
        mngr, ocp.args.Composite(
            params=ocp.args.StandardRestore(_with_shardings(
                params_abs, traverse_util.unflatten_dict(setup.shardings))),
            opt_state=ocp.args.StandardRestore(_with_shardings(opt_abs, opt_sh)),
            meta=ocp.args.JsonRestore()),
        expected={"params": params_abs, "opt_state": opt_abs},
        aside_dir=workdir / "checkpoints_broken")
    if start is not None:
      progress["resumed"] = True
      params = traverse_util.flatten_dict(restored["params"])
      opt_state = restored["opt_state"]
      logging.info("resumed from step %d of %s", start, mngr.directory)
      fresh = []
    else:
      if skipped:  # every checkpoint was damaged: start over rather than stop, and say so
        logging.warning("no checkpoint of %s restores; starting from step 0", mngr.directory)
      start = 0
      if config.get("init_from"):
        params, fresh = load_handoff(setup, config.init_from, config.seed)
        logging.info("stage hand-off from %s; initialised fresh: %s", config.init_from, fresh)
      else:
        params, fresh = init_params(setup, config.seed), []
      trainable, _ = setup.split(params)
      opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(trainable)
      if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
      # Statistics of arrays spread over hosts are computed on the devices ("global"), by every
      # process; the plain form fetches each whole array to the host.
      parameter_overview.log_parameter_overview(
          traverse_util.unflatten_dict(params), jax_logging_process=0,
          include_stats="global" if jax.process_count() > 1 else True)
      writer.write_hparams({"stage": config.stage, "steps": int(train_cfg.steps),
                            "batch_size": int(train_cfg.batch_size), "lr": float(train_cfg.lr),
                            "mixer_lr": float(train_cfg.mixer_lr)})

    write_jsonl = log.enter_context(_jsonl_log(workdir / "metrics.jsonl", start))
    trainable, frozen = setup.split(params)
    del params
    total = int(train_cfg.steps)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=int(train_cfg.log_every))]
    if train_cfg.get("profile_steps", 0) and jax.process_index() == 0:
      hooks.append(periodic_actions.Profile(logdir=os.fspath(workdir),
                                            num_profile_steps=int(train_cfg.profile_steps)))
    # Fault injection for the resume tests: send this process a signal after a step.
    kill_at = int(os.environ.get("TTT_JAX_FAULT_KILL_AT_STEP", "0"))
    kill_with = getattr(signal, os.environ.get("TTT_JAX_FAULT_SIGNAL", "SIGKILL"))
    multi_host = jax.process_count() > 1

    def save(done):
      mngr.save(done, force=True, args=ocp.args.Composite(
          params=ocp.args.StandardSave(_merge(trainable, frozen)),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave({"step": done, "stage": config.stage,
                                  "initialised_fresh": fresh})))

    last = {}
    for step in range(start, total):
      batch = global_batch(loader, step, total_batch, batch_sh, rows,
                           check=(lambda local: _check_batch_shapes(
                               config, local, setup.cfg.patch_size)) if step == start else None)
      trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch,
                                              jnp.asarray(step, jnp.int32))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      done = step + 1
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        mngr.wait_until_finished()
        good = mngr.latest_step()
        raise FloatingPointError(
            f"step {done}: non-finite loss {metrics['loss']} or gradient norm "
            f"{metrics['grad_norm']}; stopped. Last good checkpoint: "
            f"{'none' if good is None else f'step {good}'} in {mngr.directory}")
      last = {"step": done, **metrics}
      progress["steps_done"] += 1
      write_jsonl(last)
      if done % int(train_cfg.log_every) == 0 or done == total:
        writer.write_scalars(done, metrics)
      for hook in hooks:
        hook(done)
      if on_step is not None:
        on_step(done, total, metrics)
      saved = done % int(train_cfg.checkpoint_every) == 0 or done == total
      if saved:
        save(done)
      if kill_at and done == kill_at:
        os.kill(os.getpid(), kill_with)
      if done < total and (sigterm or (multi_host and mngr.reached_preemption(done))):
        if not saved:
          save(done)
        mngr.wait_until_finished()
        writer.flush()
        raise cli.Preempted(done, str(epath.Path(mngr.directory) / str(done)),
                            "SIGTERM" if sigterm else "a preemption notice")
    mngr.wait_until_finished()
    export_model(workdir / "model", setup.cfg, traverse_util.flatten_dict(
        _merge(trainable, frozen)))
    writer.flush()
    return {"stage": config.stage, "step": total, "workdir": str(workdir),
            "model": str(workdir / "model"), "last": last, "initialised_fresh": fresh,
            "skipped_checkpoints": skipped}
  finally:
    log.close()
    mngr.close()
    writer.close()


def _merge(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(trainable)
  if frozen:
    flat.update(traverse_util.flatten_dict(frozen))
  return traverse_util.unflatten_dict(flat)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.distributed:  # multi-host (TPU pod, multi-node GPU): before any device use
    ids = flags.FLAGS.local_device_ids
    jax.distributed.initialize(local_device_ids=[int(i) for i in ids] if ids else None)
  if config.get("pipeline"):  # configs/toy.py: the whole pipeline, not one stage
    from ttt_jax import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.run(config, workdir)  # prints its own lines; the numbers are in summary.json
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
