"""Plain-jax reproduction of issue 18: batched triangular solves deadlock XLA:CPU's thread pool.

  python bench/repro_gdn_hang.py                 # {"jax": ..., "hung": true, ...} on jax 0.10.2
  python bench/repro_gdn_hang.py --threads 1     # the same program finishes

Found on jax 0.10.2 / jaxlib 0.10.2, CPU, Linux x86_64, 2 cores. SNIPPET below is the whole
reproduction; this script runs it in a child process with XLA's intra-op pool fixed to --threads
(NPROC, which jaxlib reads for the pool size) and kills it after --timeout_s, so it never hangs
the caller. Exit status 0 either way; the JSON line says what happened.

Mechanism, from gdb on the hung process (both "tf_XLAEigen" pool threads and the caller):
  CustomCallThunk::Execute -> lapack_strsm_ffi -> TriMatrixEquationSolver::Kernel
    -> jax::ParallelBatchMap -> absl::BlockingCounter::Wait
`triangular_solve` on CPU lowers to jaxlib's LAPACK FFI kernel. When the batch is big enough
(batch * rows^2 * cols >= 2e5 flop) it splits the batch into tasks on the same intra-op pool
that XLA runs independent thunks on, then blocks that pool thread until the tasks finish. With
as many such solves running at once as the pool has threads, every thread waits for tasks that no
thread is free to run: zero CPU, forever. Nothing is specific to the gated delta rule; the DiT hit
it because its forward and reverse mixers each issue two batched solves that XLA runs
concurrently. ttt_jax.mixers.gated_deltanet now inverts with matmuls (unit_lower_inverse) and
issues no LAPACK call.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# 32 independent batched solves in one jit; at 2 pool threads this never returns.
SNIPPET = """
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
a = jnp.asarray(np.tril(rng.standard_normal((16, 64, 64)), -1) * 0.1, jnp.float32)
bs = tuple(jnp.asarray(rng.standard_normal((16, 64, 64)), jnp.float32) for _ in range(32))
solve = lambda b: jax.lax.linalg.triangular_solve(a, b, left_side=True, lower=True)
jax.block_until_ready(jax.jit(lambda bs: [solve(b) for b in bs])(bs))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--threads", type=int, default=2, help="XLA intra-op pool size (NPROC)")
  parser.add_argument("--timeout_s", type=float, default=60)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, NPROC=str(args.threads), JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  try:
    subprocess.run([sys.executable, "-c", SNIPPET], env=env, timeout=args.timeout_s, check=True)
    hung = False
  except subprocess.TimeoutExpired:  # subprocess.run has killed the child.
    hung = True
  print(json.dumps(dict(jax=jax.__version__, jaxlib=jaxlib.__version__, threads=args.threads,
                        hung=hung, seconds=round(time.perf_counter() - start, 1))))


if __name__ == "__main__":
  main()
