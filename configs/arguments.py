"""The one parser of config arguments, shared by every config (big_vision style).

`--config=configs/tomjerry_3s.py:runlocal,mixer=mamba2` hands "runlocal,mixer=mamba2" to that
file's get_config, which calls `parse_arguments(arg, runlocal=False, mixer="ttt_mlp")`:

  * items are separated by commas; `key=value` sets a key, a bare `key` sets a bool key to True;
  * the defaults name every key a config takes, and their types cast the values (a bool takes
    true/false, 1/0, yes/no in any case);
  * an unknown key or a bad value is a ValueError naming the argument and the known keys.
"""
from __future__ import annotations

from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _cast(key: str, raw: str, default: Any, arg: str) -> Any:
  if isinstance(default, bool):
    if raw.lower() in _TRUE + _FALSE:
      return raw.lower() in _TRUE
  else:
    try:
      return type(default)(raw)
    except ValueError:
      pass
  raise ValueError(f"config argument {key}={raw!r} in {arg!r} is not a "
                   f"{type(default).__name__}")


def _items(arg: str | None):
  """(key, has_value, raw value) of each non-empty item of `arg`."""
  for item in (arg or "").split(","):
    key, has_value, raw = (part.strip() for part in item.partition("="))
    if key or has_value:
      yield key, has_value, raw


def parse_arguments(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """`arg` ("runlocal,mixer=mamba2", "", or None) over `defaults` -> {key: value}."""
  values = dict(defaults)
  for key, has_value, raw in _items(arg):
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; this config takes "
                       f"{', '.join(sorted(defaults))}")
    if has_value:
      values[key] = _cast(key, raw, defaults[key], arg)
    elif isinstance(defaults[key], bool):
      values[key] = True
    else:
      raise ValueError(f"config argument {key!r} in {arg!r} needs a value ({key}=...)")
  return values


def given_arguments(arg: str | None) -> set[str]:
  """The keys `arg` names itself ("long,images=false" -> {"long", "images"}), where a config's
  default for one key depends on another (configs/toy.py: `:long` has no image stage unless
  asked)."""
  return {key for key, _, _ in _items(arg)}
