"""The ahead-of-time plan: compiles the real train step for a TPU slice on any host (this CPU)
and prints one JSON object: does the stage fit, and how.

  python -m ttt_jax.plan --config=configs/tomjerry_63s.py --topology=v5p-256 \
      [--mesh.fsdp=16 --mesh.context=8 --remat=full --remat_every_k_layers=1 \
       --attention=splash] [--config.FIELD=VALUE ...]

The TPU compiler is libtpu's (`pip install -e ".[tpu]"`); `get_topology_desc` gives compile-only
devices for the slice, so nothing runs and no TPU is needed (maxtext's train_compile.py). The
step is `ttt_jax.training.make_train_step` with the shardings training uses (gradient accumulation
included): the numbers are those of `python -m ttt_jax.train` with the same config. Without
flags the config's layout for the slice (config.slice_layouts; ttt_jax/parallel/slices.py) sets
the mesh, remat, attention and TTT kernel, as train.py does on that slice; a flag, shorthand or
--config.FIELD, wins over it, and any mesh flag replaces the layout's whole mesh. The mesh
flags set config.mesh (data takes the devices left: -1); `--config.model.num_layers=N` compiles
fewer layers when a host cannot hold the compile of all 42 (the layers are one `scan`, so the
per-layer bytes are (bytes(N) - bytes(M)) / (N - M); the JSON says how many it compiled).
bench/aot_compile.py is this command.

Keys: layout (the config fields the slice's layout set), params, trainable_params, devices,
mesh, mixer_impl, grad_accum_steps, remat, per_device_bytes =
arguments + outputs + temps - aliases (memory_analysis, per chip), hbm_bytes, fits,
flops_per_step (cost_analysis, per chip; it counts a while loop's body once, so the scanned
layers, micro-batches and chunked attention are undercounted: 2.8e13 for the 3 s stage, where
6 x params x tokens alone is ~7.8e14 a sample), mosaic_kernels (Pallas kernel calls in the
compiled program: splash attention, the impl="pallas" TTT scan; 0 where they were interpreted
as plain XLA), lower_seconds, compile_seconds, peak_host_rss_bytes. A step over HBM does not
compile for TPU: then fits is false, per_device_bytes null, and temp_bytes is what the compiler
said its temporaries need.

Measured (README "Plan" has every stage; each SLICE_LAYOUTS entry compiles at 42 layers and
fits): tomjerry_63s's layout for v5p-256 (fsdp=16 x context=8, 4 micro-batches, splash,
impl="pallas", remat full) compiles at 30.4 / 31.7 GiB a chip with 2 / 4 layers (563 / 477 s,
host RSS 13 GB), and at all 42 layers at 57.7 GiB (578 s, host RSS 13 GB; the extrapolation
from 2 and 4 said 56.5). Also compiled at 42 layers: tomjerry_3s,
v5p-128 (64 chips), fsdp=64, global batch 64 (1 sample a chip, 1 micro-batch), chunked
attention, remat full: 24.27 GiB a chip (temps 23.8 GB, arguments 2.2 GB), fits 95 GiB; compile
1069 s, host RSS 7.6 GB. attention_impl=xla with 2 layers already needs 71.6 GiB: a segment's
float32 scores (18k x 18k x 48 heads, ~62 GB) in the backward pass.
"""
from __future__ import annotations

import os

# Before jax initialises its backends: the host backend is the CPU, libtpu only a compiler.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ttt_jax import cli, training  # noqa: E402
from ttt_jax.models.dit import remat_policy  # noqa: E402
from ttt_jax.models.layers import IMPLEMENTATIONS  # noqa: E402
from ttt_jax.parallel import mesh as mesh_lib  # noqa: E402
from ttt_jax.parallel import slices  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice, e.g. v5p-8 ... v5p-256, v6e-8")
_MESH = {axis: flags.DEFINE_integer(f"mesh.{axis}", None, f"config.mesh.{axis}")
         for axis in mesh_lib.MESH_AXES}
_REMAT = flags.DEFINE_string("remat", None, "config.model.remat: none, full, save_dots, offload")
_EVERY_K = flags.DEFINE_integer("remat_every_k_layers", None, "config.model.remat_every_k_layers")
_ATTENTION = flags.DEFINE_enum("attention", None, list(IMPLEMENTATIONS),
                               "config.model.attention_impl")

