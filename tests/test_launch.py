"""launch/*.sh without a cloud: --help, the commands --dry-run prints (parsed back with shlex, so
the quoting is checked, not just the text), per-stage flags, and stages.sh's skip of finished
stages and stop at a preempted one, with a stand-in python."""
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["3s", "9s", "18s", "30s", "63s"]
ODD = "--config.note=it's a \"test\" $HOME"  # a train flag that quoting must carry whole


def _script(name, *args, env=None):
  result = subprocess.run([os.path.join(REPO, "launch", name), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=60)
  return result


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["stages.sh", "tpu_vm.sh", "slurm.sh"])
def test_help_and_bad_arguments(name):
  result = _script(name, "--help")
  assert result.returncode == 0 and "--dry-run" in result.stdout
  assert _script(name, "--no-such-option").returncode == 2


def test_stages_dry_run_chains_the_stages_with_per_stage_flags():
  result = _script("stages.sh", "--dry-run", "--distributed",
                   "--stage-flags=63s:--config.mesh.context=8 --config.mesh.fsdp=-1",
                   "--stage-env=63s:LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1",
                   "gs://bucket/run 1", "gs://bucket/latents", "--", ODD)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert len(commands) == 5
  previous = ""
  for stage, cmd in zip(STAGES, commands):
    env = cmd[:cmd.index("python")]
    train = cmd[cmd.index("python"):]
    assert train[:3] == ["python", "-m", "ttt_jax.train"]
    assert train[3:8] == [f"--config=configs/tomjerry_{stage}.py",
                          f"--workdir=gs://bucket/run 1/{stage}",
                          f"--config.data.latents=gs://bucket/latents/{stage}",
                          f"--config.init_from={previous}", "--distributed"]
    mesh = ["--config.mesh.context=8", "--config.mesh.fsdp=-1"] if stage == "63s" else []
    assert train[8:] == mesh + [ODD]
    assert env == (["env", "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1"] if stage == "63s" else [])
    previous = f"gs://bucket/run 1/{stage}"
  # A later start: init_from is still the stage before it in the chain.
  result = _script("stages.sh", "--dry-run", "--runlocal", "--stages=18s,30s", "r", "l")
  first = _commands(result.stdout)[0]
  assert first[3:7] == ["--config=configs/tomjerry_18s.py:runlocal", "--workdir=r/18s",
                        "--config.data.latents=l/18s", "--config.init_from=r/9s"]
  assert _script("stages.sh", "--stages=4s", "r", "l").returncode == 2


# Stands in for python: `-m ttt_jax.checkpoint DIR` answers from DIR/FINISHED (what the real one
# reads from the Orbax metadata), `-m ttt_jax.train` logs its workdir and finishes it, except the
# stage named in $PREEMPT (it "exits 0 at a preemption" without finishing).
_FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$2" = ttt_jax.checkpoint ]; then test -f "$3/FINISHED"; exit; fi
for a in "$@"; do case "$a" in --workdir=*) w=${a#*=} ;; esac; done
echo "$w" >> "$LOG"
mkdir -p "$w"
case "$w" in */"$PREEMPT") ;; *) touch "$w/FINISHED" ;; esac
"""


def test_stages_skips_finished_stages_and_stops_at_a_preempted_one(tmp_path):
  fake = tmp_path / "python"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(0o755)
  root, log = tmp_path / "run", tmp_path / "log"
  for stage in ("3s", "9s"):  # finished before
    (root / stage).mkdir(parents=True)
    (root / stage / "FINISHED").touch()
  env = {"PYTHON": str(fake), "LOG": str(log), "PREEMPT": "30s"}
  result = _script("stages.sh", str(root), str(tmp_path / "latents"), env=env)
  assert result.returncode == 0, result.stderr
  assert log.read_text().split() == [str(root / "18s"), str(root / "30s")]
  assert "stage 3s: finished" in result.stdout and "stage 9s: finished" in result.stdout
  assert "stage 30s stopped before its last step" in result.stderr
  log.unlink()
  env["PREEMPT"] = "none"
  assert _script("stages.sh", str(root), str(tmp_path / "latents"), env=env).returncode == 0
  assert log.read_text().split() == [str(root / "30s"), str(root / "63s")]


def _option(cmd, name):
  return next(a.split("=", 1)[1] for a in cmd if a.startswith(name + "="))


def test_tpu_vm_dry_run_queues_copies_installs_once_and_runs_on_every_worker():
  sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                       cwd=REPO).stdout.strip()
  result = _script("tpu_vm.sh", "--dry-run", "--name=ttt", "--zone=us-east5-a", "--create",
                   "--accelerator=v5p-256", "--runtime=v2-alpha-tpuv5", "--", "gs://b/run",
                   "gs://b/latents", "--stage-env=63s:LIBTPU_INIT_ARGS=--xla_a=1 --xla_b", "--",
                   ODD)
  assert result.returncode == 0, result.stderr
  create, describe, archive, scp, install, start, stream = _commands(result.stdout)
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
          "--zone=us-east5-a", "--node-id=ttt"} <= set(create)
  assert describe[4] == "describe"
  assert archive == ["git", "archive", "--format=tar.gz", "-o", f"/tmp/ttt-jax-{sha}.tar.gz", sha]
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  code = f"~/ttt-jax-{sha}"
  install_cmd = _option(install, "--command")
  assert f"if [ ! -f {code}/.installed ]" in install_cmd
  assert f"pip install -q -e {code}'[tpu]'" in install_cmd and "--worker=all" in install
  # The remote shell sees launch/stages.sh with exactly the arguments given.
  remote = _option(start, "--command")
  words = shlex.split(remote.split("launch/stages.sh", 1)[1].split(">", 1)[0])
  assert words == ["--distributed", "gs://b/run", "gs://b/latents",
                   "--stage-env=63s:LIBTPU_INIT_ARGS=--xla_a=1 --xla_b", "--", ODD]
  assert "--worker=all" in start and "--worker=0" in stream
  assert "tail" in _option(stream, "--command")
  assert _script("tpu_vm.sh", "--dry-run", "--name=t", "--zone=z", "--create", "--",
                 "r", "l").returncode == 2  # --create without --accelerator/--runtime


@pytest.mark.parametrize("tasks,per_node,devices", [
    ("gpu", "8", []), ("node", "1", ["--local-device-ids=0,1,2,3,4,5,6,7"])])
def test_slurm_dry_run_submits_the_chain_with_one_task_per_gpu_or_node(tasks, per_node, devices):
  result = _script("slurm.sh", "--dry-run", "--nodes=32", f"--tasks={tasks}",
                   "--partition=h100", "--", "/shared/run", "/shared/latents", "--", ODD)
  assert result.returncode == 0, result.stderr
  [sbatch] = _commands(result.stdout)
  assert sbatch[0] == "sbatch"
  assert {"--nodes=32", f"--ntasks-per-node={per_node}", "--gpus-per-node=8",
          "--partition=h100"} <= set(sbatch)
  srun = shlex.split(_option(sbatch, "--wrap"))
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
  inner = shlex.split(srun[4])
  assert inner == ["exec", "launch/stages.sh", "--distributed", *devices, "/shared/run",
                   "/shared/latents", "--", ODD]
