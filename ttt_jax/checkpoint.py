"""Parameter checkpoints (Orbax): atomic save, restore with a clear missing/unexpected report,
one `save_model`/`load_model` for every model directory (params/ + config.json), and a
training start in one order of precedence (`restore_or_init`: resume, else hand-off, else init).

Orbax writes into a temporary directory and renames it on success, so a crash mid-save never
leaves a half-written checkpoint behind under the final name (the temporary directory is removed
when the CheckpointManager is next opened with cleanup_tmp_directories). A finished checkpoint can
still be damaged later (a disk fault, a truncated copy): `restore_newest` then uses the newest
step that restores and moves the broken ones aside.

Paths are `etils.epath` paths: a `gs://` bucket works wherever a local path does. On many
processes, a write that takes global (sharded) arrays runs on every process, each writing its own
shards (`save_params`, the CheckpointManager); small files are written by process 0 alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils


def _flat_keys(tree: Any) -> set[str]:
  return {jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metadata_tree(ckptr: ocp.StandardCheckpointer, directory: str) -> Any:
  # Orbax versions differ in where the tree sits: metadata, .item_metadata, .item_metadata.tree.
  stored = ckptr.metadata(directory)
  stored = getattr(stored, "item_metadata", stored)
  return getattr(stored, "tree", stored)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an absolute epath.Path: a local path made absolute (Orbax needs that), a URL
  (gs://...) as it is."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def read_json(path: str | os.PathLike) -> Any:
  """A checkpoint's JSON file (config.json); ValueError naming the file when it is not JSON."""
  try:
    return json.loads(as_path(path).read_text())
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from e


def load_run_config(run_dir: str | os.PathLike) -> Any:
  """The stage config (an ml_collections.ConfigDict) that `python -m ttt_jax.train` saved in
  RUN_DIR/config.json, model paths included: what sampling and evaluating a run start from."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = as_path(os.path.expanduser(str(run_dir))) / "config.json"
  if not path.is_file():
    raise ValueError(f"{run_dir}: no {path} (expected the workdir of a python -m ttt_jax.train "
                     "run)")
  saved = read_json(path)
  if not isinstance(saved, dict) or "model" not in saved:
    raise ValueError(f"{path} holds no stage config (no 'model' field)")
  return ml_collections.ConfigDict(saved)


def stored_shapes(directory: str | os.PathLike) -> Any:
  """The stored pytree's structure without reading it: nested dicts of leaves with .shape and
  .dtype."""
  with ocp.StandardCheckpointer() as ckptr:
    return _metadata_tree(ckptr, as_path(directory))


def save_params(directory: str | os.PathLike, params: Any) -> None:
  """Writes a pytree of arrays to `directory` (must not exist yet), atomically. On many
  processes every process calls it with the same global arrays; each writes its shards."""
  directory = as_path(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, params)
    ckptr.wait_until_finished()


def load_params(directory: str | os.PathLike, target: Any | None = None) -> Any:
  """Reads a pytree written by `save_params`.

  Args:
    directory: checkpoint directory.
    target: optional pytree of arrays or jax.ShapeDtypeStruct giving the expected structure,
      shapes and dtypes (and shardings, for sharded restores).

  Raises:
    ValueError: listing every expected key the checkpoint lacks, every key it has that the
      target does not expect, and every shape mismatch (`check_tree`).
  """
  directory = as_path(directory)
  # Leaves without a sharding of their own go to this process's first device, not to the
  # shardings stored with the checkpoint: those name the devices of the run that wrote it (a
  # model exported by a many-host run is read on one host).
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    stored = _metadata_tree(ckptr, directory)
    if target is None:
      target = stored
    check_tree(stored, target, f"checkpoint {directory} does not match the model")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
        else jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=local), target)
    return ckptr.restore(directory, abstract)


def str_keys(tree: Any) -> Any:
  """Nested dicts with every key a string: nnx pure dicts index layers by int, Orbax restores
  every key as a string."""
  if not isinstance(tree, Mapping):
    return tree
  return {str(k): str_keys(v) for k, v in tree.items()}


def params_of(model: Any) -> dict[str, Any]:
  """The nnx.Param arrays of a module as nested dicts with string keys (what `save_model`
  writes)."""
  return str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _config_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save_model(directory: str | os.PathLike, config: Any, params: Any = None) -> None:
  """Writes a model directory: `directory/params` (Orbax; must not exist yet) and
  `directory/config.json`: what `load_model` reads.

  Args:
    directory: created if needed.
    config: a dataclass (or dict) of the model's config; written sorted, indent 2.
    params: an nnx.Module (its nnx.Param arrays), a pytree of arrays, or None for a
      parameter-free model (only config.json is written).

  On many processes every process calls it with the same global arrays (each writes its
  shards); config.json, written after the parameters, comes from process 0, so a directory cut
  short has none and the loaders (load_dit, load_t5, load_converted_vae: they read it first)
  refuse it.
  """
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if params is not None:
    save_params(directory / "params", params_of(params) if isinstance(params, nnx.Module)
                else params)
  if jax.process_index() == 0:
    (directory / "config.json").write_text(
        json.dumps(_config_dict(config), indent=2, sort_keys=True))


def load_model(directory: str | os.PathLike, build: Callable[[], nnx.Module]) -> nnx.Module:
  """The module `build()` makes (traced only: nothing is initialised) holding the parameters of
  `directory/params` (written by `save_model`); its other variables keep their traced values.

  Raises:
    ValueError: the stored parameters do not fit the module (`check_tree`).
  """
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  params.replace_by_pure_dict(load_params(as_path(directory) / "params",
                                          str_keys(nnx.to_pure_dict(params))))
  return nnx.merge(graphdef, params, rest)


# ---------------------------------------------------------------------------- resume

def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/0/c' -> shape for every array leaf (Orbax metadata, arrays or ShapeDtypeStructs)."""
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


