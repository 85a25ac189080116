"""The configs users launch trace at their real size, in bf16 (abstractly: no memory, no FLOPs),
and the bf16 local variant trains: the real dtype path runs on a CPU."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tests.test_training_loop import FakeLoader, _losses, _one_device
from ttt_jax import training


def _load(seconds, arg=None):
  return importlib.import_module(f"configs.tomjerry_{seconds}s").get_config(arg)


def _abstract_batch(c, batch_size):
  lat = jax.ShapeDtypeStruct((batch_size, c.latent_frames, c.model.in_channels, c.height // 8,
                              c.width // 8), jnp.float32)
  text = jax.ShapeDtypeStruct((batch_size, c.segments, c.text.max_length,
                               c.model.text_embed_dim), jnp.float32)
  return {"latents": lat, "text": text}


@pytest.mark.parametrize("seconds", [3, 63])
def test_real_config_forward_and_train_step_trace_in_bf16(seconds):
  c = _load(seconds)
  assert c.model.dtype == "bfloat16" and c.model.num_layers == 42
  c.train.batch_size = 1
  setup = training.build_setup(c, _one_device())
  # Parameters stay float32 (the optimizer updates them); only compute is bf16.
  params = setup.items(setup.abstract)["params"]
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  batch = _abstract_batch(c, 1)

  def forward(state, batch):
    model, _ = nnx.merge(setup.graphdef, state)
    return model(batch["latents"], batch["text"], jnp.zeros((1,), jnp.int32))

  out = jax.eval_shape(forward, setup.abstract, batch)
  assert out.shape == batch["latents"].shape and out.dtype == jnp.bfloat16

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  null_text = np.zeros((c.text.max_length, c.model.text_embed_dim), np.float32)
  step = training.make_train_step(c, setup, null_text, {"latents": replicated, "text": replicated})
  new_state, metrics = jax.eval_shape(step, setup.abstract, batch,
                                      jax.ShapeDtypeStruct((), jnp.int32))
  shapes = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
  assert shapes(new_state) == shapes(setup.abstract)
  assert metrics["loss"].dtype == jnp.float32


def test_runlocal_bf16_keeps_the_structure_and_only_changes_the_dtype():
  local, bf16 = _load(3, "runlocal"), _load(3, "runlocal,bf16")
  assert local.model.dtype == "float32" and bf16.model.dtype == _load(3).model.dtype
  bf16.model.dtype = "float32"
  assert bf16.to_dict() == local.to_dict()


def test_runlocal_bf16_trains(tmp_path):
  c = _load(3, "runlocal,bf16")
  c.train.update(dict(steps=2, checkpoint_every=2))
  training.train(c, str(tmp_path), loader=FakeLoader(c), mesh=_one_device())
  losses = [loss for _, loss in _losses(tmp_path)]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
