"""Stage 18 s of the Tom-and-Jerry context extension. `configs/tomjerry_18s.py:runlocal` for CPU."""
from configs.tomjerry_common import stage_config


def get_config(arg=None):
  return stage_config(18, arg)