def topology_devices(name: str) -> list[jax.Device]:
  """Compile-only TPU devices of slice `name` (a key of slices.TOPOLOGIES)."""
  if name not in slices.TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(slices.TOPOLOGIES)}")
  topology, per_host, wrap = slices.TOPOLOGIES[name]
  v5p = name.startswith("v5p")
  return topologies.get_topology_desc(
      topology_name=topology, platform="tpu",
      chip_config_name="megacore" if v5p else "default", chips_per_host_bounds=per_host,
      num_slices=1, wrap=(wrap,) * 3).devices  # libtpu wants three, 2-D slices included


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def compile_train_step(config, devices: list[jax.Device]) -> dict:
  """Lowers and compiles the train step of `config` for `devices`; returns the JSON's fields."""
  mesh = training.mesh_from_config(config, devices=devices)
  setup = training.build_setup(config, mesh)
  rules = training.mesh_rules(config)
  c, b = config, config.train.batch_size
  shapes = {"latents": (b, c.latent_frames, c.model.in_channels, c.height // 8, c.width // 8),
            "text": (b, c.segments, c.text.max_length, c.model.text_embed_dim)}
  batch_sh = {k: mesh_lib.activation_sharding(mesh, ("batch",) + (None,) * (len(s) - 1), s, rules)
              for k, s in shapes.items()}
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=batch_sh[k])
           for k, s in shapes.items()}
  null_text = np.zeros((c.text.max_length, c.model.text_embed_dim), np.float32)
  step_fn = training.make_train_step(config, setup, null_text, batch_sh)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))

  result = {
      "stage": config.stage,
      "num_layers": config.model.num_layers,
      "dtype": config.model.dtype,
      "attention": config.model.get("attention_impl", "xla"),
      "mixer_impl": config.model.get("mixer_options", {}).get("impl"),
      "global_batch": b,
      "devices": len(devices),
      "mesh": dict(mesh.shape),
      "params": training.count_params(setup.items(setup.abstract)["params"]),
      "trainable_params": training.count_params(setup.trainable_abstract()),
      "grad_accum_steps": training.grad_accum_steps(config, mesh),
      "remat": remat_policy(config.model.remat),
      "remat_every_k_layers": config.model.get("remat_every_k_layers", 1),
  }
  start = time.perf_counter()
  lowered = step_fn.lower(setup.abstract, batch, step)
  result["lower_seconds"] = round(time.perf_counter() - start, 1)
  # Compiles of a whole stage run for many minutes: say where it is.
  logging.info("lowered in %.0f s, host RSS %.1f GB; compiling", result["lower_seconds"],
               _peak_rss() / 1e9)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program over HBM, saying how much its temporaries need.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", str(e))
    result.update(compile_error=str(e).splitlines()[0][:300], per_device_bytes=None,
                  temp_bytes=(int(float(need[1]) * 1024 ** " KMGT".index(need[2] or " "))
                              if need else None))
    return result
  result["compile_seconds"] = round(time.perf_counter() - start - result["lower_seconds"], 1)

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      **result,
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "per_device_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      "flops_per_step": cost.get("flops"),
      "mosaic_kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
  }


def apply_flags(config, mesh: dict[str, int | None], remat: str | None,
                remat_every_k_layers: int | None, attention: str | None):
  """The plan's shorthand flags into `config` (in place): mesh sizes (data then takes the
  devices left unless given), remat policy, attention."""
  given = {axis: size for axis, size in mesh.items() if size is not None}
  if given:
    config.mesh.update({"data": -1, **given})
  if remat is not None:
    with config.ignore_type():  # the stage configs' remat is a bool (True = "full")
      config.model.remat = remat_policy(remat)
  if remat_every_k_layers is not None:
    config.model.remat_every_k_layers = remat_every_k_layers
  if attention is not None:
    config.model.attention_impl = attention
  return config


def configure(config, topology: str, config_overrides, mesh: dict[str, int | None],
              remat: str | None, remat_every_k_layers: int | None,
              attention: str | None) -> dict:
  """The config's layout for slice `topology` (slices.apply_layout), then the shorthand flags
  (apply_flags), into `config` in place; `config_overrides`: the --config.FIELD flags given,
  which also win over the layout. Returns the layout's fields that were written."""
  shorthand = {"mesh": any(v is not None for v in mesh.values()), "model.remat": remat,
               "model.remat_every_k_layers": remat_every_k_layers,
               "model.attention_impl": attention}
  overridden = set(config_overrides) | {f for f, v in shorthand.items() if v not in (None, False)}
  layout = slices.apply_layout(config, topology, overridden)
  apply_flags(config, mesh, remat, remat_every_k_layers, attention)
  return layout


def main(argv):
  del argv
  config = _CONFIG.value
  layout = configure(config, _TOPOLOGY.value,
                     config_flags.get_override_values(flags.FLAGS["config"]),
                     {axis: f.value for axis, f in _MESH.items()}, _REMAT.value, _EVERY_K.value,
                     _ATTENTION.value)
  result = compile_train_step(config, topology_devices(_TOPOLOGY.value))
  hbm = slices.hbm_bytes(_TOPOLOGY.value)
  per_device = result["per_device_bytes"]
  result.update(topology=_TOPOLOGY.value, layout=layout, hbm_bytes=hbm,
                fits=per_device is not None and per_device <= hbm,
                per_device_gib=None if per_device is None else round(per_device / 2**30, 2),
                peak_host_rss_bytes=_peak_rss())
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run_absl(main)
