"""Storyboard tokenizer: T5's sentencepiece model plus the two scene-boundary tokens.

Each 3-second segment's paragraph is encoded on its own; the first segment of a scene starts with
`<start_scene>`, the last one ends with `<end_scene>` (see `segment_text`).

Token ids follow transformers' `T5Tokenizer` with the scene tokens added as special tokens, which is
how the TTT-video reference pre-computed its text embeddings:
  - 0 .. P-1: the sentencepiece pieces (P = 32000 for T5; pad 0, EOS 1, unk 2);
  - P .. P+num_extra_ids-1: T5's span-corruption sentinels `<extra_id_*>` (100 for T5), never
    produced here but kept so that the ids below match;
  - P+num_extra_ids: `<end_scene>`, P+num_extra_ids+1: `<start_scene>` (added in that order).
So for T5-v1.1 the scene tokens are 32100 and 32101, rows the pretrained 32128-row embedding table
already has: the text encoder needs no change. A model whose table is smaller than `vocab_size`
(a tiny test model, or `num_extra_ids=0`) must be grown with
`ttt_jax.models.t5.extend_embeddings(model, tokenizer.vocab_size - config.vocab_size, rng)`.
(Sentencepiece can only learn user-defined symbols at training time, hence ids past its vocab.)

Like `T5Tokenizer(..., truncation=True, padding="max_length")`: text is split at the scene markers,
each piece encoded by sentencepiece, cut to max_length - 1 ids, then EOS and padding appended.
"""
from __future__ import annotations

import os
import re

import numpy as np
import sentencepiece

SCENE_START = "<start_scene>"
SCENE_END = "<end_scene>"
_MARKERS = re.compile(f"({re.escape(SCENE_START)}|{re.escape(SCENE_END)})")


def segment_text(text: str, scene_start: bool, scene_end: bool) -> str:
  """A segment's paragraph wrapped in the scene tokens that apply to it."""
  return (SCENE_START if scene_start else "") + text + (SCENE_END if scene_end else "")


class StoryboardTokenizer:
  """Sentencepiece T5 tokenizer with `<start_scene>` / `<end_scene>` as single tokens.

  Attributes:
    pad_id, eos_id: from the sentencepiece model (0 and 1 for T5).
    start_scene_id, end_scene_id: the scene token ids, None when add_scene_tokens is False
      (the markers are then encoded as ordinary text).
    vocab_size: rows the text encoder's embedding table needs.
  """

  def __init__(self, spm_model_path: str | os.PathLike, max_length: int = 226,
               add_scene_tokens: bool = True, num_extra_ids: int = 100):
    path = os.fspath(spm_model_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"sentencepiece model file not found: {path!r} (T5 ships it as spiece.model)")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.pad_id, self.eos_id = self._sp.pad_id(), self._sp.eos_id()
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(f"{path}: the sentencepiece model needs pad and EOS pieces "
                       "(T5 convention: train with pad_id=0, eos_id=1, unk_id=2, bos_id=-1)")
    self.max_length = max_length
    self.num_pieces = self._sp.get_piece_size()
    first_added = self.num_pieces + num_extra_ids
    if add_scene_tokens:
      self.end_scene_id, self.start_scene_id = first_added, first_added + 1
      self.vocab_size = first_added + 2
    else:
      self.end_scene_id = self.start_scene_id = None
      self.vocab_size = first_added
    self._marker_ids = ({SCENE_START: self.start_scene_id, SCENE_END: self.end_scene_id}
                        if add_scene_tokens else {})

  def tokenize(self, text: str) -> list[int]:
    """Ids of `text`: no EOS, no padding, no truncation."""
    if not self._marker_ids:
      return self._sp.encode(text)
    ids = []
    for part in _MARKERS.split(text):
      if part in self._marker_ids:
        ids.append(self._marker_ids[part])
      elif part:
        ids.extend(self._sp.encode(part))
    return ids

  def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids int32 `[n, max_length]` and mask bool `[n, max_length]` (True: text or EOS)."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings")
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for i, text in enumerate(texts):
      row = self.tokenize(text)[:self.max_length - 1] + [self.eos_id]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = True
    return ids, mask

  def decode(self, ids) -> str:
    """Text of one row of ids, up to its first EOS; padding dropped, scene tokens as markers."""
    names = {v: k for k, v in self._marker_ids.items()}
    text, run = [], []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i == self.pad_id:
        continue
      if i in names:
        text += [self._sp.decode(run), names[i]]
        run = []
      elif 0 <= i < self.num_pieces:
        run.append(i)
      else:
        raise ValueError(f"id {i} is neither a sentencepiece piece nor a scene token")
    return "".join(text) + self._sp.decode(run)
