"""Meshes and logical-axis rules (see mesh.py)."""
from ttt_jax.parallel.mesh import (DEFAULT_RULES, MESH_AXES, activation_rules, activation_sharding,
                                   compile_platform, constrain, logical_to_spec, make_mesh,
                                   sequence_to_heads, shard_module, state_shardings)
