"""Metrics of toy_toons videos: they read only pixels, so they score any video (rendered,
generated or mp4-decoded) against the story it should show.

  persistence_score     the toy counterpart of the paper's temporal-consistency axis. In 8 frames
                        of each segment: are the wall and the floor the stated colours (share of
                        border pixels whose nearest palette colour they are)? Is each character
                        there: a blob cut out in luma (brighter than the stated background), of
                        about the sprite's area, whose median colour is the stated one? Does that
                        blob have the stated shape (bounding-box fill ratio: square 1, circle
                        ~pi/4, triangle ~0.55)? Per segment, and the mean over segments 2..N,
                        which no text describes.
  text_following_score  does each character's blob centroid move as its action says (net
                        displacement direction; jumps: an upward excursion that comes back;
                        stays still: little motion)?

Both are 1.0 on rendered stories, also after an H.264 round trip through video_io at 32x48 (the
blob is cut out in luma, which yuv420p keeps at full resolution, and named by its interior's
colour, as chroma edges bleed by a pixel or two).

Limits: colours are snapped to the nearest toy-palette colour and blobs must be brighter than the
stated background, so a video in another art style, or with shading or lighting changes, fails
however consistent it is. Identity is colour: two characters that trade whole appearances
(colour and shape) keep persistence 1; text following catches that only when their actions
differ. Shape is one fill ratio, so any compact blob with that fill passes. Sprite area, floor
height and move distances come from the video's height and width as `render` draws them, so a
blob more than 2x off the sprite's area counts as absent. Rendered stories never occlude;
occlusion in a generated video lowers both scores. The room check reads the frame's border only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ttt_jax.data.features import frames_per_segment
from ttt_jax.data.toy_toons import (CHARACTER_COLORS, FLOOR_COLORS, ROOM_COLORS, SHAPES, Character,
                                    Facts, Geometry, Story, geometry, sprite_mask,
                                    trajectories)

_PALETTE_NAMES = (*ROOM_COLORS, *FLOOR_COLORS, *CHARACTER_COLORS)
_PALETTE = np.array([{**ROOM_COLORS, **FLOOR_COLORS, **CHARACTER_COLORS}[n]
                     for n in _PALETTE_NAMES], np.float32)
_CHECKED_FRAMES = 8  # frames per segment persistence_score looks at

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, the luma of H.264's yuv420p


def _facts_and_fps(story_or_facts: Story | Facts, fps: int | None) -> tuple[Facts, int]:
  if isinstance(story_or_facts, Story):
    return story_or_facts.facts, fps or story_or_facts.fps
  return story_or_facts, fps or 16


def _checked_frames(segment: int, per: int) -> np.ndarray:
  """Indices of the _CHECKED_FRAMES frames of `segment` (0-based) the per-frame checks read."""
  return 1 + segment * per + np.linspace(0, per - 1, _CHECKED_FRAMES).round().astype(int)


def _story_segments(video: np.ndarray, story: Story, fps: int) -> tuple[int, int]:
  """_segments, refusing a video whose segment count is not the story's."""
  segments, per = _segments(video, fps)
  if segments != story.segments:
    raise ValueError(f"video has {segments} segments, story {story.segments}")
  return segments, per


def _segments(video: np.ndarray, fps: int) -> tuple[int, int]:
  """(segments, frames per segment) of a [1 + 3*fps*N, H, W, 3] video."""
  per = frames_per_segment(fps)
  if video.ndim != 4 or video.shape[-1] != 3 or (len(video) - 1) % per or len(video) < 1 + per:
    raise ValueError(f"expected a video [1 + {per}*segments, H, W, 3] at {fps} fps, "
                     f"got shape {video.shape}")
  return (len(video) - 1) // per, per


