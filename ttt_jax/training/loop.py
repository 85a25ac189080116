"""One training stage's loop: start (resume, hand off or init), step, log, checkpoint, export;
`train(config, workdir)` (DIR below).

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
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ttt_jax import checkpoint, cli, writers
from ttt_jax.data import features
from ttt_jax.models.dit import DiTConfig
from ttt_jax.models.dit_convert import is_new_param
from ttt_jax.training.state import Setup, build_setup, mesh_from_config
from ttt_jax.training.step import batch_shardings, make_train_step, to_global


# ---------------------------------------------------------------------------- the model export

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

def _local_batches(loader: Any, start: int, stop: int, rows: np.ndarray
                   ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(step, this process's rows of its batch) for start <= step < stop: `loader.iterate` (which
  reads ahead in a background thread) when it has one, else `loader.batch` step by step."""
  if hasattr(loader, "iterate"):
    return loader.iterate(start, stop - start, rows)
  return ((step, loader.batch(step, rows)) for step in range(start, stop))


def _check_batch_shapes(config: ml_collections.ConfigDict, batch: dict[str, Any],
                        patch_size: int) -> None:
  """Refuses a dataset whose batch ({"latents": [R, F, C, h, w], "text": [R, segments, L, D]})
  does not fit the config's frames, channels, segments, text width or patch size."""
  c = config
  f = c.data.crop_frames or features.latent_frames(
      c.segments, c.fps, features.model_temporal_compression(c))
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
                          seed=config.seed, frames=config.data.crop_frames or None)
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
