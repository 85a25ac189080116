"""The training state: parameter groups and labels per stage, the AdamW step by hand, frozen
groups that do not move in a run, and the stage hand-off into a `Setup` (only new parameters
initialised; missing, unexpected and mismatched ones reported)."""
import os

import numpy as np
import pytest
from flax import nnx, traverse_util

from configs import tomjerry_3s, tomjerry_9s
from tests.test_training_loop import FakeLoader, _one_device, small
from ttt_jax import checkpoint, training
from ttt_jax.models.dit_convert import is_new_param


# ---------------------------------------------------------------------------- optimizer

def _selected(train_cfg, paths):
  """path -> 'fast' | 'slow' | 'frozen' under a config's trainable groups."""
  trainable = nnx.filterlib.to_predicate(training.trainable_filter(train_cfg))
  return {p: training.label_of(p) if trainable(p, nnx.Param(0)) else "frozen" for p in paths}


def test_groups_and_labels_follow_the_stages():
  paths = [("blocks", "mixer", "wq", "kernel"), ("blocks", "alpha"),
           ("blocks", "attn1", "to_q", "kernel"), ("blocks", "ff", "proj_in", "kernel"),
           ("patch_proj", "kernel")]
  first = _selected(tomjerry_3s.get_config().train, paths)
  assert first == {("blocks", "mixer", "wq", "kernel"): "fast", ("blocks", "alpha"): "fast",
                   ("blocks", "attn1", "to_q", "kernel"): "slow",
                   ("blocks", "ff", "proj_in", "kernel"): "slow", ("patch_proj", "kernel"): "slow"}
  later = _selected(tomjerry_9s.get_config().train, paths)
  assert later[("blocks", "ff", "proj_in", "kernel")] == "frozen"
  assert later[("patch_proj", "kernel")] == "frozen"
  assert later[("blocks", "attn1", "to_q", "kernel")] == "slow"
  assert later[("blocks", "mixer", "wq", "kernel")] == "fast"
  bad = tomjerry_9s.get_config().train
  bad.trainable = ("mixer", "nonsense")
  with pytest.raises(ValueError, match="unknown group.*nonsense"):
    training.trainable_filter(bad)


def test_adamw_step_matches_hand_computation():
  """One step from fresh state: clip to 0.1, Adam's first update is g/(|g|+eps) per element,
  decoupled weight decay on kernels only, per-group peak lr after warm-up."""
  c = tomjerry_3s.get_config().train
  c.warmup_steps, c.schedule = 0, "constant"
  paths = [("blocks", "mixer", "wq", "kernel"), ("blocks", "mixer", "wq", "bias"),
           ("blocks", "ff", "proj_in", "kernel"), ("norm_out", "scale")]
  rng = np.random.default_rng(0)
  params = {p: rng.normal(size=(3, 4)).astype(np.float32) for p in paths}
  grads = {p: rng.normal(size=(3, 4)).astype(np.float32) for p in paths}
  tx = training.make_optimizer(c)
  tree = traverse_util.unflatten_dict
  updates, _ = tx.update(tree(grads), tx.init(tree(params)), tree(params))
  updates = traverse_util.flatten_dict(updates)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
  scale = min(1.0, c.grad_clip / norm)
  for p in paths:
    g = grads[p] * scale
    lr = c.mixer_lr if p[1] == "mixer" else c.lr
    decay = c.weight_decay if p[-1] == "kernel" else 0.0
    want = -lr * (g / (np.abs(g) + 1e-8) + decay * params[p])
    np.testing.assert_allclose(updates[p], want, rtol=2e-4, atol=1e-12)



# ---------------------------------------------------------------------------- a run

def test_frozen_groups_do_not_move_and_trained_ones_do(tmp_path):
  c = small(tomjerry_9s, steps=2, checkpoint_every=2)
  c.train.lr = c.train.mixer_lr = 1e-2
  out = training.train(c, str(tmp_path / "a"), loader=FakeLoader(c), mesh=_one_device())
  c0 = small(tomjerry_9s, steps=0)
  setup = training.build_setup(c0, _one_device())
  before = traverse_util.flatten_dict(setup.init(c.seed)["params"])
  after = traverse_util.flatten_dict(checkpoint.load_params(os.path.join(out["model"], "params")))
  trainable = nnx.filterlib.to_predicate(setup.trainable)
  for p, v in before.items():
    moved = not np.array_equal(np.asarray(v), np.asarray(after[p]))
    assert moved == trainable(p, nnx.Param(0)), p


# ---------------------------------------------------------------------------- hand-off

def test_handoff_initialises_only_new_parameters(tmp_path):
  a = small(tomjerry_3s, steps=1, checkpoint_every=1)
  a.model.mixer = "none"
  training.train(a, str(tmp_path / "a"), loader=FakeLoader(a), mesh=_one_device())
  b = small(tomjerry_9s)
  b.model.mixer = "ttt_linear"
  setup = training.build_setup(b, _one_device())
  params, fresh = _handoff(setup, str(tmp_path / "a"))
  assert fresh and all(f.split("/")[1] in ("mixer", "alpha", "beta") for f in fresh)
  params = traverse_util.flatten_dict(setup.init(0, params)["params"])
  stored = traverse_util.flatten_dict(
      checkpoint.load_params(tmp_path / "a" / "checkpoints" / "1" / "params"))
  for p, v in stored.items():
    np.testing.assert_array_equal(np.asarray(params[p]), v)
  assert len(params) == len(stored) + len(fresh)


def _handoff(setup, source):
  return checkpoint.load_handoff(source, setup.items(setup.abstract)["params"],
                                 is_new_param)


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory):
  """A finished 1-step 3 s local run (ttt_mlp): the hand-off source."""
  a = small(tomjerry_3s, steps=1, checkpoint_every=1)
  return training.train(a, str(tmp_path_factory.mktemp("stage_a")), loader=FakeLoader(a),
                        mesh=_one_device())["workdir"]


def test_handoff_reports_missing_unexpected_and_mismatched(stage_a, tmp_path):
  b = small(tomjerry_9s)
  b.model.mixer = "none"       # the source's mixer parameters are unexpected
  with pytest.raises(ValueError, match=r"unexpected parameters: \['blocks/alpha'"):
    _handoff(training.build_setup(b, _one_device()), stage_a)
  b = small(tomjerry_9s)
  b.model.num_layers = 3       # every block parameter has the wrong layer count
  with pytest.raises(ValueError, match=r"shape mismatches: \['blocks/alpha: \(2, 2, 32\) stored"):
    _handoff(training.build_setup(b, _one_device()), stage_a)
  # A source that lacks a non-new parameter: drop one from an exported model directory.
  params = checkpoint.load_params(os.path.join(stage_a, "model", "params"))
  del params["proj_out"]["bias"]
  checkpoint.save_params(tmp_path / "partial" / "params", params)
  with pytest.raises(ValueError, match=r"missing parameters: \['proj_out/bias'\]"):
    _handoff(training.build_setup(small(tomjerry_9s), _one_device()), str(tmp_path / "partial"))
  with pytest.raises(ValueError, match="neither a training workdir"):
    _handoff(training.build_setup(small(tomjerry_9s), _one_device()), str(tmp_path / "nowhere"))
