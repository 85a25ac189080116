"""The paper's comparison at toy scale: every sequence mixer through the same staged schedule.

  python -m ttt_jax.ablate --config=configs/toy.py --workdir=runs/ablation \
      [--mixers=none,swa,mamba2,gated_deltanet,ttt_linear,ttt_mlp] [--seeds=0] \
      [--num_storyboards=N] [--step_segments=N] [--verbose]

For each mixer and seed, the toy job (`python -m ttt_jax.train --config=CONFIG,mixer=NAME
--config.seed=SEED`, configs/mixers.py's options; everything else in the stages stays) trains in
WORKDIR/runs/<mixer>_seed<seed> and `python -m ttt_jax.evaluate` scores it on held-out storyboards
(the same ones and the same sampling noise for every run). Then, in this process, one after the
other, each mixer's train step at the last stage's length (63 s: 21 segments) is timed
(ttt_jax/step_timing.py, the toy's DiT and batch, random data), with local attention ("none")
always among them, as the paper reports step time against it.

Resuming: a run with summary.json is finished and skipped, one without resumes where its toy job
stopped (the job skips what it finished and resumes training from its checkpoints); an evaluation
with eval.json is kept; step times are kept while they cover the mixers at the same length. The
runs of one seed share the pieces that do not depend on the mixer (toy_toons data, tokenizer and
text encoder, autoencoder, precomputed latents): a new run links them from a finished run of its
seed instead of rebuilding them, and starts from copies of that run's first stages while their
configs are the same for both mixers (configs/toy.py's image and 3 s stages have no mixer).

WORKDIR gets ablation.json and ablation.md (one row per mixer: persistence, text following, frame
quality as mean ± half the range of the per-seed means [95% bootstrap interval over all videos],
the judge's average Elo, the last stage's final loss, the 63 s step time and its ratio to local
attention), ablation.png (persistence per segment, one line per mixer), prefs.jsonl and elo.json
(ttt_jax/elo.py's judge mode over the runs' eval.json, one storyboard per seed and story).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import ml_collections
import numpy as np

from ttt_jax import cli, elo, evaluate, toy_job

REFERENCE = "none"  # local attention only: what step times are relative to
_SHARED = ("data", "text", "vae", "latents")  # toy job pieces that do not depend on the mixer


def _split_spec(spec: str) -> tuple[str, str]:
  path, _, arg = spec.partition(":")
  if not path.endswith(".py") or not os.path.isfile(path):
    raise ValueError(f"--config {spec}: expected a config file, e.g. configs/toy.py[:runlocal]")
  if any(item.strip().startswith("mixer=") for item in arg.split(",")):
    raise ValueError(f"--config {spec}: leave mixer= out, --mixers chooses the mixers")
  return path, arg


def _with_mixer(arg: str, mixer: str) -> str:
  return ",".join([a for a in (arg,) if a] + [f"mixer={mixer}"])


def load_config(spec: str, mixer: str) -> ml_collections.ConfigDict:
  """The config of file[:arguments] `spec` with `mixer=<mixer>` added to its arguments."""
  path, arg = _split_spec(spec)
  module_spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(_with_mixer(arg, mixer))
  if not config.get("pipeline"):
    raise ValueError(f"--config {spec}: ablate runs the toy job, a config with config.pipeline "
                     "(configs/toy.py)")
  return config


def run_dir(workdir: str, mixer: str, seed: int) -> str:
  return os.path.join(workdir, "runs", f"{mixer}_seed{seed}")


def _share_inputs(spec: str, workdir: str, run: str, mixer: str, seed: int) -> None:
  """Links the mixer-independent pieces of a finished run of `seed` into a new `run`, and copies
  its first stages as long as their configs are the same for both mixers: configs/toy.py's image
  and 3 s stages train the backbone without a mixer whatever the mixer, so they are the same
  training, and the new run skips them (copies, not links: a finished stage re-exports its
  model)."""
  if os.path.exists(run):
    return
  runs = os.path.join(workdir, "runs")
  suffix = f"_seed{seed}"
  done = [d for d in sorted(os.listdir(runs)) if d.endswith(suffix)
          and os.path.isfile(os.path.join(runs, d, "summary.json"))] if os.path.isdir(runs) else []
  os.makedirs(run)
  if not done:
    return
  source = os.path.join(runs, done[0])
  for piece in _SHARED:
    os.symlink(os.path.realpath(os.path.join(source, piece)), os.path.join(run, piece))
  stages = lambda m: [stage for _, stage in toy_job.stage_configs(load_config(spec, m))]
  for stage, theirs in zip(stages(mixer), stages(done[0][:-len(suffix)])):
    if stage.to_json() != theirs.to_json():
      break
    shutil.copytree(os.path.join(source, "stages", stage.stage),
                    os.path.join(run, "stages", stage.stage), symlinks=True)


def train_run(spec: str, mixer: str, seed: int, workdir: str) -> str:
  """Runs (or resumes, or skips when finished) the toy job of one mixer and seed."""
  run = run_dir(workdir, mixer, seed)
  if os.path.isfile(os.path.join(run, "summary.json")):
    print(f"[ablate] {mixer} seed {seed}: finished, skipped", flush=True)
    return run
  _share_inputs(spec, workdir, run, mixer, seed)
  path, arg = _split_spec(spec)
  command = [sys.executable, "-m", "ttt_jax.train", f"--config={path}:{_with_mixer(arg, mixer)}",
             f"--config.seed={seed}", f"--workdir={run}"]
  print(f"[ablate] {mixer} seed {seed}: {' '.join(command[1:])}", flush=True)
  # Lines pass through (a notebook shows them; a child writing to our stdout would not), the
  # progress bars' redraws do not.
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        bufsize=1) as child:
    for line in child.stdout:
      if line.strip() and "it/s" not in line and "s/it" not in line:
        print(f"  {line.rstrip()}", flush=True)
  if child.returncode:
    raise ChildProcessError(f"the toy job of mixer {mixer} seed {seed} failed (exit "
                            f"{child.returncode}); log: {os.path.join(run, 'log.txt')}; rerun "
                            "to resume")
  return run


def evaluate_run(run: str, num_storyboards: int) -> dict[str, Any]:
  path = os.path.join(run, "eval", "eval.json")
  if not os.path.isfile(path):
    evaluate.run(run, num_storyboards=num_storyboards)  # its logs go to the run's log.txt
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def step_times(spec: str, mixers: list[str], segments: int, repeats: int,
               path: str) -> dict[str, Any]:
  """{mixer: {"train_step_ms", "forward_ms", "compile_s", "params", "vs_none"}} at `segments`
  (0: the last stage's), measured one mixer after the other in this process; kept in `path`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ttt_jax import training  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.features import latent_frames, model_temporal_compression  # pylint: disable=g-import-not-at-top
  from ttt_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  from ttt_jax.step_timing import time_dit  # pylint: disable=g-import-not-at-top

  wanted = [REFERENCE] + [m for m in mixers if m != REFERENCE]
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      kept = json.load(f)
    if (kept["segments_asked"] == segments and kept["repeats"] == repeats
        and set(wanted) <= set(kept["mixers"])):
      return kept
  times = {}
  for mixer in wanted:
    stages = load_config(spec, mixer).stages
    stage = max(stages.values(), key=lambda s: s.segments)  # the last, longest stage
    length = segments or stage.segments
    model = DiT(training.dit_config(stage), rngs=nnx.Rngs(0))
    frames = latent_frames(length, stage.fps, model_temporal_compression(stage))
    times[mixer] = time_dit(
        model, batch=stage.train.batch_size, frames=frames,
        segments=length, height=stage.model.sample_height, width=stage.model.sample_width,
        text_len=stage.text.max_length, repeats=repeats)
    times[mixer]["params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    print(f"[ablate] {mixer}: train step at {3 * length} s {times[mixer]['train_step_ms']:.0f} ms",
          flush=True)
  for t in times.values():
    t["vs_none"] = round(t["train_step_ms"] / times[REFERENCE]["train_step_ms"], 3)
  out = {"segments_asked": segments, "segments": length, "repeats": repeats, "mixers": times}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  return out


def _metric_row(evals: list[dict[str, Any]], metric: str) -> dict[str, float]:
  pooled = evaluate.summarise([s for e in evals for s in e["storyboards"]])[metric]
  per_seed = [e["metrics"][metric]["mean"] for e in evals]
  return {"mean": pooled["mean"], "spread": (max(per_seed) - min(per_seed)) / 2,
          "lo": pooled["lo"], "hi": pooled["hi"], "per_seed": per_seed}


def _judge(evals: dict[str, list[dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
  """Judge records over all mixers, per seed; storyboards named seed<s>/<story>."""
  records = []
  for i, seed in enumerate(seeds):
    for r in elo.judge({m: e[i] for m, e in evals.items()}):
      records.append({**r, "storyboard": f"seed{seed}/{r['storyboard']}"})
  return records


def _cell(m: dict[str, float]) -> str:
  return f"{m['mean']:.3f} ± {m['spread']:.3f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def write_markdown(result: dict[str, Any], path: str) -> None:
  steps = result["step_times"]
  lines = [
      f"Toy ablation: `{result['command']}`", "",
      f"{len(result['seeds'])} seed(s) x {result['storyboards']} held-out storyboards per run. "
      "Scores: mean over all videos ± half the range of the per-seed means "
      f"[{round(100 * result['confidence'])}% bootstrap interval over videos]. Elo: the "
      "automatic metrics as judge, average over axes. Step: one train step of the last stage's "
      f"model at {3 * steps['segments']} s, median of {steps['repeats']}, this machine.", "",
      "| mixer | persistence | text following | frame quality | Elo | final loss | "
      "step (ms) | × none |",
      "|---|---|---|---|---|---|---|---|"]
  for row in result["table"]:
    lines.append(f"| {row['mixer']} | {_cell(row['persistence'])} | "
                 f"{_cell(row['text_following'])} | {_cell(row['frame_quality'])} | "
                 + (f"{row['elo']['elo']:.0f} [{row['elo']['lo']:.0f}, {row['elo']['hi']:.0f}]"
                    if row["elo"] else "–")
                 + f" | {row['final_loss']:.3f} | {row['train_step_ms']:.0f} | "
                 f"{row['vs_none']:.2f} |")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def run(spec: str, workdir: str, mixers: list[str], seeds: list[int], *,
        num_storyboards: int = 0, step_segments: int = 0, step_repeats: int = 3
        ) -> dict[str, Any]:
  """Trains, evaluates and times every mixer (module docstring); returns ablation.json."""
  if not mixers or not seeds:
    raise ValueError("--mixers and --seeds each need at least one value")
  for mixer in mixers:
    load_config(spec, mixer)  # an unknown mixer or a bad config fails before any training
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  # Every toy job first, each in a process of its own; only then JAX in this one (evaluation,
  # step times), so that no process is forked from a multithreaded JAX runtime.
  runs = {m: [train_run(spec, m, seed, workdir) for seed in seeds] for m in mixers}
  evals = {m: [evaluate_run(r, num_storyboards) for r in runs[m]] for m in mixers}
  final_loss = {}
  for m in mixers:
    final_loss[m] = []
    for r in runs[m]:
      with open(os.path.join(r, "summary.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
      final_loss[m].append(stages[list(stages)[-1]]["last_loss"])
  steps = step_times(spec, mixers, step_segments, step_repeats,
                     os.path.join(workdir, "step_times.json"))
  elo_out = {}
  if len(mixers) > 1:
    records = _judge(evals, seeds)
    elo.write_records(os.path.join(workdir, "prefs.jsonl"), records)
    elo_out = elo.ratings(records)
    with open(os.path.join(workdir, "elo.json"), "w", encoding="utf-8") as f:
      json.dump(elo_out, f, indent=2)
  table = [{"mixer": m, **{k: _metric_row(evals[m], k) for k in evaluate.METRICS},
            "elo": elo_out.get(elo.AVERAGE, {}).get(m),
            "final_loss": float(np.mean(final_loss[m])),
            **{k: steps["mixers"][m][k] for k in ("train_step_ms", "vs_none", "params")}}
           for m in mixers]
  result = {"command": cli.program_name() + f" --config={spec} --workdir=DIR --mixers="
                       f"{','.join(mixers)} --seeds={','.join(map(str, seeds))}",
            "seeds": seeds, "storyboards": len(evals[mixers[0]][0]["storyboards"]),
            "confidence": evals[mixers[0]][0]["confidence"], "table": table,
            "step_times": steps}
  with open(os.path.join(workdir, "ablation.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  write_markdown(result, os.path.join(workdir, "ablation.md"))
  evaluate.plot_per_segment(
      {m: evaluate.summarise([s for e in evals[m] for s in e["storyboards"]])[
          "persistence"]["per_segment"] for m in mixers},
      os.path.join(workdir, "ablation.png"), ylabel="persistence",
      title=f"persistence by segment, {len(seeds)} seed(s), {result['storyboards']} storyboards")
  return result


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    seeds = [int(s) for s in f.seeds]
  except ValueError as e:
    raise ValueError(f"--seeds={','.join(f.seeds)}: expected integers, e.g. --seeds=0,1") from e
  run(f.config, f.workdir, list(f.mixers), seeds, num_storyboards=f.num_storyboards,
      step_segments=f.step_segments, step_repeats=f.step_repeats)
  with open(os.path.join(os.path.abspath(f.workdir), "ablation.md"), encoding="utf-8") as md:
    print(md.read())


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ttt_jax import mixers  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "the toy job's config file[:arguments], without mixer=")
  flags.DEFINE_string("workdir", None, "where the runs and the table go (resumed)")
  flags.DEFINE_list("mixers", list(mixers.MIXERS), "mixers to compare (configs/mixers.py)")
  flags.DEFINE_list("seeds", ["0"], "training seeds (config.seed), one run per mixer and seed")
  flags.DEFINE_integer("num_storyboards", 0, "held-out storyboards per run (0: the test split)")
  flags.DEFINE_integer("step_segments", 0, "length of the timed step (0: the last stage's)")
  flags.DEFINE_integer("step_repeats", 3, "timed steps per mixer (the median is reported)")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
