"""toy_toons: procedural two-character cartoons whose facts only the first segment states.

A story is a flat-coloured room (a wall colour over a floor band of a second colour) with two
named characters, each a coloured shape (circle, square or triangle) that does one action per
3-second segment: moves left/right/up/down, jumps, or stays still. Motion is eased, never leaves
the frame, and never lets the two sprites touch. The first segment's text states the facts

  "In a blue room with a brown floor, Tom is a red circle and Jerry is a green square.
   Tom moves right. Jerry jumps."

and later texts name characters and actions only ("Tom moves left. Jerry stays still."), so a
model that draws segment 7 right has to remember segment 1: a small, exactly checkable stand-in
for the long-range consistency the paper evaluates on Tom and Jerry. Scene cuts (about one later
segment in three starts a scene) put the characters at new places; room and characters persist.

Pure numpy and deterministic in the seed: `generate_story(seed, segments)` then `render(story)`
-> uint8 [1 + 3*fps*segments, height, width, 3], the video layout of features.py.

Metrics (they read only pixels, so they score any video: rendered, generated or mp4-decoded):

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

import dataclasses
import json
from typing import Any

import numpy as np
from scipy import ndimage

from ttt_jax.data.features import frames_per_segment

# H.264 in yuv420p keeps luma at full resolution but halves chroma, so sprite edges survive only
# in luma: every character colour is much brighter than every room and floor colour (luma
# contrast >= 50), and colours are far apart in RGB (>= ~50 within a group, >= ~80 across), so
# nearest-colour labels of flat regions survive the codec. Names are unique across the groups.
ROOM_COLORS = {"blue": (30, 40, 120), "purple": (80, 30, 100), "teal": (20, 80, 80),
               "gray": (70, 70, 70)}
FLOOR_COLORS = {"brown": (90, 50, 20), "black": (15, 15, 15)}
CHARACTER_COLORS = {"red": (250, 70, 70), "green": (70, 220, 70), "yellow": (250, 230, 60),
                    "white": (245, 245, 245), "magenta": (240, 80, 240), "cyan": (70, 230, 240)}
SHAPES = ("circle", "square", "triangle")
NAMES = ("Tom", "Jerry", "Spike", "Tyke", "Butch", "Toodles")
ACTIONS = ("moves left", "moves right", "moves up", "moves down", "jumps", "stays still")
# Words that only the first segment's text may contain.
FACT_WORDS = frozenset({"room", "floor", *ROOM_COLORS, *FLOOR_COLORS, *CHARACTER_COLORS, *SHAPES})

_DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1),
               "moves down": (0, 1)}
_PALETTE_NAMES = (*ROOM_COLORS, *FLOOR_COLORS, *CHARACTER_COLORS)
_PALETTE = np.array([{**ROOM_COLORS, **FLOOR_COLORS, **CHARACTER_COLORS}[n]
                     for n in _PALETTE_NAMES], np.float32)
_STILL_WEIGHT = 0.5  # "stays still" is half as likely as each move, so most segments move
_SCENE_CUT_PROB = 1 / 3
_GAP = 2  # pixels kept between the two sprites' boxes at every frame
_CHECKED_FRAMES = 8  # frames per segment persistence_score looks at


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Pixel sizes of a frame: sprite side, floor band height, move and jump distances."""
  height: int
  width: int
  sprite: int
  floor: int
  step_x: int
  step_y: int
  jump: int


def geometry(height: int, width: int) -> Geometry:
  """Sizes scale with the frame: 10 px sprites and 12x8 px moves at 32x48."""
  if height < 16 or width < 16:
    raise ValueError(f"toy_toons frames must be at least 16x16, got {height}x{width}")
  q = round(height / 4)
  return Geometry(height, width, sprite=max(5, round(0.3 * min(height, width))), floor=q,
                  step_x=round(width / 4), step_y=q, jump=q)


