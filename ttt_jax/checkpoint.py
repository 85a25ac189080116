"""Parameter checkpoints (Orbax): atomic save, restore with a clear missing/unexpected report,
and a training resume that falls back past a broken step.

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

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
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
    ValueError: listing every expected key the checkpoint lacks and every key it has that
      the target does not expect, or a shape mismatch.
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
    have, want = _flat_keys(stored), _flat_keys(target)
    if have != want:
      raise ValueError(
          f"checkpoint {directory} does not match the model:\n"
          f"  missing from checkpoint: {sorted(want - have)}\n"
          f"  unexpected in checkpoint: {sorted(have - want)}")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
        else jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=local), target)
    return ckptr.restore(directory, abstract)


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


def tree_mismatch(stored: Any, expected: Any) -> list[str]:
  """What differs between a stored tree (Orbax metadata) and the expected one: missing and
  unexpected leaves, shape mismatches; [] when they agree."""
  have, want = _shapes(stored), _shapes(expected)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(f"{k}: {have[k]} stored, {want[k]} expected" for k in set(have) & set(want)
                  if have[k] != want[k])
  return ([f"missing {_listed(missing)}"] if missing else []) + (
      [f"unexpected {_listed(unexpected)}"] if unexpected else []) + (
      [f"shape mismatches {_listed(shapes)}"] if shapes else [])


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
