"""The jit-compiled train step and the global batches it takes.

The step: v-prediction loss, text dropout for classifier-free guidance, gradient accumulation
over micro-batches, bf16 compute on the fp32 state of `state.Setup`. The batches: a process holds
only some rows of a global batch (`batch_shardings`); `to_global` makes one sharded array per key
of them.
"""
from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ttt_jax import diffusion
from ttt_jax.data.loader import process_rows
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.training.state import Setup, mesh_rules, schedule_fn


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
  channel_weights = train.get("channel_weights") or None
  foreground_weight = float(train.get("foreground_weight", 0.0))
  if foreground_weight < 0:
    raise ValueError(f"train.foreground_weight={foreground_weight}: expected a weight >= 0")
  accum = grad_accum_steps(config, setup.mesh)
  rules = mesh_rules(config)
  grads_abstract = setup.trainable_abstract()

  def loss_fn(model, micro):
    """micro: {"latents", "text", "t", "noise", "drop"} of one micro-batch -> mean loss."""
    x0, text, t, noise = micro["latents"], micro["text"], micro["t"], micro["noise"]
    # Text dropout for classifier-free guidance: the whole example's texts become the null text.
    text = jnp.where(micro["drop"][:, None, None, None], null[None, None].astype(text.dtype),
                     text)
    v_pred = model(diffusion.add_noise(schedule, x0, noise, t), text, t)
    return diffusion.v_prediction_loss(schedule, v_pred.astype(jnp.float32), x0, noise, t,
                                       weighting=weighting, channel_weights=channel_weights,
                                       foreground_weight=foreground_weight)

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


# ---------------------------------------------------------------------------- the batches

_BATCH_AXES = {"latents": ("batch",) + (None,) * 4, "text": ("batch",) + (None,) * 3}


def batch_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> tuple[dict[str, NamedSharding], np.ndarray]:
  """({"latents", "text"} -> sharding of the global batch, the rows of it this process's devices
  hold: int64 [R], sorted)."""
  size = int(config.train.batch_size)
  shardings = {k: mesh_lib.activation_sharding(mesh, names, (size,) + (1,) * (len(names) - 1),
                                               mesh_rules(config))
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
