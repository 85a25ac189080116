"""Weight import CLI: one subcommand per source model.

  python -m ttt_jax.convert cogvideox --src DIR --dst DIR [--mixer ttt_mlp] [--seed 0]

`cogvideox` reads a diffusers CogVideoXTransformer3DModel folder (the `transformer/` folder of
THUDM/CogVideoX-5b) and writes `DST/params` (Orbax) and `DST/config.json`.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from ttt_jax.models import dit_convert


def _cogvideox(args: argparse.Namespace) -> None:
  overrides = {"mixer": args.mixer}
  if args.mixer_options:
    overrides["mixer_options"] = tuple(sorted(json.loads(args.mixer_options).items()))
  cfg = dit_convert.convert_cogvideox(args.src, args.dst, seed=args.seed, **overrides)
  print(f"wrote {args.dst}: {cfg.num_layers} layers, width {cfg.width}, mixer {cfg.mixer}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  cog = sub.add_parser("cogvideox", help="diffusers CogVideoX transformer -> DiT params")
  cog.add_argument("--src", required=True, help="diffusers transformer folder")
  cog.add_argument("--dst", required=True, help="output folder (DST/params must not exist)")
  cog.add_argument("--mixer", default="none", help="sequence mixer added to every block")
  cog.add_argument("--mixer_options", default="",
                   help='JSON dict of extra build_mixer arguments, e.g. \'{"mini_batch_size": 64}\'')
  cog.add_argument("--seed", type=int, default=0, help="init seed of the new parameters")
  cog.set_defaults(run=_cogvideox)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
