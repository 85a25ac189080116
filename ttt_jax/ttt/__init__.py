"""The TTT core: pure functions (inner.py, scan.py) and the Flax NNX layer around them (layer.py)."""
from ttt_jax.ttt.inner import INNER_MODELS, init_params
from ttt_jax.ttt.scan import IMPLS, ttt_scan
from ttt_jax.ttt.layer import TTTLayer, apply_rope
