"""Many processes on one machine: 2 processes x 4 CPU devices, `jax.distributed` with gloo CPU
collectives, the layout of a TPU VM slice or a GPU cluster with one process per host.

One stage (`tomjerry_3s:runlocal`, 5 steps, checkpoints every 2) on a mesh whose batch shards
alternate between the processes (process 0 holds rows 0 and 2 of 4: a contiguous slice per
process would be wrong here). One process is killed after step 4, the other then too; both are
restarted, resume from the checkpoint and export the model from both processes. Checked against
the same stage run by one process on 8 devices: the global batch (equal), every step's loss and
the exported parameters (equal up to float32 rounding: the gradient all-reduce across processes
runs through gloo, which adds in another order than one process does; a wrong row or a missed
restore changes the loss in the first digits).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tomjerry_3s
from ttt_jax import checkpoint, training
from ttt_jax.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Killed after step 4: its checkpoint may be unfinished, step 2's is finished (Orbax finishes a
# save before it starts the next), so the restart resumes from step 2 or 4.
STEPS, KILL_AT = 5, 4
# Mesh data=2 x fsdp=2 x tensor=2 over devices in this order: batch shard (data i, fsdp j) sits
# on devices ORDER[4i + 2j : 4i + 2j + 2], i.e. on process j (devices 0-3 are process 0's).
ORDER = (0, 1, 4, 5, 2, 3, 6, 7)


class RowLoader:
  """Row r of step s's global batch depends on (s, r) only."""

  def __init__(self, config):
    self.c = config
    self.null_text = np.zeros((config.text.max_length, config.model.text_embed_dim), np.float32)

  def batch(self, step, rows=None):
    c = self.c
    rows = range(c.train.batch_size) if rows is None else rows
    out = {"latents": [], "text": []}
    for r in rows:
      rng = np.random.default_rng([11, step, int(r)])
      out["latents"].append(rng.normal(size=(1 + 12 * c.segments, c.model.in_channels,
                                             c.height // 8, c.width // 8)))
      out["text"].append(rng.normal(size=(c.segments, c.text.max_length,
                                          c.model.text_embed_dim)))
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def stage_config():
  c = tomjerry_3s.get_config("runlocal")
  c.train.update(steps=STEPS, batch_size=4, checkpoint_every=2, keep_checkpoints=2)
  return c


def stage_mesh(devices):
  devices = sorted(devices, key=lambda d: d.id)
  return mesh_lib.make_mesh(data=2, fsdp=2, tensor=2, devices=[devices[i] for i in ORDER])


# One process of the run: argv = workdir, process id, number of processes, coordinator port.
_WORKER = """
import json, os, signal, sys
import jax
workdir, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                           initialization_timeout=120)
import numpy as np
from jax.experimental import multihost_utils
from test_multihost import RowLoader, stage_config, stage_mesh
from ttt_jax import training
from ttt_jax.data.loader import process_rows

c = stage_config()
mesh, loader = stage_mesh(jax.devices()), RowLoader(c)
shardings, rows = training.batch_shardings(c, mesh)
batch = training.global_batch(loader, 0, c.train.batch_size, shardings, rows)
full = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
print("ROWS", json.dumps(rows.tolist()), flush=True)
if pid == 0:
  np.savez(workdir + ".batch0.npz", **full)
# The fault injection: a hook that kills this process after step KILL_AT_STEP.
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
training.train(c, workdir, loader=loader, mesh=mesh,
               on_step=lambda step, total, m: print("STEP", step, repr(m["loss"]), flush=True),
               hooks=[lambda step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL)])
print("DONE", flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(tmp_path, workdir, env_of_process):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "tests"), REPO])}
  return [subprocess.Popen([sys.executable, str(script), str(workdir), str(p), "2", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                           env={**env, **env_of_process[p]}) for p in range(2)]


def _steps(stdout):
  return [(int(s), float(l)) for tag, s, l in
          (line.split() for line in stdout.splitlines() if line.startswith("STEP"))]


def _rows(stdout):
  return [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("ROWS")]


def _assert_same_losses(got, want):
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-6)


@pytest.mark.slow
def test_two_processes_kill_restart_resume_and_export_match_one_process(tmp_path):
  # The reference: this process, 8 devices, the same mesh shape.
  c = stage_config()
  reference = training.train(c, str(tmp_path / "one"), loader=RowLoader(c),
                             mesh=stage_mesh(jax.devices()))
  with open(tmp_path / "one" / "metrics.jsonl") as f:
    losses = [(r["step"], r["loss"]) for r in map(json.loads, f)]

  workdir = tmp_path / "two"
  first = _start(tmp_path, workdir, [{}, {"KILL_AT_STEP": str(KILL_AT)}])
  try:
    first[1].wait(timeout=600)
  finally:  # process 0 waits in a collective for its dead peer: kill it too
    first[0].send_signal(signal.SIGKILL)
  out = [p.communicate() for p in first]
  assert first[1].returncode == -signal.SIGKILL, out[1][1][-3000:]
  assert _rows(out[0][0]) == [[0, 2]] and _rows(out[1][0]) == [[1, 3]]
  gathered = np.load(str(workdir) + ".batch0.npz")
  for key, value in RowLoader(c).batch(0).items():
    np.testing.assert_array_equal(gathered[key], value)
  killed_steps = _steps(out[1][0])
  _assert_same_losses(killed_steps, losses[:KILL_AT])
  assert not checkpoint.stage_finished(workdir)

  second = _start(tmp_path, workdir, [{}, {}])
  deadline = time.time() + 600
  out = [p.communicate(timeout=max(1, deadline - time.time())) for p in second]
  for p, (stdout, stderr) in zip(second, out):
    assert p.returncode == 0, stderr[-3000:]
    assert "DONE" in stdout
  resumed = [_steps(stdout) for stdout, _ in out]
  assert resumed[0] == resumed[1]  # both processes see the same (global) loss
  assert resumed[0][0][0] in (3, 5)  # resumed from the checkpoint of step 2 or 4
  _assert_same_losses(resumed[0], losses[resumed[0][0][0] - 1:])
  with open(workdir / "metrics.jsonl") as f:  # written by process 0 alone, truncated on resume
    _assert_same_losses([(r["step"], r["loss"]) for r in map(json.loads, f)], losses)

  assert checkpoint.stage_finished(workdir)
  a = checkpoint.load_params(tmp_path / "one" / "model" / "params")
  b = checkpoint.load_params(workdir / "model" / "params")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
  assert reference["step"] == STEPS
