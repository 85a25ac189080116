"""What every command shares: one-line errors, config-override checks, atomic output folders.

Each entry point (`python -m ttt_jax.train | sample | convert | data.precompute`,
`python -m ttt_jax.data.builders.tomjerry_storyboard`) runs its work through `run_absl` or
`guard`. An error the user can fix — a bad flag, file, field, a dataset that does not fit the
config — is printed as ONE line, `python -m ttt_jax.train: error: <what and where>`, and the
command exits with status 1; `--verbose` re-raises it with its traceback. Errors outside
`USER_ERRORS` are bugs and keep their traceback. The library raises these errors with messages
that name the file, flag, segment or field; this module only decides how they are shown.

A `python -m ttt_jax.<command>` process restarts once, when the package is imported, with
transparent huge pages for its large allocations (`huge_pages`, called by ttt_jax/__init__.py).

A training run stopped by SIGTERM (preemption) raises `Preempted` once its checkpoint is saved:
shown as one line saying how to resume, exit status 0.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import uuid
from typing import Any, Callable, Iterator, NoReturn, Sequence

# The errors the project raises for bad input (ValueError covers StoryboardError,
# AnnotationError, VideoError, JSONDecodeError and Orbax's restore errors; OSError covers missing
# or unwritable files).
USER_ERRORS = (ValueError, OSError, FloatingPointError)
# Long enough for a list of mismatched parameters, short enough to stay one terminal paragraph.
_MAX_MESSAGE = 2000


class Preempted(Exception):
  """Training stopped on SIGTERM (or a multi-host preemption sync point) after saving step
  `step` to `checkpoint_dir`; rerunning the same command resumes there."""

  def __init__(self, step: int, checkpoint_dir: str, signal_name: str):
    super().__init__(f"stopped by {signal_name} at step {step}; checkpoint saved in "
                     f"{checkpoint_dir}")
    self.step, self.checkpoint_dir = step, checkpoint_dir


def one_line(error: BaseException) -> str:
  """The error's message on one line (whitespace runs, newlines included, become one space)."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ..."