def _labels(pixels: np.ndarray) -> np.ndarray:
  """[..., 3] colours -> int [...]: index of the nearest _PALETTE colour."""
  x = np.asarray(pixels, np.float32).reshape(-1, 3)
  # |x - p|^2 without the |x|^2 term, which is the same for every palette colour.
  d = (_PALETTE ** 2).sum(-1) - 2 * x @ _PALETTE.T
  return d.argmin(-1).reshape(np.shape(pixels)[:-1])


class _Finder:
  """Finds the characters of `facts` in frames [H, W, 3] drawn at `render`'s geometry."""

  def __init__(self, facts: Facts, height: int, width: int):
    self.g = g = geometry(height, width)
    rows = np.arange(height)[:, None] >= height - g.floor
    self.background_luma = np.where(rows, np.dot(FLOOR_COLORS[facts.floor], _LUMA),
                                    np.dot(ROOM_COLORS[facts.room], _LUMA))  # [H, 1]
    self.masks = {s: sprite_mask(s, g.sprite) for s in SHAPES}
    self.fills = {s: float(m.mean()) for s, m in self.masks.items()}

  def find(self, frame: np.ndarray, luma: np.ndarray,
           character: Character) -> tuple[np.ndarray, np.ndarray] | None:
    """(ys, xs) of the character's pixels, or None.

    The blob is cut out in luma, which H.264 keeps at full resolution (chroma edges bleed by a
    pixel or two, a fifth of a 10-px sprite), and identified by its median colour, which the
    blob's interior sets: the largest 4-connected component at least half as much brighter than
    the stated background as the character's colour, within 2x of the sprite's area, whose median
    colour's nearest palette colour is the character's.
    """
    contrast = np.dot(CHARACTER_COLORS[character.color], _LUMA) - self.background_luma
    components, _ = ndimage.label(luma - self.background_luma >= 0.5 * contrast)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    area = self.masks[character.shape].sum()
    want = _PALETTE_NAMES.index(character.color)
    for k in np.argsort(sizes)[::-1]:
      if sizes[k] < 0.5 * area:
        break
      if sizes[k] <= 2 * area:
        ys, xs = np.nonzero(components == k)
        if _labels(np.median(frame[ys, xs], axis=0)) == want:
          return ys, xs
    return None

  def shape(self, ys: np.ndarray, xs: np.ndarray) -> str | None:
    """The shape whose box fill ratio is nearest the blob's; None for elongated blobs."""
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    if not 0.6 <= w / h <= 1 / 0.6:
      return None
    fill = len(ys) / (h * w)
    return min(self.fills, key=lambda s: abs(self.fills[s] - fill))


def _later_mean(per_segment: list[float]) -> float:
  """Mean over segments 2..N (segment 1 alone when N == 1)."""
  return float(np.mean(per_segment[1:] if len(per_segment) > 1 else per_segment))


def persistence_score(video: np.ndarray, story_or_facts: Story | Facts,
                      fps: int | None = None) -> dict[str, Any]:
  """Do the room and the characters keep the colours and shapes the first segment states?

  Args:
    video: uint8 [1 + 3*fps*N, H, W, 3].
    story_or_facts: the story (or only its facts) the video should show.
    fps: frames per second of `video`; default the story's (16 for bare facts).

  Returns:
    "room", "color", "shape": per-segment lists [N] in [0, 1], each averaged over
    _CHECKED_FRAMES frames of the segment (and over the characters): room: at least 40% of the
    wall's border pixels (top row, sides above the floor) and of the bottom row have the stated
    wall and floor colours; color: the character's colour forms a sprite-sized blob; shape: that
    blob has the stated shape. "room_later", "color_later", "shape_later": their means over
    segments 2..N; "overall": the mean of those three.
  """
  facts, fps = _facts_and_fps(story_or_facts, fps)
  video = np.asarray(video)
  segments, per = _segments(video, fps)
  finder = _Finder(facts, video.shape[1], video.shape[2])
  wall_rows = finder.g.height - finder.g.floor
  wall_idx, floor_idx = _PALETTE_NAMES.index(facts.room), _PALETTE_NAMES.index(facts.floor)
  scores = {"room": [], "color": [], "shape": []}
  for i in range(segments):
    frames = video[_checked_frames(i, per)]
    labels = _labels(np.concatenate([frames[:, 0], frames[:, 1:wall_rows, 0],
                                     frames[:, 1:wall_rows, -1], frames[:, -1]], axis=1))
    wall, floor = labels[:, :-finder.g.width], labels[:, -finder.g.width:]
    # A share, not all: characters may cover part of the border.
    room_ok = ((wall == wall_idx).mean(1) >= 0.4) & ((floor == floor_idx).mean(1) >= 0.4)
    color_ok, shape_ok = [], []
    for frame, luma in zip(frames, frames @ _LUMA):
      for c in facts.characters:
        blob = finder.find(frame, luma, c)
        color_ok.append(blob is not None)
        shape_ok.append(blob is not None and finder.shape(*blob) == c.shape)
    scores["room"].append(float(room_ok.mean()))
    scores["color"].append(float(np.mean(color_ok)))
    scores["shape"].append(float(np.mean(shape_ok)))
  later = {f"{k}_later": _later_mean(v) for k, v in scores.items()}
  return {**scores, **later, "overall": float(np.mean(list(later.values())))}