@dataclasses.dataclass(frozen=True)
class Character:
  name: str
  color: str  # a CHARACTER_COLORS key
  shape: str  # one of SHAPES


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the first segment states and persistence_score checks."""
  room: str  # a ROOM_COLORS key: the wall
  floor: str  # a FLOOR_COLORS key
  characters: tuple[Character, ...]


@dataclasses.dataclass(frozen=True)
class Story:
  """Everything `render` needs; `to_json`/`from_json` round-trip it (the builder stores it)."""
  seed: int
  fps: int
  height: int
  width: int
  room: str
  floor: str
  characters: tuple[Character, ...]
  actions: tuple[tuple[str, ...], ...]  # [segments][characters], ACTIONS
  starts: tuple[tuple[tuple[int, int], ...], ...]  # [segments][characters] sprite (x, y) top-left
  scene_start: tuple[bool, ...]  # [segments]

  @property
  def segments(self) -> int:
    return len(self.actions)

  @property
  def scene_end(self) -> tuple[bool, ...]:
    return (*self.scene_start[1:], True)

  @property
  def facts(self) -> Facts:
    return Facts(self.room, self.floor, self.characters)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str | bytes) -> Story:
    d = json.loads(text)
    return cls(
        seed=d["seed"], fps=d["fps"], height=d["height"], width=d["width"], room=d["room"],
        floor=d["floor"], characters=tuple(Character(**c) for c in d["characters"]),
        actions=tuple(tuple(a) for a in d["actions"]),
        starts=tuple(tuple((x, y) for x, y in seg) for seg in d["starts"]),
        scene_start=tuple(d["scene_start"]))


# --------------------------------------------------------------------------------------------
# Generation and rendering.


def _sprite_mask(shape: str, size: int) -> np.ndarray:
  """bool [size, size]: the shape inscribed in the sprite box (triangle apex up)."""
  c = (np.arange(size) + 0.5) - size / 2
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return c[:, None] ** 2 + c[None, :] ** 2 <= (size / 2) ** 2
  if shape == "triangle":
    half_width = (np.arange(size) + 1) / 2  # from the apex's 1-2 px to the full base
    return np.abs(c)[None, :] <= half_width[:, None]
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _segment_path(start: tuple[int, int], action: str, g: Geometry, frames: int) -> np.ndarray:
  """int32 [frames + 1, 2]: sprite (x, y) at progress k / frames, k = 0..frames."""
  t = np.arange(frames + 1) / frames
  offset = np.zeros((frames + 1, 2))
  if action in _DIRECTIONS:
    ease = t * t * (3 - 2 * t)  # smoothstep: starts and stops at rest
    offset = np.outer(ease, np.multiply(_DIRECTIONS[action], (g.step_x, g.step_y)))
  elif action == "jumps":
    offset[:, 1] = -g.jump * np.sin(np.pi * t)
  elif action != "stays still":
    raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
  return np.rint(np.asarray(start) + offset).astype(np.int32)


def _in_frame(path: np.ndarray, g: Geometry) -> bool:
  return bool((path >= 0).all() and (path[:, 0] <= g.width - g.sprite).all()
              and (path[:, 1] <= g.height - g.sprite).all())


def _apart(paths: list[np.ndarray], g: Geometry) -> bool:
  """No two sprites within _GAP pixels of each other at any frame (so nothing is occluded)."""
  for i in range(len(paths)):
    for j in range(i):
      d = np.abs(paths[i] - paths[j])
      if not ((d[:, 0] >= g.sprite + _GAP) | (d[:, 1] >= g.sprite + _GAP)).all():
        return False
  return True


def _place(rng: np.random.Generator, g: Geometry, count: int) -> list[tuple[int, int]]:
  for _ in range(1000):
    xy = np.stack([rng.integers(0, g.width - g.sprite + 1, count),
                   rng.integers(0, g.height - g.sprite + 1, count)], -1)
    if _apart([p[None] for p in xy], g):
      return [(int(x), int(y)) for x, y in xy]
  raise ValueError(f"cannot place {count} sprites of {g.sprite} px apart in "
                   f"{g.height}x{g.width}")


def _sample_actions(rng: np.random.Generator, starts: list[tuple[int, int]], g: Geometry,
                    frames: int) -> tuple[list[str], list[np.ndarray]]:
  """One feasible action per character whose paths stay in frame and apart."""
  for _ in range(100):
    actions, paths = [], []
    for start in starts:
      options = [(a, p) for a in ACTIONS
                 if _in_frame(p := _segment_path(start, a, g, frames), g)]
      w = np.array([_STILL_WEIGHT if a == "stays still" else 1.0 for a, _ in options])
      action, path = options[rng.choice(len(options), p=w / w.sum())]
      actions.append(action)
      paths.append(path)
    if _apart(paths, g):
      return actions, paths
  # Standing still is always feasible: the starts are apart.
  return (["stays still"] * len(starts),
          [_segment_path(s, "stays still", g, frames) for s in starts])


def generate_story(seed: int, segments: int, fps: int = 16, height: int = 32,
                   width: int = 48) -> Story:
  """A random story of `segments` 3-second segments, determined by `seed`."""
  if segments < 1:
    raise ValueError(f"segments must be >= 1, got {segments}")
  rng = np.random.default_rng(seed)
  g = geometry(height, width)
  frames = frames_per_segment(fps)
  room = str(rng.choice(list(ROOM_COLORS)))
  floor = str(rng.choice(list(FLOOR_COLORS)))
  # Distinct colours and distinct shapes, so swapping one attribute between them is detectable.
  characters = tuple(Character(str(n), str(c), str(s)) for n, c, s in zip(
      rng.choice(NAMES, 2, replace=False), rng.choice(list(CHARACTER_COLORS), 2, replace=False),
      rng.choice(SHAPES, 2, replace=False)))
  scene_start = [True] + [bool(rng.random() < _SCENE_CUT_PROB) for _ in range(segments - 1)]
  actions, starts, positions = [], [], []
  for i in range(segments):
    if scene_start[i]:
      positions = _place(rng, g, len(characters))
    seg_actions, paths = _sample_actions(rng, positions, g, frames)
    actions.append(tuple(seg_actions))
    starts.append(tuple(positions))
    positions = [(int(p[-1, 0]), int(p[-1, 1])) for p in paths]
  return Story(seed=int(seed), fps=fps, height=height, width=width, room=room, floor=floor,
               characters=characters, actions=tuple(actions), starts=tuple(starts),
               scene_start=tuple(scene_start))


def trajectories(story: Story) -> np.ndarray:
  """int32 [1 + 3*fps*segments, characters, 2]: each sprite's (x, y) top-left at every frame."""
  g = geometry(story.height, story.width)
  frames = frames_per_segment(story.fps)
  per_segment = [np.stack([_segment_path(s, a, g, frames) for s, a in zip(starts, actions)], 1)
                 for starts, actions in zip(story.starts, story.actions)]
  # Frame 0 is the shared first frame (segment 0 at rest); each segment adds progress 1/F .. 1.
  return np.concatenate([per_segment[0][:1]] + [p[1:] for p in per_segment])


