"""Weight import CLI: one subcommand per source model.

  python -m ttt_jax.convert cogvideox --src DIR --dst DIR [--mixer ttt_mlp] [--seed 0]
  python -m ttt_jax.convert vae --src DIR --dst DIR
  python -m ttt_jax.convert t5 --src DIR --dst DIR

`cogvideox` reads a diffusers CogVideoXTransformer3DModel folder (the `transformer/` folder of
THUDM/CogVideoX-5b) and writes `DST/params` (Orbax) and `DST/config.json`.

--dst (and --mixer, --mixer_options) are checked before any weight is read. An error is one line
naming the flag or file; --verbose shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from ttt_jax import cli


def _mixer_overrides(args: argparse.Namespace) -> dict:
  from ttt_jax.mixers.registry import MIXERS  # pylint: disable=g-import-not-at-top
  if args.mixer not in MIXERS:
    raise ValueError(f"--mixer {args.mixer!r}: expected one of {list(MIXERS)}")
  overrides = {"mixer": args.mixer}
  if args.mixer_options:
    try:
      options = json.loads(args.mixer_options)
    except ValueError as e:
      raise ValueError(f"--mixer_options {args.mixer_options!r} is not valid JSON ({e}); "
                       'expected an object, e.g. \'{"mini_batch_size": 64}\'') from e
    if not isinstance(options, dict):
      raise ValueError(f"--mixer_options {args.mixer_options!r}: expected a JSON object, got "
                       f"{type(options).__name__}")
    overrides["mixer_options"] = tuple(sorted(options.items()))
  return overrides


def _cogvideox(args: argparse.Namespace) -> None:
  from ttt_jax.models import dit_convert  # pylint: disable=g-import-not-at-top
  overrides = _mixer_overrides(args)
  cfg = dit_convert.convert_cogvideox(args.src, args.dst, seed=args.seed, **overrides)
  print(f"wrote {args.dst}: {cfg.num_layers} layers, width {cfg.width}, mixer {cfg.mixer}")


def _vae(args: argparse.Namespace) -> None:
  from ttt_jax.models import vae_convert
  vae_convert.convert_vae(args.src, args.dst)
  print(f"wrote {args.dst}")


def _t5(args: argparse.Namespace) -> None:
  from ttt_jax.models import t5_convert
  t5_convert.convert_t5(args.src, args.dst)
  print(f"wrote {args.dst}")


_DST_HELP = "output folder (DST/params and DST/config.json must not exist)"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  cog = sub.add_parser("cogvideox", help="diffusers CogVideoX transformer -> DiT params")
  cog.add_argument("--src", required=True, help="diffusers transformer folder")
  cog.add_argument("--dst", required=True, help=_DST_HELP)
  cog.add_argument("--mixer", default="none", help="sequence mixer added to every block")
  cog.add_argument("--mixer_options", default="",
                   help='JSON dict of extra build_mixer arguments, e.g. \'{"mini_batch_size": 64}\'')
  cog.add_argument("--seed", type=int, default=0, help="init seed of the new parameters")
  cog.set_defaults(run=_cogvideox)
  for name, help_text, fn in (
      ("vae", "diffusers AutoencoderKLCogVideoX folder -> VAE params", _vae),
      ("t5", "transformers T5EncoderModel folder -> text-encoder params", _t5)):
    cmd = sub.add_parser(name, help=help_text)
    cmd.add_argument("--src", required=True, help="source model folder")
    cmd.add_argument("--dst", required=True, help=_DST_HELP)
    cmd.set_defaults(run=fn)
  for cmd in sub.choices.values():
    cmd.add_argument("--verbose", action="store_true", help="show an error's full traceback")
  return parser


def _check(args: argparse.Namespace) -> None:
  """Everything about the flags that can be checked before reading weights."""
  if not os.path.isdir(args.src):
    raise FileNotFoundError(f"--src {args.src}: no such folder")
  # Other files in DST may stay; what the converter writes must not be there yet.
  cli.check_output_dir(args.dst, "--dst", overwrite=True,
                       must_not_exist=("params", "config.json"))
  if args.source == "cogvideox":
    _mixer_overrides(args)


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  with cli.guard(args.verbose):
    _check(args)
    args.run(args)


if __name__ == "__main__":
  main()