# colour_at_place's classes of the colour drawn where a character should be.
PLACE_CLASSES = ("stated", "swapped", "third", "background")


def colour_at_place(video: np.ndarray, story: Story, fps: int | None = None) -> dict[str, Any]:
  """Which colour is drawn where the story puts each character: is identity bound to the name?

  Persistence asks whether a blob of the character's colour exists anywhere; this asks what is
  at the character's own place. In _CHECKED_FRAMES frames of each segment, the median colour of
  the video under each character's rendered sprite mask is snapped to the palette and classed:
  "stated" (its colour), "swapped" (the other character's), "third" (a character colour the
  story does not use) or "background" (a wall or floor colour: nothing drawn there). A model
  whose memory keeps the story's two colours but not which name has which draws "swapped" as
  often as "stated" in the later segments.

  Args:
    video: uint8 [1 + 3*fps*N, H, W, 3].
    story: gives each character's colour, shape and path.
    fps: frames per second of `video`; default the story's.

  Returns:
    For each class of PLACE_CLASSES, the per-segment share [N] of (frame, character) checks,
    f"{class}_later": its mean over segments 2..N, and that mean split by scene:
    f"{class}_first_scene" over the later segments still in segment 1's scene, where each
    character can keep the colour it wore a frame before, and f"{class}_after_cut" over those
    after a scene cut, which put the characters at new places: there only a memory of which name
    wears which colour draws "stated" more often than "swapped". None where a story has no such
    segment.
  """
  fps = fps or story.fps
  video = np.asarray(video)
  segments, per = _story_segments(video, story, fps)
  if video.shape[1:3] != (story.height, story.width):
    raise ValueError(f"video frames are {video.shape[1:3]}, the story's "
                     f"{(story.height, story.width)}")
  g = geometry(story.height, story.width)
  paths = trajectories(story)
  masks = [sprite_mask(c.shape, g.sprite) for c in story.characters]
  colours = [_PALETTE_NAMES.index(c.color) for c in story.characters]
  characters = {_PALETTE_NAMES.index(n) for n in CHARACTER_COLORS}
  shares = {k: [] for k in PLACE_CLASSES}
  for i in range(segments):
    counts = dict.fromkeys(PLACE_CLASSES, 0)
    for f in _checked_frames(i, per):
      for c, (mask, colour) in enumerate(zip(masks, colours)):
        x, y = paths[f, c]
        label = int(_labels(np.median(video[f, y:y + g.sprite, x:x + g.sprite][mask], axis=0)))
        counts["stated" if label == colour else "swapped" if label in colours
               else "third" if label in characters else "background"] += 1
    total = sum(counts.values())
    for k in PLACE_CLASSES:
      shares[k].append(counts[k] / total)
  # Segment i (0-based, i >= 1) is in segment 1's scene until the first later scene start.
  first_scene = np.logical_and.accumulate(~np.asarray(story.scene_start[1:], bool))
  split = {}
  for k, v in shares.items():
    later = np.asarray(v[1:])
    for name, where in (("first_scene", first_scene), ("after_cut", ~first_scene)):
      split[f"{k}_{name}"] = float(later[where].mean()) if where.any() else None
  return {**shares, **{f"{k}_later": _later_mean(v) for k, v in shares.items()}, **split}


