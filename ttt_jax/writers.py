"""clu metric writers and periodic actions, without TensorFlow.

clu 0.0.12 imports TensorFlow in `clu.metric_writers` (for its TensorBoard `SummaryWriter`), and
`clu.periodic_actions` imports that package. We keep TensorFlow out of the training process, so
when it is not installed, `clu.metric_writers.summary_writer` is provided here: the same
`SummaryWriter(logdir)` interface, writing TensorBoard event files through tensorboardX. With
TensorFlow installed, clu's own writer is used. Import clu from this module:

    from ttt_jax.writers import metric_writers, periodic_actions, parameter_overview

Training's own: `jsonl_log` (metrics.jsonl, one line a step) and `StepMetrics` (metrics kept on
the devices, copied and checked for NaN every log_every steps).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from etils import epath


def _install() -> None:
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return
  # The package __init__ imports SummaryWriter from this module: a placeholder lets it load,
  # then the real class (which needs clu's interface module) replaces it everywhere.
  stub = types.ModuleType(name)
  stub.SummaryWriter = None
  sys.modules[name] = stub
  from clu import metric_writers as mw  # pylint: disable=g-import-not-at-top
  from clu.metric_writers import interface  # pylint: disable=g-import-not-at-top
  from clu.metric_writers import utils  # pylint: disable=g-import-not-at-top

  class SummaryWriter(interface.MetricWriter):
    """TensorBoard event files via tensorboardX; clu's SummaryWriter interface."""

    def __init__(self, logdir: str):
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir=str(logdir))

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None):
      del metadata
      for key, value in values.items():
        self._writer.add_scalar(key, float(value), step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(value), step)

    def write_images(self, step: int, images: Mapping[str, Any]):
      for key, value in images.items():  # [N, H, W, C]
        self._writer.add_images(key, value, step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
      for key, value in videos.items():  # [N, T, H, W, C] uint8
        self._writer.add_video(key, value.transpose(0, 1, 4, 2, 3), step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
      for key, value in audios.items():
        self._writer.add_audio(key, value, step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
      for key, value in texts.items():
        self._writer.add_text(key, value, step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None):
      for key, value in arrays.items():
        bins = (num_buckets or {}).get(key, "tensorflow")
        self._writer.add_histogram(key, value, step, bins=bins)

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
      del point_colors, configs
      for key, value in point_clouds.items():
        self._writer.add_mesh(key, vertices=value[None], global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
      self._writer.add_hparams({k: v for k, v in hparams.items()
                                if isinstance(v, (bool, int, float, str))}, {},
                                name="hparams")

    def flush(self):
      self._writer.flush()

    def close(self):
      self._writer.close()

  stub.SummaryWriter = mw.SummaryWriter = utils.SummaryWriter = SummaryWriter


_install()

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers, parameter_overview, periodic_actions  # noqa: E402

__all__ = ["metric_writers", "parameter_overview", "periodic_actions", "jsonl_log",
           "StepMetrics"]


@contextlib.contextmanager
def jsonl_log(path: epath.Path, first_step: int):
  """Yields write(record) appending one JSON line per step to `path`, from process 0 only (the
  others get a no-op: one writer, no race on shared storage). Lines of earlier runs are kept up
  to step `first_step` (the restored checkpoint; 0: none), dropping those the checkpoint had not
  reached and a last line a hard kill cut short. The file is rewritten once and then held open:
  gs:// objects cannot be appended to (there, lines reach the bucket when the upload buffer
  fills and when the run ends)."""
  if jax.process_index() > 0:
    yield lambda record: None
    return

  def keep(line):
    try:
      return json.loads(line)["step"] <= first_step
    except (ValueError, KeyError, TypeError):
      return False

  kept = ([l + "\n" for l in path.read_text().splitlines() if l.strip() and keep(l)]
          if first_step and path.exists() else [])
  with path.open("w") as f:
    f.writelines(kept)
    f.flush()

    def write(record):
      f.write(json.dumps(record) + "\n")
      f.flush()

    yield write


class StepMetrics:
  """Each step's metrics stay on the devices until `flush` copies the steps since the last one
  to the host at once (as big_vision does: no host sync per step), checks them for NaN and inf,
  and writes them: metrics.jsonl (every step), the clu writer (every log_every steps, the last)
  and on_step(step, total, metrics). `mngr` (the run's CheckpointManager) names the last good
  checkpoint in the error; progress["steps_done"] counts the steps found finite."""

  def __init__(self, write_jsonl, writer, train: ml_collections.ConfigDict, mngr,
               progress: dict[str, Any], on_step):
    self.write_jsonl, self.writer, self.mngr = write_jsonl, writer, mngr
    self.log_every, self.total = int(train.log_every), int(train.steps)
    self.progress, self.on_step = progress, on_step
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.last: dict[str, float] = {}

  def add(self, done: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((done, metrics))
    if done % self.log_every == 0 or done == self.total:
      self.flush()

  def flush(self) -> None:
    """Raises FloatingPointError at the first step whose loss or gradient norm is not finite."""
    steps, self.pending = self.pending, []
    for (done, _), values in zip(steps, jax.device_get([m for _, m in steps])):
      values = {k: float(v) for k, v in values.items()}
      if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
        self.mngr.wait_until_finished()
        good = self.mngr.latest_step()
        raise FloatingPointError(
            f"step {done}: non-finite loss {values['loss']} or gradient norm "
            f"{values['grad_norm']}; stopped. Last good checkpoint: "
            f"{'none' if good is None else f'step {good}'} in {self.mngr.directory}")
      self.last = {"step": done, **values}
      self.progress["steps_done"] += 1
      self.write_jsonl(self.last)
      if done % self.log_every == 0 or done == self.total:
        self.writer.write_scalars(done, values)
      if self.on_step is not None:
        self.on_step(done, self.total, values)

