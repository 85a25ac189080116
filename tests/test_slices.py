"""The stage configs' per-slice layouts (configs/tomjerry_common.SLICE_LAYOUTS) and how plan.py
and train.py apply them (ttt_jax/parallel/slices.py). Nothing here compiles: the bytes are
README "Plan"'s, measured with `python -m ttt_jax.plan`."""
import importlib

import jax
import pytest

from ttt_jax import training
from ttt_jax.parallel import slices

STAGES = [3, 9, 18, 30, 63]


def _load(seconds, arg=None):
  return importlib.import_module(f"configs.tomjerry_{seconds}s").get_config(arg)


def test_chips_and_hbm_of_a_slice_name():
  assert [slices.chips(n) for n in ("v5p-256", "v6e-256", "v5p-8")] == [128, 256, 4]
  assert slices.hbm_bytes("v5p-128") == 95 * 2**30 and slices.hbm_bytes("v6e-8") == 32 * 2**30
  for bad in ("v7-8", "v5p", "v5p-x", "tpu"):
    with pytest.raises(ValueError, match=f"slice '{bad}': expected GENERATION-UNITS"):
      slices.chips(bad)
    with pytest.raises(ValueError, match=f"slice '{bad}'"):
      slices.hbm_bytes(bad)


@pytest.mark.parametrize("seconds", STAGES)
def test_every_stage_has_a_v5p_and_a_v6e_layout_that_divides(seconds):
  config = _load(seconds)
  layouts = config.slice_layouts
  assert {name.split("-")[0] for name in layouts} == {"v5p", "v6e"}
  heads = config.model.num_heads
  for name, layout in layouts.items():
    assert name in slices.TOPOLOGIES, name
    m = layout.mesh
    assert m.data * m.fsdp * m.context * m.tensor == slices.chips(name), name
    assert heads % (m.context * m.tensor) == 0, name          # sequence_to_heads' condition
    assert config.train.batch_size % (m.data * m.fsdp) == 0, name  # never replicated
    assert layout.model.attention_impl == "splash" and layout.model.mixer_options.impl == "pallas"


def _plain_plan_config(seconds, topology, **flags):
  """The config `python -m ttt_jax.plan --config=configs/tomjerry_{seconds}s.py
  --topology=TOPOLOGY [flags]` compiles, without compiling it."""
  pytest.importorskip("libtpu")
  from ttt_jax import plan  # pylint: disable=g-import-not-at-top
  config = _load(seconds)
  given = dict(mesh={a: flags.pop(f"mesh_{a}", None) for a in ("data", "fsdp", "context",
                                                               "tensor")},
               remat=None, remat_every_k_layers=None, attention=None)
  given.update(flags)
  layout = plan.configure(config, topology, (), **given)
  return config, layout, plan.topology_devices(topology)


def test_plain_63s_plan_on_a_v5p_256_picks_a_mesh_that_divides_slice_and_heads():
  config, layout, devices = _plain_plan_config(63, "v5p-256")
  assert layout  # the plain command took the table's entry
  mesh = training.mesh_from_config(config, devices=devices)
  assert mesh.devices.size == len(devices) == 128
  assert config.model.num_heads % (mesh.shape["context"] * mesh.shape["tensor"]) == 0
  assert mesh.shape["context"] > 1  # 128 chips, a batch of 64: the sequence is split
  # Every micro-batch holds one sample a data x fsdp shard: 64 in all.
  accum = training.grad_accum_steps(config, mesh)
  assert accum * mesh.shape["data"] * mesh.shape["fsdp"] == config.train.batch_size == 64
  assert config.model.mixer_options.impl == "pallas"
  assert config.model.attention_impl == "splash"
  assert slices.slice_name(devices) == "v5p-256"


def test_flags_win_over_the_layout():
  config, layout, _ = _plain_plan_config(63, "v5p-256", mesh_fsdp=64, remat="save_dots")
  assert dict(config.mesh) == {"data": -1, "fsdp": 64, "context": 1, "tensor": 1}
  assert config.model.remat == "save_dots"
  assert "model.remat" not in layout and not any(f.startswith("mesh.") for f in layout)
  assert layout["model.attention_impl"] == "splash"  # what no flag set still comes from it

  config = _load(63)
  written = slices.apply_layout(config, "v6e-256", {"model.mixer_options.impl"})
  assert config.model.mixer_options.impl == "dual" and "model.mixer_options.impl" not in written
  assert (config.mesh.context, config.mesh.tensor) == (8, 2)


def test_no_layout_off_the_table():
  config = _load(63, "runlocal")
  assert not config.slice_layouts  # 2 heads: CPU size
  assert slices.apply_layout(config, "v5p-256") == {}
  config = _load(63)
  before = config.to_dict()
  assert slices.apply_layout(config, slices.slice_name(jax.devices())) == {}  # CPU: None
  assert config.to_dict() == before


def test_slice_names_of_compile_only_devices():
  pytest.importorskip("libtpu")
  from ttt_jax import plan  # pylint: disable=g-import-not-at-top
  for name in ("v5p-8", "v6e-8"):
    assert slices.slice_name(plan.topology_devices(name)) == name
    assert len(plan.topology_devices(name)) == slices.chips(name)


def test_a_mesh_that_splits_a_physical_axis():
  """fsdp=64 x context=2 on the 4x4x8 torus of a v5p-256: no product of whole physical axes is
  2, so make_mesh splits one (jax.make_mesh alone refuses)."""
  pytest.importorskip("libtpu")
  from ttt_jax import plan  # pylint: disable=g-import-not-at-top
  from ttt_jax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(fsdp=64, context=2, devices=plan.topology_devices("v5p-256"))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "context": 2, "tensor": 1}
