"""Sequence mixers behind one interface: none, sliding-window attention, Mamba-2, Gated DeltaNet,
TTT-Linear and TTT-MLP. See `build_mixer`."""
from ttt_jax.mixers.common import count_params
from ttt_jax.mixers.registry import MIXERS, build_mixer, matched_options
from ttt_jax.mixers.ttt import TTTLayer

__all__ = ["MIXERS", "TTTLayer", "build_mixer", "count_params", "matched_options"]
