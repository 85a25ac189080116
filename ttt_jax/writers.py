"""clu metric writers and periodic actions, without TensorFlow.

clu 0.0.12 imports TensorFlow in `clu.metric_writers` (for its TensorBoard `SummaryWriter`), and
`clu.periodic_actions` imports that package. We keep TensorFlow out of the training process, so
when it is not installed, `clu.metric_writers.summary_writer` is provided here: the same
`SummaryWriter(logdir)` interface, writing TensorBoard event files through tensorboardX. With
TensorFlow installed, clu's own writer is used. Import clu from this module:

    from ttt_jax.writers import metric_writers, periodic_actions, parameter_overview
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Mapping


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

__all__ = ["metric_writers", "parameter_overview", "periodic_actions"]
