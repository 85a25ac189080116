"""The training state: parameter groups and their optimizer, the DiT and its `nnx.Optimizer`
(`Setup`), the mesh and its sharding rules.

The optimizer is the paper's recipe (../shared/PAPER.md, "Staged context extension"): AdamW with
per-group learning rates (TTT/mixer and gates faster than the rest in stage 1) and frozen groups
in later stages, global-norm clipping, fp32 parameters and optimizer state. The training state is
the DiT and its `nnx.Optimizer`, whose `wrt` is an NNX filter of the trainable parameter groups
(`group_of`); shardings come from `nnx.get_partition_spec` and the mesh rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from ttt_jax.models.dit import DiT, DiTConfig
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


def label_of(path: Path) -> str:
  """The optimizer group of a trainable parameter: 'fast' (mixer_lr) or 'slow' (lr)."""
  return "fast" if group_of(path) in ("mixer", "gates") else "slow"


def in_group(group: str) -> nnx.filterlib.Filter:
  """NNX filter: the parameters of one group."""
  return nnx.All(nnx.Param, lambda path, _: group_of(tuple(map(str, path))) == group)


def trainable_filter(train: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """NNX filter of the parameters `train.trainable` names (groups of GROUPS, or 'all')."""
  trainable = tuple(train.trainable)
  unknown = set(trainable) - set(GROUPS) - {"all"}
  if unknown:
    raise ValueError(f"config.train.trainable has unknown group(s) {sorted(unknown)}; groups: "
                     f"{GROUPS} or 'all'")
  return nnx.Any(*(in_group(g) for g in (GROUPS if "all" in trainable else trainable)))


def _by_path(fn: Callable[[Path], Any], tree: Any) -> Any:
  """fn(path) at every leaf of `tree`; the path holds the dict keys only (an nnx.Variable's
  attribute level is not part of the parameter's name)."""
  def names(keypath):
    return tuple(str(getattr(k, "key", getattr(k, "idx", ""))) for k in keypath
                 if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))
  return jax.tree_util.tree_map_with_path(lambda kp, _: fn(names(kp)), tree)


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


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW per `label_of` group, over whatever parameters it is given
  (`nnx.Optimizer`'s wrt filter picks the trainable ones)."""
  def adamw(peak):
    return optax.adamw(schedule_fn(train, peak), b1=train.adam_b1, b2=train.adam_b2,
                       weight_decay=train.weight_decay,
                       mask=lambda tree: _by_path(lambda p: p[-1] in _DECAYED, tree))

  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.multi_transform({"fast": adamw(train.mixer_lr), "slow": adamw(train.lr)},
                            lambda tree: _by_path(label_of, tree)))


# ---------------------------------------------------------------------------- model and state

def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
  return DiTConfig.from_dict(config.model.to_dict())


@dataclasses.dataclass
class Setup:
  """Everything the loop needs that does not change per step. The training state is the
  nnx.State of (DiT, nnx.Optimizer): state[0] the model's parameters, state[1] the optimizer's
  step and optax state over the trainable ones."""
  cfg: DiTConfig
  graphdef: Any                   # of (model, optimizer)
  abstract: nnx.State             # the state's jax.ShapeDtypeStructs, with their shardings
  shardings: nnx.State            # NamedSharding per array
  trainable: nnx.filterlib.Filter
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh

  def create(self, seed: int, params: Any = None) -> tuple[DiT, nnx.Optimizer]:
    """A fresh (model, optimizer); `params` (nested dicts, any subset) replace the initial
    values of those parameters before the optimizer state is made."""
    model = DiT(self.cfg, rngs=nnx.Rngs(seed))
    if params:
      state = nnx.state(model, nnx.Param)
      state.replace_by_pure_dict(params)
      nnx.update(model, state)
    return model, nnx.Optimizer(model, self.tx, wrt=self.trainable)

  def items(self, state: nnx.State) -> dict[str, Any]:
    """The state as the checkpoint's items {"params", "opt_state"} (nested dicts)."""
    pure = nnx.to_pure_dict(state)
    return {"params": pure[0], "opt_state": pure[1]}

  def state(self, items: dict[str, Any]) -> nnx.State:
    """`items` back into the (model, optimizer) state."""
    state = jax.tree.map(lambda x: x, self.abstract)  # new Variables: abstract stays as it is
    nnx.replace_by_pure_dict(state, {0: items["params"], 1: items["opt_state"]})
    return state

  def trainable_abstract(self) -> nnx.State:
    """The trainable parameters' jax.ShapeDtypeStructs, with their shardings (the gradients')."""
    return nnx.state(nnx.merge(self.graphdef, self.abstract)[0], self.trainable)

  def init(self, seed: int, params: Any = None) -> dict[str, Any]:
    """`create`'s state as items, made sharded (no full copy on one device); XLA drops the
    initialisation of the parameters `params` gives."""
    make = lambda params: nnx.state(self.create(seed, params))
    return self.items(jax.jit(make, out_shardings=self.shardings, donate_argnums=0)(params))


def build_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  cfg, trainable = dit_config(config), trainable_filter(config.train)
  setup = Setup(cfg, None, None, None, trainable, make_optimizer(config.train), mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: setup.create(config.seed)))
  setup.graphdef, setup.shardings = graphdef, mesh_lib.state_shardings(abstract, mesh,
                                                                        mesh_rules(config))
  setup.abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, setup.shardings)
  if not jax.tree.leaves(nnx.state(abstract[0], trainable)):
    raise ValueError(f"config.train.trainable={tuple(config.train.trainable)} selects no "
                     "parameter of this model")
  # Printed so that a baseline's size can be compared with TTT-MLP's (configs/mixers.py).
  mixer_params = count_params(nnx.state(abstract[0], in_group("mixer")))
  logging.info("mixer %s: %d parameters, %d a layer", cfg.mixer, mixer_params,
               mixer_params // cfg.num_layers)
  return setup


def count_params(tree: Any) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """config.mesh (data x fsdp x context x tensor; default: all devices on data) over devices."""
  m = config.get("mesh", ml_collections.ConfigDict())
  return mesh_lib.make_mesh(m.get("data", -1), m.get("fsdp", 1), m.get("context", 1),
                            m.get("tensor", 1), devices=devices)


def mesh_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """config.mesh_rules (logical axis -> mesh axes) as tuples, or the default rules."""
  rules = config.get("mesh_rules")
  return tuple(tuple(r) for r in rules) if rules else mesh_lib.DEFAULT_RULES
