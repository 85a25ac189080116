"""The training loader over a precomputed dataset (`ttt_jax.data.precompute`): deterministic,
resumable, random access, numpy only (no TensorFlow, no tf.data, no jax).

`batch(step)` is a pure function of (seed, step), so resuming at step s means asking for step s;
no iterator state is saved. The example stream is the concatenation of epoch permutations, epoch e
permuted by `np.random.default_rng([seed, e])`:
  - drop_remainder=False: step s takes stream positions [s * G, (s + 1) * G) (G: global batch),
    so a batch may straddle two epochs and every example appears exactly once per epoch;
  - drop_remainder=True: an epoch is n // G whole batches of its own permutation and the n % G
    examples left at its end are skipped (others each epoch), so no batch straddles epochs nor
    holds an example twice. When G divides n both agree with epoch e = s * G // n.
On many processes each reads only the rows of the global batch that its own devices hold:
`process_rows(sharding, G)` lists them from the batch sharding's addressable devices, and
`batch(step, rows)` reads those rows. Which rows a process holds depends on the mesh (a batch
shard's devices may sit on two hosts, or the batch may be replicated over hosts), so no fixed
slice per process index is right for every layout; the rows of a step stay the same in any case.

A latent sample is drawn per (seed, step, example): `(mean + exp(logvar / 2) * eps) * scaling`,
eps from `np.random.default_rng([seed, step, index, 1])`; the final 1 keeps these streams apart
from the permutations' (SeedSequence pads entropy with zeros, so [s, e] == [s, e, 0, 0]).
With `frames=k` each example is cut to k consecutive latent frames from a start drawn from
`np.random.default_rng([seed, step, index, 2])`: frames=1 turns a video dataset into one of its
keyframes (images; the toy's image phase), every keyframe equally likely.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

INFO_FILE = "precompute.json"
NULL_TEXT_FILE = "null_text_embeds.npy"
_NOISE_STREAM, _CROP_STREAM = 1, 2


def process_rows(sharding: Any, global_shape: Sequence[int]) -> np.ndarray:
  """The rows of a global batch [batch, ...] (`global_shape`) that this process's devices hold
  under `sharding` (a jax Sharding), sorted, int64 [rows]: the union of the leading-axis slices
  of `sharding.addressable_devices_indices_map`. Sorted is the order in which
  `jax.make_array_from_process_local_data(sharding, local, global_shape)` reads `local`'s rows.
  Only the leading axis of `global_shape` matters; the rest need only fit the sharding."""
  batch_size = int(global_shape[0])
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    rows.update(range(*(index[0] if index else slice(None)).indices(batch_size)))
  return np.array(sorted(rows), np.int64)


def decode_text(value) -> str:
  """A tfds Text value (bytes when read back) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LatentLoader:
  """Batches of a precomputed split.

  Args:
    dataset_dir: a directory written by `ttt_jax.data.precompute`.
    batch_size: the global batch, over all processes.
    seed: permutation and latent-noise seed (non-negative).
    shuffle: permute each epoch; False reads examples in dataset order.
    drop_remainder: see the module docstring.
    prefetch: batches `iterate` computes ahead in a background thread (0: none).
    frames: cut each example to this many consecutive latent frames at a random start (module
      docstring); None keeps them all.

  Attributes:
    info: the dataset's precompute.json.
    num_examples: examples in the dataset.
    null_text: float32 [max_length, d_model], the empty prompt's T5 embedding (text dropout).
    steps_per_epoch: batches per epoch (fractional without drop_remainder).

  Raises:
    FileNotFoundError: no precomputed dataset at dataset_dir.
    ValueError: empty dataset, or (with drop_remainder) a batch larger than the dataset, or
      `frames` not in [1, the dataset's latent frames].
  """

  def __init__(self, dataset_dir: str | os.PathLike, *, batch_size: int, seed: int,
               shuffle: bool = True, drop_remainder: bool = True, prefetch: int = 2,
               frames: int | None = None):
    dataset_dir = os.fspath(dataset_dir)
    info_path = os.path.join(dataset_dir, INFO_FILE)
    if not os.path.isfile(info_path):
      raise FileNotFoundError(f"no precomputed dataset at {dataset_dir!r} (no {INFO_FILE}; "
                              "write one with python -m ttt_jax.data.precompute)")
    with open(info_path) as f:
      try:
        self.info = json.load(f)
      except ValueError as e:
        raise ValueError(f"{info_path}: not valid JSON ({e})") from e
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.dataset_dir = dataset_dir
    try:
      self._source = tfds.builder_from_directory(dataset_dir).as_data_source()[
          self.info["split"]]
      self.num_examples = len(self._source)
    except RuntimeError as e:
      raise self._damaged(e, "open") from e
    if self.num_examples == 0:
      raise ValueError(f"{dataset_dir}: the dataset is empty")
    if drop_remainder and batch_size > self.num_examples:
      raise ValueError(f"{dataset_dir}: batch_size {batch_size} > {self.num_examples} examples "
                       "with drop_remainder=True (a batch would repeat examples)")
    if frames is not None:
      available = int(self.info["latent_shape"][0])
      if not 1 <= frames <= available:
        raise ValueError(f"{dataset_dir}: frames={frames}: its examples have {available} latent "
                         f"frames (expected 1 to {available})")
    self.frames = frames
    self.null_text = np.load(os.path.join(dataset_dir, NULL_TEXT_FILE)).astype(np.float32)
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder, self.prefetch = drop_remainder, prefetch
    self.scaling_factor = float(self.info["scaling_factor"])
    self.steps_per_epoch = (self.num_examples // batch_size if drop_remainder
                            else self.num_examples / batch_size)

  def _damaged(self, error: RuntimeError, action: str) -> ValueError:
    # array_record (Riegeli) raises RuntimeError, often with an empty message and no path.
    files = sorted(f for f in os.listdir(self.dataset_dir) if ".array_record" in f)
    return ValueError(f"{self.dataset_dir}: cannot {action} {files}: damaged or truncated "
                      f"({error or type(error).__name__}); write the dataset again with "
                      "python -m ttt_jax.data.precompute")

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def _rows(self, rows: Sequence[int] | None) -> np.ndarray:
    if rows is None:
      return np.arange(self.batch_size)
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
      raise ValueError(f"rows {rows.tolist()} not all in [0, batch_size {self.batch_size})")
    return rows

  def indices(self, step: int, rows: Sequence[int] | None = None) -> np.ndarray:
    """Dataset indices of the global batch at `step`, int64 [len(rows)] (rows: which rows of the
    global batch; default all, [batch_size])."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    n, g = self.num_examples, self.batch_size
    offsets = self._rows(rows)
    b = len(offsets)
    if self.drop_remainder:
      epoch, k = divmod(step, n // g)
      return self._order(epoch)[k * g + offsets]
    positions = step * g + offsets
    epochs, within = np.divmod(positions, n)
    out = np.empty(b, np.int64)
    for epoch in np.unique(epochs):  # at most ceil(b / n) + 1 epochs
      out[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
    return out

  def _latents(self, example: dict, step: int, index: int) -> np.ndarray:
    """One posterior sample, scaled, DiT layout float32 [latent_frames (or frames), C, h, w]."""
    mean, logvar = example["latent_mean"], example["latent_logvar"]
    rng = np.random.default_rng([self.seed, step, index, _NOISE_STREAM])
    eps = rng.standard_normal(mean.shape, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, naming the example
      z = (mean + np.exp(0.5 * logvar) * eps) * np.float32(self.scaling_factor)
    if not np.isfinite(z).all():
      raise FloatingPointError(f"{self.dataset_dir}: example {decode_text(example['id'])!r} "
                               f"(index {index}) has non-finite latents")
    if self.frames is not None:
      first = np.random.default_rng([self.seed, step, index, _CROP_STREAM]).integers(
          z.shape[0] - self.frames + 1)
      z = z[first:first + self.frames]
    return z.transpose(0, 3, 1, 2)

  def batch(self, step: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Rows `rows` (default all) of the global batch at `step`:
      latents float32 [B, latent_frames, C, h, w]  (DiT layout, scaled, sampled)
      text    float32 [B, segments, max_length, d_model]
      ids     str [B]
    with B = len(rows). A row's values depend only on (seed, step, row), not on which other
    rows are asked for."""
    indices = self.indices(step, rows)
    try:
      examples = self._source.__getitems__(indices.tolist())
    except RuntimeError as e:
      raise self._damaged(e, f"read examples {indices.tolist()} of") from e
    return {
        "latents": np.stack([self._latents(ex, step, int(i))
                             for ex, i in zip(examples, indices)]),
        "text": np.stack([ex["text_embeds"] for ex in examples]).astype(np.float32, copy=False),
        "ids": np.array([decode_text(ex["id"]) for ex in examples]),
    }

  def iterate(self, start_step: int = 0, num_steps: int | None = None,
              rows: Sequence[int] | None = None
              ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, batch(step, rows)) for step = start_step, start_step + 1, ... (num_steps of them, or
    forever). With prefetch > 0 one background thread computes up to `prefetch` batches ahead;
    they are handed out in step order, so the result is the same as without."""
    end = None if num_steps is None else start_step + num_steps
    steps = itertools.count(start_step) if end is None else range(start_step, end)
    if self.prefetch <= 0:
      for step in steps:
        yield step, self.batch(step, rows)
      return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="LatentLoader")
    pending = collections.deque()
    try:
      for step in steps:
        pending.append((step, pool.submit(self.batch, step, rows)))
        if len(pending) > self.prefetch:
          step_done, future = pending.popleft()
          yield step_done, future.result()
      while pending:
        step_done, future = pending.popleft()
        yield step_done, future.result()
    finally:
      for _, future in pending:
        future.cancel()
      pool.shutdown(wait=True)

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self.iterate(0)
