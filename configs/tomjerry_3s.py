"""Stage 3 s of the Tom-and-Jerry context extension. `configs/tomjerry_3s.py:runlocal` for CPU."""
from configs.tomjerry_common import stage_config


def get_config(arg=None):
  return stage_config(3, arg)
