"""Parameter checkpoints (Orbax): atomic save, restore with a clear missing/unexpected report.

Orbax writes into a temporary directory and renames it on success, so a crash mid-save never
leaves a half-written checkpoint behind under the final name.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _flat_keys(tree: Any) -> set[str]:
  return {jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metadata_tree(ckptr: ocp.StandardCheckpointer, directory: str) -> Any:
  # Orbax versions differ in where the tree sits: metadata, .item_metadata, .item_metadata.tree.
  stored = ckptr.metadata(directory)
  stored = getattr(stored, "item_metadata", stored)
  return getattr(stored, "tree", stored)


def stored_shapes(directory: str | os.PathLike) -> Any:
  """The stored pytree's structure without reading it: nested dicts of leaves with .shape and
  .dtype."""
  with ocp.StandardCheckpointer() as ckptr:
    return _metadata_tree(ckptr, os.path.abspath(os.fspath(directory)))


def save_params(directory: str | os.PathLike, params: Any) -> None:
  """Writes a pytree of arrays to `directory` (must not exist yet), atomically."""
  directory = os.path.abspath(os.fspath(directory))
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
  directory = os.path.abspath(os.fspath(directory))
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(directory)
    have, want = _flat_keys(_metadata_tree(ckptr, directory)), _flat_keys(target)
    if have != want:
      raise ValueError(
          f"checkpoint {directory} does not match the model:\n"
          f"  missing from checkpoint: {sorted(want - have)}\n"
          f"  unexpected in checkpoint: {sorted(have - want)}")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
    return ckptr.restore(directory, abstract)
