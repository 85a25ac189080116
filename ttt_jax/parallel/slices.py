"""TPU slices by name, and the per-slice layouts that stage configs carry.

Slices are named as Cloud TPU names them: v5p-N has N/2 chips (two cores each, one "megacore"
JAX device a chip); v6e-N has N chips (one core each).

A stage config may hold `slice_layouts`: {slice name: overlay}, an overlay being a nested dict of
config fields that fit that slice (configs/tomjerry_common.py; python -m ttt_jax.plan measured
them): {"mesh": {...}, "model": {"remat": ..., "attention_impl": ..., "mixer_options":
{"impl": ...}}}. `apply_layout` writes the overlay for a slice into the config, except what the
command line set: ttt_jax/plan.py applies the --topology's, ttt_jax/train.py the one of the
devices it runs on.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import ml_collections

# Slice name -> (libtpu topology, chips per host, wrap-around links); slices of a full 4x4x4
# v5p cube or more are tori. ttt_jax/plan.py compiles for these.
TOPOLOGIES = {
    "v5p-8": ("v5:2x2x1", (2, 2, 1), False), "v5p-16": ("v5:2x2x2", (2, 2, 1), False),
    "v5p-32": ("v5:2x2x4", (2, 2, 1), False), "v5p-64": ("v5:2x4x4", (2, 2, 1), False),
    "v5p-128": ("v5:4x4x4", (2, 2, 1), True), "v5p-256": ("v5:4x4x8", (2, 2, 1), True),
    "v5p-512": ("v5:4x8x8", (2, 2, 1), True),
    "v6e-4": ("v6e:2x2", (2, 2, 1), False), "v6e-8": ("v6e:2x4", (2, 2, 1), False),
    "v6e-16": ("v6e:4x4", (2, 2, 1), False), "v6e-64": ("v6e:8x8", (2, 2, 1), False),
    "v6e-256": ("v6e:16x16", (2, 2, 1), False),
}
# Per-chip HBM by generation.
HBM_BYTES = {"v5p": 95 * 2**30, "v6e": 32 * 2**30}
# Slice-name units a chip, by generation (v5p counts cores, two a chip).
_UNITS_PER_CHIP = {"v5p": 2, "v6e": 1}
# jax's device_kind -> generation.
_KINDS = {"TPU v5": "v5p", "TPU v6 lite": "v6e"}


def _generation_and_units(name: str) -> tuple[str, int]:
  """'v5p-256' -> ('v5p', 256)."""
  generation, _, units = name.partition("-")
  if generation not in HBM_BYTES or not units.isdigit():
    raise ValueError(f"slice {name!r}: expected GENERATION-UNITS with GENERATION one of "
                     f"{sorted(HBM_BYTES)}, e.g. 'v5p-256'")
  return generation, int(units)


def chips(name: str) -> int:
  """Chips of slice `name`: 'v5p-256' -> 128, 'v6e-256' -> 256."""
  generation, units = _generation_and_units(name)
  return units // _UNITS_PER_CHIP[generation]


def hbm_bytes(name: str) -> int:
  """HBM bytes of one chip of slice `name`: 'v5p-256' -> 95 GiB."""
  return HBM_BYTES[_generation_and_units(name)[0]]


def slice_name(devices: Sequence[jax.Device]) -> str | None:
  """The slice `devices` make ('v5p-256' for 128 v5p chips); None off v5p/v6e TPUs."""
  generation = _KINDS.get(devices[0].device_kind)
  if generation is None:
    return None
  return f"{generation}-{len(devices) * _UNITS_PER_CHIP[generation]}"


def _flatten(tree: Any, path: str = "") -> dict[str, Any]:
  """{"model": {"remat": "full"}} -> {"model.remat": "full"}."""
  if not isinstance(tree, (dict, ml_collections.ConfigDict)):
    return {path: tree}
  return {k: v for key, sub in tree.items()
          for k, v in _flatten(sub, f"{path}.{key}" if path else key).items()}


def apply_layout(config: ml_collections.ConfigDict, name: str | None,
                 overridden: Iterable[str] = ()) -> dict[str, Any]:
  """Writes config.slice_layouts[name] into `config` (in place) and returns what it wrote
  ({dotted field: value}; empty when the config has no layout for the slice).

  `overridden`: dotted fields the command line set, which keep their value. The mesh counts as
  one field (a layout gives all four sizes): any mesh size set keeps the whole config.mesh.
  """
  layouts = config.get("slice_layouts") or {}
  if name not in layouts:
    return {}
  overridden = set(overridden)
  keep_mesh = any(f == "mesh" or f.startswith("mesh.") for f in overridden)
  written = {}
  for field, value in _flatten(layouts[name]).items():
    if field in overridden or (field.startswith("mesh.") and keep_mesh):
      continue
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    with node.ignore_type():  # the stage configs' remat is a bool, a layout names a policy
      node[leaf] = value
    written[field] = value
  return written