def render(story: Story) -> np.ndarray:
  """uint8 [1 + 3*fps*segments, height, width, 3]."""
  g = geometry(story.height, story.width)
  background = np.empty((g.height, g.width, 3), np.uint8)
  background[:] = ROOM_COLORS[story.room]
  background[g.height - g.floor:] = FLOOR_COLORS[story.floor]
  paths = trajectories(story)
  video = np.repeat(background[None], len(paths), axis=0)
  for c, character in enumerate(story.characters):
    mask = _sprite_mask(character.shape, g.sprite)
    color = np.array(CHARACTER_COLORS[character.color], np.uint8)
    for f, (x, y) in enumerate(paths[:, c]):
      video[f, y:y + g.sprite, x:x + g.sprite][mask] = color
  return video


def story_texts(story: Story) -> list[str]:
  """Per-segment paragraphs; only the first states room, colours and shapes."""
  chars = story.characters
  texts = []
  for i, actions in enumerate(story.actions):
    sentences = [f"{c.name} {a}." for c, a in zip(chars, actions)]
    if i == 0:
      looks = [f"{c.name} is a {c.color} {c.shape}" for c in chars]
      sentences.insert(0, f"In a {story.room} room with a {story.floor} floor, "
                          f"{', '.join(looks[:-1])} and {looks[-1]}.")
    texts.append(" ".join(sentences))
  return texts


def story_to_storyboard(story: Story, negative_text: str = "") -> list[dict[str, Any]]:
  """The sampling storyboard (storyboard.py) of the story, for `python -m ttt_jax.sample`."""
  return [{"text": t, "scene_transition": s, "negative_text": negative_text}
          for t, s in zip(story_texts(story), story.scene_start)]


def make_example(story: Story) -> dict[str, Any]:
  """One example in the features.py schema, plus "story" (its JSON, for the metrics)."""
  return {
      "id": f"toy_toons_{story.seed}/0",
      "video": render(story),
      "fps": np.int32(story.fps),
      "texts": story_texts(story),
      "scene_start": np.array(story.scene_start, np.bool_),
      "scene_end": np.array(story.scene_end, np.bool_),
      "story": story.to_json(),
  }


# --------------------------------------------------------------------------------------------
# Metrics.

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, the luma of H.264's yuv420p


def _facts_and_fps(story_or_facts: Story | Facts, fps: int | None) -> tuple[Facts, int]:
  if isinstance(story_or_facts, Story):
    return story_or_facts.facts, fps or story_or_facts.fps
  return story_or_facts, fps or 16


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
    self.masks = {s: _sprite_mask(s, g.sprite) for s in SHAPES}
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
    frames = video[1 + i * per + np.linspace(0, per - 1, _CHECKED_FRAMES).round().astype(int)]
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
  segments, per = _segments(video, fps)
  if segments != story.segments:
    raise ValueError(f"video has {segments} segments, story {story.segments}")
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
