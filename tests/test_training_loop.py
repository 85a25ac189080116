"""One training stage's loop: exact resume after a hard kill and after SIGTERM, resume past a
damaged checkpoint, NaN stop, nothing left by a run that fails at its first step, sharding, and
every stage's local config trained in sequence with hand-off. FakeLoader, `small` and friends are
shared with the other training tests."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tomjerry_3s, tomjerry_9s, tomjerry_18s, tomjerry_30s, tomjerry_63s
from ttt_jax import checkpoint, training
from ttt_jax.data import features
from ttt_jax.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeLoader:
  """Deterministic random latents/texts of the config's shapes; batch(step) is pure."""

  def __init__(self, config, nan_at=None):
    self.c, self.nan_at = config, nan_at
    self.null_text = np.zeros((config.text.max_length, config.model.text_embed_dim), np.float32)

  def batch(self, step, rows=None):
    c = self.c
    rng = np.random.default_rng([7, step])
    lat = rng.normal(size=(c.train.batch_size, features.latent_frames(c.segments, c.fps),
                           c.model.in_channels, c.height // 8, c.width // 8)).astype(np.float32)
    if step == self.nan_at:
      lat[0, 0, 0, 0, 0] = np.nan
    text = rng.normal(size=(c.train.batch_size, c.segments, c.text.max_length,
                            c.model.text_embed_dim)).astype(np.float32)
    rows = slice(None) if rows is None else rows
    return {"latents": lat[rows], "text": text[rows]}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _one_device():
  return mesh_lib.make_mesh(devices=jax.devices()[:1])


def small(config_module, **train_overrides):
  c = config_module.get_config("runlocal")
  c.train.update(train_overrides)
  return c


# ---------------------------------------------------------------------------- the loop


# A 6-step local 3 s run in its own process, through the CLI's error handling (cli.guard).
# argv: workdir [step signal]: the fault injection, a hook that signals this process after the step.
_RUN_SCRIPT = f"""
import os, signal, sys
sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
from configs import tomjerry_3s
from test_training_loop import FakeLoader, small
from ttt_jax import cli, training
c = small(tomjerry_3s, steps=6, checkpoint_every=2, keep_checkpoints=2)
hooks = []
if len(sys.argv) > 2:
  at, sig = int(sys.argv[2]), getattr(signal, sys.argv[3])
  hooks.append(lambda step: step == at and os.kill(os.getpid(), sig))
with cli.guard(verbose=False):
  training.train(c, sys.argv[1], loader=FakeLoader(c), hooks=hooks)
assert "tensorflow" not in sys.modules  # clu writers, Orbax, optax: no TensorFlow
"""


def _run(tmp_path, workdir, kill_at=None, signal_name="SIGKILL"):
  script = tmp_path / "run.py"
  script.write_text(_RUN_SCRIPT)
  fault = [] if kill_at is None else [str(kill_at), signal_name]
  return subprocess.run([sys.executable, str(script), str(workdir)] + fault, capture_output=True,
                        text=True, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run the interrupted ones must reproduce."""
  tmp = tmp_path_factory.mktemp("straight")
  result = _run(tmp, tmp / "run")
  assert result.returncode == 0, result.stderr
  return tmp / "run"


def _assert_same_run(resumed, straight):
  assert _losses(resumed) == _losses(straight)
  a = checkpoint.load_params(straight / "model" / "params")
  b = checkpoint.load_params(resumed / "model" / "params")
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_resume_after_hard_kill_gives_the_same_loss_curve(straight, tmp_path):
  killed = _run(tmp_path, tmp_path / "resumed", kill_at=5)
  assert killed.returncode == -9  # SIGKILL after step 5, its checkpoint at 4
  assert [s for s, _ in _losses(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
  assert _run(tmp_path, tmp_path / "resumed").returncode == 0
  _assert_same_run(tmp_path / "resumed", straight)
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "6"]  # keep-2
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "resumed"))


def test_sigterm_saves_the_step_reached_and_resumes_exactly(straight, tmp_path):
  """Preemption: SIGTERM after step 5 (no periodic checkpoint there) -> checkpoint 5, metric
  writers flushed, exit 0 with one line saying how to resume; the resumed run = the straight."""
  workdir = tmp_path / "resumed"
  stopped = _run(tmp_path, workdir, kill_at=5, signal_name="SIGTERM")
  assert stopped.returncode == 0, stopped.stderr
  last = stopped.stderr.strip().splitlines()[-1]
  assert last == (f"python {tmp_path / 'run.py'}: stopped by SIGTERM at step 5; checkpoint saved "
                  f"in {workdir / 'checkpoints' / '5'}; resume with: python "
                  f"{tmp_path / 'run.py'} {workdir} 5 SIGTERM")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "5"]  # keep-2, no Orbax tmp dir
  assert [s for s, _ in _losses(workdir)] == [1, 2, 3, 4, 5]
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1 and os.path.getsize(workdir / events[0]) > 0
  assert _run(tmp_path, workdir).returncode == 0
  _assert_same_run(workdir, straight)


def _constant_lr(steps):
  """A local 3 s config whose learning rate does not depend on the total steps, so a 4-step run
  resumed to 6 steps must equal a 6-step run."""
  c = small(tomjerry_3s, steps=steps, checkpoint_every=2, keep_checkpoints=3)
  c.train.schedule = "constant"
  return c


def test_resume_moves_a_damaged_checkpoint_aside_and_uses_the_one_before(tmp_path):
  c6 = _constant_lr(6)
  training.train(c6, str(tmp_path / "straight"), loader=FakeLoader(c6), mesh=_one_device())
  run = tmp_path / "run"
  training.train(_constant_lr(4), str(run), loader=FakeLoader(c6), mesh=_one_device())
  manifest = run / "checkpoints" / "4" / "params" / "manifest.ocdbt"
  os.truncate(manifest, os.path.getsize(manifest) // 2)
  interrupted = run / "checkpoints" / "6.orbax-checkpoint-tmp"  # a save cut short
  interrupted.mkdir()
  (interrupted / "junk").write_text("half a checkpoint")

  out = training.train(c6, str(run), loader=FakeLoader(c6), mesh=_one_device())
  assert len(out["skipped_checkpoints"]) == 1
  assert re.match(r"checkpoint step 4 does not restore \(ValueError: .+\); moved to "
                  + re.escape(str(run / "checkpoints_broken" / "4")) + "$",
                  out["skipped_checkpoints"][0])
  assert (run / "checkpoints_broken" / "4" / "params").is_dir()  # kept, not deleted
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]  # the tmp dir is gone
  assert _losses(run) == _losses(tmp_path / "straight")

  # A checkpoint of another model is an error, not a damaged step: nothing is moved.
  other = _constant_lr(6)
  other.model.num_layers = 3
  with pytest.raises(ValueError, match=r"step 6 .* written for another model .*params: shape "
                                       r"mismatches: \['blocks/alpha: \(2, 2, 32\) stored"):
    training.train(other, str(run), loader=FakeLoader(other), mesh=_one_device())
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]
  assert os.listdir(run / "checkpoints_broken") == ["4"]


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  c = small(tomjerry_3s, steps=6, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match=r"step 4: non-finite.*step 2"):
    training.train(c, str(tmp_path), loader=FakeLoader(c, nan_at=3), mesh=_one_device())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert not (tmp_path / "model").exists()


def test_sharded_run_matches_one_device(tmp_path):
  c = small(tomjerry_3s, steps=2, checkpoint_every=2, batch_size=4)
  training.train(c, str(tmp_path / "one"), loader=FakeLoader(c), mesh=_one_device())
  mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
  training.train(c, str(tmp_path / "eight"), loader=FakeLoader(c), mesh=mesh)
  one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  np.testing.assert_allclose([l for _, l in eight], [l for _, l in one], rtol=1e-5)


def test_all_five_local_stages_train_in_sequence_with_handoff(tmp_path):
  previous = None
  for module in (tomjerry_3s, tomjerry_9s, tomjerry_18s, tomjerry_30s, tomjerry_63s):
    c = small(module, steps=2, checkpoint_every=2)
    if previous:
      c.init_from = previous
    out = training.train(c, str(tmp_path / c.stage), loader=FakeLoader(c), mesh=_one_device())
    assert out["step"] == 2 and np.isfinite(out["last"]["loss"])
    assert out["initialised_fresh"] == []
    previous = out["workdir"]
  # The last stage's export loads as a DiT for sampling.
  from ttt_jax.models.dit_convert import load_dit
  assert load_dit(os.path.join(previous, "model")).config.mixer == "ttt_mlp"


def test_dataset_config_mismatch_is_an_error_and_leaves_nothing(tmp_path):
  c = small(tomjerry_9s)
  other = small(tomjerry_3s)
  with pytest.raises(ValueError, match="latent frames for 3 segments"):
    training.train(c, str(tmp_path / "run"), loader=FakeLoader(other), mesh=_one_device())
  assert not (tmp_path / "run").exists()  # no checkpoints/, config.json, events file
  # In an existing folder: only what the run made goes.
  (tmp_path / "mine.txt").write_text("kept")
  c = small(tomjerry_3s)
  with pytest.raises(FloatingPointError, match="step 1: non-finite"):
    training.train(c, str(tmp_path), loader=FakeLoader(c, nan_at=0), mesh=_one_device())
  assert os.listdir(tmp_path) == ["mine.txt"]