def _listed(items: list[str], limit: int = 8) -> str:
  return str(items[:limit])[:-1] + (f", ... {len(items) - limit} more]" if len(items) > limit
                                    else "]")


def tree_mismatch(stored: Any, expected: Any,
                  allow_missing: Callable[[tuple[str, ...]], bool] | None = None) -> list[str]:
  """What differs between a stored tree (Orbax metadata, arrays) and the expected one: one line
  each for missing leaves (but those `allow_missing(path)` accepts), unexpected leaves and shape
  mismatches, paths written 'a/b/c'; [] when they agree."""
  have, want = _shapes(stored), _shapes(expected)
  missing = sorted(k for k in set(want) - set(have)
                   if allow_missing is None or not allow_missing(tuple(k.split("/"))))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(f"{k}: {have[k]} stored, {want[k]} expected" for k in set(have) & set(want)
                  if have[k] != want[k])
  return ([f"missing parameters: {_listed(missing)}"] if missing else []) + (
      [f"unexpected parameters: {_listed(unexpected)}"] if unexpected else []) + (
      [f"shape mismatches: {_listed(shapes)}"] if shapes else [])


def check_tree(stored: Any, expected: Any, what: str, *,
               allow_missing: Callable[[tuple[str, ...]], bool] | None = None,
               also: list[str] | None = None) -> None:
  """The one parameter-tree check (checkpoints, hand-offs, converted weights): ValueError
  '`what`:' followed by `tree_mismatch`'s lines (and the caller's `also` lines) when any."""
  problems = (also or []) + tree_mismatch(stored, expected, allow_missing)
  if problems:
    raise ValueError(f"{what}:\n  " + "\n  ".join(problems))


def _move_aside(step_dir: epath.Path, aside_dir: epath.Path) -> str:
  aside_dir.mkdir(parents=True, exist_ok=True)
  name, n = step_dir.name, 1
  target = aside_dir / name
  while target.exists():  # broken twice at the same step: keep both
    target, n = aside_dir / f"{name}.{n}", n + 1
  step_dir.rename(target)
  return str(target)


class _Mismatch(Exception):
  """A step that reads but does not fit the config (not a damaged one)."""


