"""Sequence mixers behind one interface: none, sliding-window attention, Mamba-2, Gated DeltaNet,
TTT-Linear and TTT-MLP. See `build_mixer`."""
from ttt_jax.mixers.registry import MIXERS, build_mixer, count_params, matched_options

__all__ = ["MIXERS", "build_mixer", "count_params", "matched_options"]