def _command() -> list[str]:
  """['python', '-m', 'ttt_jax.train'] when run with -m, else ['python', SCRIPT]."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return ["python", "-m", spec.name] if spec and spec.name else ["python", sys.argv[0]]


def program_name() -> str:
  return shlex.join(_command())


def _fail(message: str) -> NoReturn:
  sys.stderr.write(f"{program_name()}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)


@contextlib.contextmanager
def guard(verbose: bool) -> Iterator[None]:
  """Runs a command's body: USER_ERRORS -> one line and exit 1 (re-raised if `verbose`);
  `Preempted` -> one line saying how to resume and exit 0."""
  try:
    yield
  except Preempted as e:
    sys.stderr.write(f"{program_name()}: {e}; resume with: "
                     f"{shlex.join(_command() + sys.argv[1:])}\n")
    sys.stderr.flush()
    sys.exit(0)
  except USER_ERRORS as e:
    if verbose:
      raise
    _fail(one_line(e))


@contextlib.contextmanager
def sigterm_received() -> Iterator[list[int]]:
  """Yields a list that gets the signal number when SIGTERM arrives (the loop checks it after
  each step). Not installed on multi-host runs, where JAX's preemption service owns SIGTERM and
  `reached_preemption` tells every host the same step, nor off the main thread."""
  import jax  # pylint: disable=g-import-not-at-top
  received: list[int] = []
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- absl commands

def _config_argument(argv: Sequence[str], name: str) -> str | None:
  """The value of --<name>=X or --<name> X in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_override(config: Any, path: str) -> str | None:
  """None if `path` (e.g. 'train.steps') names a field of `config`, else a message naming the
  missing key and its close neighbours (or every key at that level when none is close)."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = "config" + "".join(f".{p}" for p in done)
      close = difflib.get_close_matches(part, keys, n=5, cutoff=0.5)
      if close:
        hint = "did you mean " + " or ".join(f"{where}.{k}" for k in close) + "?"
      else:
        hint = f"{where} has: {', '.join(sorted(map(str, keys))) or 'no fields'}"
      return f"--config.{path}: {where} has no field {part!r}; {hint}"
    node, done = node[part], done + [part]
  return None


def _unknown_overrides(argv: Sequence[str]) -> str | None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  argument = _config_argument(argv, "config")
  if argument is None or "config" not in flags.FLAGS:
    return None
  try:
    config = flags.FLAGS["config"].parser.parse(argument)
  except Exception:  # pylint: disable=broad-except  # the flag's own error is then shown
    return None
  paths = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  problems = [m for m in (unknown_override(config, p) for p in paths) if m]
  return "; ".join(problems) or None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with every failure as one line (absl prints two; an override of a
  config key that does not exist is, from ml_collections, a 55-line AttributeError)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    message = one_line(e) if isinstance(e, flags.Error) else _unknown_overrides(argv)
    if message is None or "--verbose" in argv:
      raise
    _fail(message)


_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages(argv: Sequence[str] | None = None) -> None:
  """Restarts this `python -m ttt_jax.<command>` process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
  where that helps: Linux, glibc >= 2.35, transparent huge pages in `madvise` mode.

  Why: XLA's CPU runtime allocates each call's temporaries (110 MB for a toy 3 s train step)
  with malloc, which maps allocations over 32 MB afresh every time and the kernel zero-fills
  them 4 KiB at a time: 28k page faults a step. With the tunable, glibc asks for 2 MiB pages
  (450 faults): a toy 3 s step 99 -> 83 ms, a 9 s one 736 -> 673 ms (README, "The toy main
  job"). Nothing else changes. TTT_JAX_HUGE_PAGES=0 turns it off; a process started any other
  way (pytest, a notebook, `python -c`) is never restarted.
  """
  argv = list(sys.orig_argv if argv is None else argv)
  if (os.environ.get("TTT_JAX_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux")
      or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")
      or len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith("ttt_jax.")):
    return
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
      return
    with open(_THP_MODE) as f:
      if "[madvise]" not in f.read():  # "always" has them already; "never" cannot
        return
  except (OSError, ValueError):
    return
  tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), _TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})


def run_absl(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with one-line errors; defines --verbose."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "show the full traceback of an error")

  def guarded(argv):
    with guard(flags.FLAGS.verbose):
      return main(argv)

  app.run(guarded, flags_parser=parse_flags)


# ---------------------------------------------------------------------------- output folders

def check_output_dir(path: str, flag: str, *, overwrite: bool = False,
                     must_not_exist: Sequence[str] = ()) -> str:
  """Validates an output folder before any heavy work; returns its absolute path.

  Refuses a path that is a file, an existing non-empty folder (unless `overwrite`), a folder
  holding any of `must_not_exist`, and a parent folder that cannot be written.
  """
  if not path:
    raise ValueError(f"{flag} is empty")
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag} {path} is a file, expected a folder")
  if os.path.isdir(path):
    entries = sorted(os.listdir(path))
    clash = [e for e in must_not_exist if e in entries]
    if clash:
      raise FileExistsError(f"{flag} {path} already holds {clash}; choose another folder or "
                            "remove them")
    if entries and not overwrite:
      shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
      raise FileExistsError(f"{flag} {path} exists and is not empty ({shown}); pass "
                            "--overwrite to replace it, or choose another folder")
  parent = os.path.dirname(path)
  while not os.path.isdir(parent):  # the nearest existing ancestor is where makedirs writes
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"{flag} {path}: cannot write in {parent}")
  return path


@contextlib.contextmanager
def atomic_output_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a new sibling folder `<path>.incomplete-<id>` to write into; on success renames it to
  `path` (an existing `path` is removed only after the new one is in place, and only if
  `overwrite` or it is empty), on any error removes it. A crash never leaves a half-written
  result, nor mixes new files with old ones, under `path`."""
  path = os.path.abspath(path)
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (pass --overwrite to replace it)")
  # A sibling, so the final rename stays on one filesystem; makedirs, not mkdtemp, so the result
  # gets the umask's permissions rather than 0700.
  tmp = f"{path}.incomplete-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(path):
      old = f"{path}.old-{uuid.uuid4().hex[:8]}"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
