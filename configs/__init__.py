"""ml_collections configs: data, not logic. `configs/<name>.py:runlocal` is the CPU-sized variant."""
