"""ttt-jax. A `python -m ttt_jax.<command>` process restarts here, before its command imports
JAX, once with huge pages where they help (`cli.huge_pages`): restarting later, in
`cli.run_absl`, had imported everything twice (2 s more a command)."""
from ttt_jax import cli as _cli

_cli.huge_pages()