def restore_newest(mngr: ocp.CheckpointManager, args: ocp.args.Composite,
                   expected: Mapping[str, Any], aside_dir: str | os.PathLike
                   ) -> tuple[int | None, Any, list[str]]:
  """Restores the newest step of `mngr` that restores; steps that do not are moved to
  `aside_dir` (kept, not deleted) and reported.

  Args:
    mngr: the training run's CheckpointManager.
    args: what to restore (a Composite of the items).
    expected: item name -> the tree the run expects (arrays or ShapeDtypeStructs); checked
      against each step's stored metadata before reading.
    aside_dir: where broken steps go.

  Returns:
    (step, restored items, one line per step skipped); (None, None, skipped) when no step
    restores or there is none.

  Raises:
    ValueError: a step whose metadata reads but whose trees differ from `expected` (a changed
      model or trainable groups): the run must not fall back past it, nor move it.
  """
  skipped = []
  aside_dir = as_path(aside_dir)
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = epath.Path(mngr.directory) / str(step)
    try:
      for name, tree in expected.items():
        # Read directly: the manager knows its items' handlers only after a save or restore.
        stored = ocp.StandardCheckpointHandler().metadata(step_dir / name)
        stored = getattr(stored, "tree", stored)
        if not _shapes(stored):
          raise ValueError(f"{name}: its metadata lists no arrays")
        problems = tree_mismatch(stored, tree)
        if problems:
          raise _Mismatch(
              f"checkpoint step {step} in {mngr.directory} was written for another model or "
              f"other trainable groups than this config ({name}: {'; '.join(problems)}); "
              "resume with the config the run started with (config.json in the workdir) or "
              "train into a new --workdir")
      return step, mngr.restore(step, args=args), skipped
    except _Mismatch as e:
      raise ValueError(str(e)) from None
    except PermissionError:  # the checkpoint may be whole; the user must fix the access
      raise
    except (ValueError, OSError) as e:  # TensorStore, JSON and file errors: a damaged step
      reason = " ".join(str(e).split())[:300]
      moved = str(aside_dir / str(step))
      if jax.process_index() == 0:  # one host moves it; the others wait
        moved = _move_aside(step_dir, aside_dir)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
      skipped.append(f"checkpoint step {step} does not restore ({type(e).__name__}: {reason}); "
                     f"moved to {moved}")
      logging.warning("%s", skipped[-1])
      mngr.reload()
  return None, None, skipped


# ---------------------------------------------------------------------------- restore or init

def manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
  """A training run's CheckpointManager: `workdir/checkpoints/<step>/{params,opt_state,meta}`,
  the newest `keep` kept, temporary directories of an interrupted save removed."""
  options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(as_path(workdir) / "checkpoints", options=options,
                               item_names=("params", "opt_state", "meta"))


def save_step(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
              meta: dict[str, Any]) -> None:
  """Saves one training step (pure dicts of global arrays; called on every process)."""
  mngr.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)))


