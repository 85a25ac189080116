"""The TTT core, pure functions: the inner model (inner.py), the written-out dual step
(dual.py) and the scan over a sequence (scan.py). The NNX layer around them is
ttt_jax/mixers/ttt.py."""
from ttt_jax.ttt.inner import INNER_MODELS, init_params
from ttt_jax.ttt.scan import IMPLS, ttt_scan