def _classify_motion(track: np.ndarray, g: Geometry) -> str:
  """An ACTIONS entry, "absent" or "unclear", from centroids [F, 2] (x, y), NaN where missing."""
  found = track[~np.isnan(track).any(-1)]
  if len(found) < max(2, len(track) / 2):
    return "absent"
  p0 = found[0]
  dx, dy = (found[-1] - p0) / (g.step_x, g.step_y)
  if max(abs(dx), abs(dy)) >= 0.5:
    if abs(dx) >= abs(dy):
      return "moves right" if dx > 0 else "moves left"
    return "moves down" if dy > 0 else "moves up"
  if (p0[1] - found[:, 1]).max() >= 0.5 * g.jump:
    return "jumps"
  if np.abs(found - p0).max() <= 0.25 * min(g.step_x, g.step_y):
    return "stays still"
  return "unclear"


def text_following_score(video: np.ndarray, story: Story,
                         fps: int | None = None) -> dict[str, Any]:
  """Does each character move as its segment's text says?

  Args:
    video: uint8 [1 + 3*fps*N, H, W, 3].
    story: gives each character's colour and shape (to find it) and its action per segment.
    fps: frames per second of `video`; default the story's.

  Returns:
    "per_segment": [N] fraction of characters whose motion matches the stated action;
    "predicted": [N][characters] the action read from the video's blob centroids ("absent" when
    the blob is missing in over half the segment's frames, "unclear" when the motion fits no
    action); "mean": mean over segments.
  """
  fps = fps or story.fps
  video = np.asarray(video)
  segments, per = _story_segments(video, story, fps)
  finder = _Finder(story.facts, video.shape[1], video.shape[2])
  per_segment, predicted = [], []
  for i in range(segments):
    frames = video[1 + i * per:1 + (i + 1) * per]
    tracks = np.full((len(story.characters), per, 2), np.nan)
    for f, (frame, luma) in enumerate(zip(frames, frames @ _LUMA)):
      for c, character in enumerate(story.characters):
        blob = finder.find(frame, luma, character)
        if blob is not None:
          tracks[c, f] = blob[1].mean(), blob[0].mean()
    moves = [_classify_motion(track, finder.g) for track in tracks]
    predicted.append(moves)
    per_segment.append(float(np.mean([m == a for m, a in zip(moves, story.actions[i])])))
  return {"per_segment": per_segment, "predicted": predicted, "mean": float(np.mean(per_segment))}


_NEAR = 24  # of 255: a difference an H.264 round trip of a flat toon stays within


def frame_statistics(video: np.ndarray) -> dict[str, float]:
  """How much a video looks like a flat-coloured toon, whatever its content.

  Args:
    video: uint8 [frames, H, W, 3].

  Returns:
    "flatness": the share of horizontally and vertically adjacent pixel pairs whose channels all
    differ by at most 24/255 (a rendered toon, mp4 round trip included: ~0.95; noise: low);
    "stability": the same share over pixels of consecutive frames (a toon: ~0.99).
  """
  v = np.asarray(video, np.int16)
  near = lambda d: (np.abs(d).max(-1) <= _NEAR)
  flat = np.concatenate([near(np.diff(v, axis=1)).ravel(), near(np.diff(v, axis=2)).ravel()])
  return {"flatness": float(flat.mean()),
          "stability": float(near(np.diff(v, axis=0)).mean()) if len(v) > 1 else 1.0}
