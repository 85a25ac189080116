"""The ahead-of-time plan of a stage for a TPU slice: `python -m ttt_jax.plan` (its docstring
has the flags, keys and the measured numbers), kept under this name for older notes.

  JAX_PLATFORMS=cpu python bench/aot_compile.py --config=configs/tomjerry_3s.py \
      --topology=v5p-128 --mesh.fsdp=64 --attention=chunked
"""
from ttt_jax import cli, plan

if __name__ == "__main__":
  cli.run_absl(plan.main)
