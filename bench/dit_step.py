"""DiT forward and train-step time per sequence mixer, and its growth with video length.

  python bench/dit_step.py                       # every mixer, 1 and 21 segments, tiny model
  python bench/dit_step.py --segments 1,3,6,10,21  # the paper's 3 s ... 63 s stages
  python bench/dit_step.py --mixers ttt_mlp,none --segments 1,3 --grid 8 --layers 4

One JSON object per case on stdout: mixer, segments, latent frames, tokens, attention
("local": per-segment, the paper's layout; "full": one attention over the whole video, the
quadratic reference), parameters, compile seconds, forward and train-step milliseconds
(median and min of --repeats; ttt_jax/step_timing.py). A train step is loss (MSE to a random target) + grad + optimizer update.
Mixers whose module cannot be imported are reported as {"mixer": ..., "skipped": reason}.

Each case runs in its own process. One that has not finished after --timeout_s seconds (compile
included) is killed and reported as {"mixer": ..., "segments": ..., "timeout_s": ...}, so a hang
(issue 18: jaxlib's CPU triangular solve deadlocking XLA's thread pool) costs a bounded time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from typing import Any

import jax
from flax import nnx

from ttt_jax import mixers
from ttt_jax.models.dit import DiT, DiTConfig
from ttt_jax.step_timing import time_dit


def run_case(cfg: DiTConfig, segments: int, args: argparse.Namespace) -> dict[str, Any]:
  model = DiT(cfg, rngs=nnx.Rngs(0))
  frames = 1 + (args.frames_per_segment - 1) * segments
  times = time_dit(model, batch=args.batch, frames=frames, segments=segments, height=args.grid,
                   width=args.grid, text_len=args.text_len, repeats=args.repeats,
                   optimizer=args.optimizer)
  tokens = segments * args.text_len + frames * (args.grid // cfg.patch_size) ** 2
  return dict(mixer=cfg.mixer, segments=segments, latent_frames=frames, tokens=tokens,
              attention="local" if cfg.local_attention else "full",
              params=mixers.count_params(model), **times,
              device=jax.devices()[0].platform)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixers", default=",".join(mixers.MIXERS))
  parser.add_argument("--segments", default="1,21",
                      help="segment counts; the paper's stages are 1,3,6,10,21")
  parser.add_argument("--full_attention", default=True, action=argparse.BooleanOptionalAction,
                      help="also time mixer 'none' with one attention over the whole video")
  parser.add_argument("--grid", type=int, default=4, help="latent height = width")
  parser.add_argument("--frames_per_segment", type=int, default=13)
  parser.add_argument("--text_len", type=int, default=8)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=16)
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
  parser.add_argument("--mixer_options", default="{}", help="JSON dict for build_mixer")
  parser.add_argument("--timeout_s", type=float, default=1800,
                      help="seconds a case may take, compile included, before it is killed")
  parser.add_argument("--case", type=int, default=None,
                      help="run only case number CASE, in this process (what each worker does)")
  args = parser.parse_args()

  base = DiTConfig(num_heads=args.heads, head_dim=args.head_dim, num_layers=args.layers,
                   in_channels=4, out_channels=4, text_embed_dim=32, time_embed_dim=32,
                   mixer_options=tuple(sorted(json.loads(args.mixer_options).items())))
  segment_counts = [int(s) for s in args.segments.split(",")]
  cases = [(dataclasses.replace(base, mixer=m), s)
           for m in args.mixers.split(",") for s in segment_counts]
  if args.full_attention:
    cases += [(dataclasses.replace(base, local_attention=False), s) for s in segment_counts]
  if args.case is not None:
    cfg, segments = cases[args.case]
    try:
      result = run_case(cfg, segments, args)
    except ImportError as e:
      result = dict(mixer=cfg.mixer, skipped=f"not importable: {e}")
    print(json.dumps(result), flush=True)
    return
  unavailable = set()
  for i, (cfg, segments) in enumerate(cases):
    if cfg.mixer in unavailable:
      continue
    try:
      # stderr passes through, so compiler warnings and tracebacks still show.
      worker = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", str(i)],
                              stdout=subprocess.PIPE, text=True, timeout=args.timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker.
      result = dict(mixer=cfg.mixer, segments=segments, timeout_s=args.timeout_s)
    else:
      lines = worker.stdout.strip().splitlines()
      if worker.returncode or not lines:
        result = dict(mixer=cfg.mixer, segments=segments, exit_code=worker.returncode)
      else:
        result = json.loads(lines[-1])
        if "skipped" in result:
          unavailable.add(cfg.mixer)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