def params_dir(source: str | os.PathLike) -> epath.Path:
  """The parameter checkpoint of a previous stage's workdir (its newest finished step) or of a
  model directory (model/params or params, + config.json)."""
  source = as_path(source)
  ckpts = source / "checkpoints"
  if ckpts.is_dir():
    step = finished_step(source)
    if step is None:
      raise ValueError(f"config.init_from={source}: {ckpts} holds no finished checkpoint")
    return ckpts / str(step) / "params"
  for sub in ("model/params", "params"):
    if (source / sub).is_dir():
      return source / sub
  raise ValueError(f"config.init_from={source}: neither a training workdir (checkpoints/) nor a "
                   "model directory (params/ + config.json)")


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return {tuple(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def load_handoff(source: str | os.PathLike, abstract: Any,
                 new_ok: Callable[[tuple[str, ...]], bool]) -> tuple[dict[str, Any], list[str]]:
  """Parameters of a previous stage (`params_dir(source)`) restored onto `abstract` (nested
  dicts of jax.ShapeDtypeStruct with shardings). Returns (the stored parameters as nested dicts,
  'a/b/c' names of those the source lacks, which `new_ok` allowed: to be initialised fresh).

  Raises:
    ValueError: missing parameters `new_ok` does not allow, unexpected ones, shape mismatches.
  """
  directory = params_dir(source)
  stored = _flat(stored_shapes(directory))
  check_tree(_nested(stored), abstract,
             f"config.init_from: {directory} does not fit this stage's model",
             allow_missing=new_ok)
  want = _flat(abstract)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(directory, _nested({p: want[p] for p in stored}))
  return restored, ["/".join(p) for p in want if p not in stored]


@dataclasses.dataclass
class Start:
  """Where a training run starts: `step` 0 unless resumed; `items` {"params", "opt_state"}
  (nested dicts of global arrays); `fresh` the parameter names the run's hand-off initialised,
  also when it resumes; `skipped` one line per damaged checkpoint moved aside."""
  step: int
  items: dict[str, Any]
  resumed: bool
  fresh: list[str]
  skipped: list[str]


def restore_or_init(mngr: ocp.CheckpointManager, abstract: Mapping[str, Any],
                    init: Callable[[Any | None], dict[str, Any]], *,
                    init_from: str | None = None,
                    new_ok: Callable[[tuple[str, ...]], bool] = lambda path: False) -> Start:
  """maxtext's order of precedence: resume the newest checkpoint of `mngr` that restores, else
  load the parameters of `init_from` (a hand-off: parameters only), else initialise.

  Args:
    mngr: the run's CheckpointManager (`manager`).
    abstract: {"params", "opt_state"}: nested dicts of jax.ShapeDtypeStruct with shardings.
    init: init(None | stored params) -> {"params", "opt_state"}: a fresh optimizer state, the
      parameters the stored ones do not give initialised.
    init_from: a previous stage's workdir or a model directory (`params_dir`); None: init.
    new_ok: which parameters a hand-off source may lack.
  """
  step, restored, skipped = restore_newest(
      mngr, ocp.args.Composite(params=ocp.args.StandardRestore(abstract["params"]),
                               opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
                               meta=ocp.args.JsonRestore()),
      expected={"params": abstract["params"], "opt_state": abstract["opt_state"]},
      aside_dir=as_path(mngr.directory).parent / "checkpoints_broken")
  if step is not None:
    logging.info("resumed from step %d of %s", step, mngr.directory)
    items = {"params": restored["params"], "opt_state": restored["opt_state"]}
    # What the run's hand-off initialised stays its answer when it resumes (the meta keeps it).
    fresh = list((restored["meta"] or {}).get("initialised_fresh", []))
    return Start(step, items, True, fresh, skipped)
  if skipped:  # every checkpoint was damaged: start over rather than stop, and say so
    logging.warning("no checkpoint of %s restores; starting from step 0", mngr.directory)
  if not init_from:
    return Start(0, init(None), False, [], skipped)
  params, fresh = load_handoff(init_from, abstract["params"], new_ok)
  logging.info("stage hand-off from %s; initialised fresh: %s", init_from, fresh)
  return Start(0, init(params), False, fresh, skipped)


def finished_step(workdir: str | os.PathLike) -> int | None:
  """The step of a training workdir's newest finished checkpoint (Orbax's own record of which
  steps finished, read without restoring), None when it has none."""
  directory = as_path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(directory) as mngr:
    return mngr.latest_step()


def stage_finished(workdir: str | os.PathLike) -> bool:
  """Whether a training workdir holds a finished stage: its newest checkpoint is at the
  train.steps of the config.json the run wrote, and its model/ export is complete (config.json is
  written last)."""
  workdir = as_path(workdir)
  if not (workdir / "config.json").exists() or not (workdir / "model" / "config.json").exists():
    return False
  steps = read_json(workdir / "config.json")["train"]["steps"]
  return finished_step(workdir) == int(steps)


if __name__ == "__main__":
  # launch/stages.sh: `python -m ttt_jax.checkpoint WORKDIR` exits 0 when the stage is finished.
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 2:
    sys.exit("usage: python -m ttt_jax.checkpoint WORKDIR  (exit 0: the stage is finished)")
  sys.exit(0 if stage_finished(sys.argv[1]) else 1)
