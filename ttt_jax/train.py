"""Staged fine-tuning of the video DiT on precomputed latents: the command.

  python -m ttt_jax.train --config=configs/tomjerry_3s.py[:runlocal] --workdir=DIR \
      [--config.data.latents=LATENTS_DIR] [--config.init_from=PREVIOUS_WORKDIR]
  python -m ttt_jax.train --config=configs/toy.py --workdir=DIR   # the whole toy job

A stage config reads a dataset written by `python -m ttt_jax.data.precompute`
(`config.data.latents`) with the deterministic loader (batch k depends only on the seed and k) and
trains one stage with the paper's recipe (../shared/PAPER.md, "Staged context extension"):
`ttt_jax.training.train`, whose loop.py says what lands in DIR, how a run resumes, hands off
from the previous stage, stops on SIGTERM and runs on many processes (`--distributed`). A config
with a `pipeline` (configs/toy.py) runs that whole job instead: `ttt_jax.toy_job.run`.
"""
from __future__ import annotations

import json

import jax
from absl import flags, logging
from ml_collections import config_flags

from ttt_jax import cli, toy_job, training
from ttt_jax.parallel import slices


def main(argv):
  """Runs the config's toy job or its one stage (printing its summary as one JSON line)."""
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config.get("pipeline"):  # the toy job: data parallel over the host's cores on a CPU
    toy_job.split_host_cpu(config.toy.get("cpu_devices", 0))
  if flags.FLAGS.distributed:  # multi-host (TPU pod, multi-node GPU): before any device use
    ids = flags.FLAGS.local_device_ids
    jax.distributed.initialize(local_device_ids=[int(i) for i in ids] if ids else None)
  # The config's layout for this TPU slice (mesh, remat, attention, TTT kernel), unless the
  # command line set those fields.
  name = slices.slice_name(jax.devices())
  layout = slices.apply_layout(config, name,
                               config_flags.get_override_values(flags.FLAGS["config"]))
  if layout:
    logging.info("layout for %s: %s", name, layout)
  if config.get("pipeline"):  # configs/toy.py: the whole toy job, not one stage
    toy_job.run(config, workdir)  # prints its own lines; the numbers are in summary.json
  else:
    print(json.dumps(training.train(config, workdir)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:runlocal]")
  flags.DEFINE_string("workdir", None, "output directory (resumed if it has checkpoints)")
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
  # Under SLURM, JAX gives each process the one GPU of its SLURM_LOCALID; a process per node
  # names all of them (launch/slurm.sh --tasks=node).
  flags.DEFINE_list("local_device_ids", None, "with --distributed: this process's local devices")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
