"""Stage 63 s of the Tom-and-Jerry context extension. `configs/tomjerry_63s.py:runlocal` for CPU."""
from configs.tomjerry_common import stage_config


def get_config(arg=None):
  return stage_config(63, arg)
