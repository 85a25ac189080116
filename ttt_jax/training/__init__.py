"""Staged fine-tuning of the video DiT: the state and its optimizer (state.py), the train step and
its global batches (step.py), one stage's loop with checkpoints and export (loop.py).

`python -m ttt_jax.train` is the command; this package is what it (and the toy job) call.
"""
from ttt_jax.training.loop import export_model, train
from ttt_jax.training.state import (GROUPS, Setup, build_setup, count_params, dit_config,
                                    group_of, in_group, label_of, make_optimizer,
                                    mesh_from_config, mesh_rules, schedule_fn, trainable_filter)
from ttt_jax.training.step import (batch_shardings, global_batch, grad_accum_steps,
                                   make_train_step, to_global)

__all__ = [
    "GROUPS", "Setup", "batch_shardings", "build_setup", "count_params", "dit_config",
    "export_model", "global_batch", "grad_accum_steps", "group_of", "in_group", "label_of",
    "make_optimizer", "make_train_step", "mesh_from_config", "mesh_rules", "schedule_fn",
    "to_global", "train", "trainable_filter",
]
