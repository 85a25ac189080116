"""toy_toons: procedural two-character cartoons whose facts only the first segment states.

A story is a flat-coloured room (a wall colour over a floor band of a second colour) with two
named characters, each a coloured shape (circle, square or triangle) that does one action per
3-second segment: moves left/right/up/down, jumps, or stays still. Motion is eased, never leaves
the frame, and never lets the two sprites touch. The first segment's text states the facts

  "In a blue room with a brown floor, Tom is a red circle and Jerry is a green square.
   Tom in the west moves right. Jerry in the northeast jumps."

and later texts only name the characters, where each starts the segment (the third of the frame
across and down: PLACES) and what it does ("Tom in the centre moves left. Jerry in the east stays
still."). Sprites start on a 3x3 lattice, one point per place word, and a move ends on the next
point, so the texts fix every frame. A model that draws segment 7 right has to remember segment
1: a small, exactly checkable stand-in for the long-range consistency the paper evaluates on Tom
and Jerry. Scene cuts (about one later segment in three starts a scene) put the characters at
new places; room and characters persist.

Pure numpy and deterministic in the seed: `generate_story(seed, segments)` then `render(story)`
-> uint8 [1 + 3*fps*segments, height, width, 3], the video layout of features.py.

Its metrics (persistence, text following, frame statistics) are in toy_metrics.py.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import numpy as np

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
# Where a sprite starts a segment: the third of the frame, across and down, holding its centre;
# each names one point of `lattice`.
PLACES = ("northwest", "north", "northeast", "west", "centre", "east", "southwest", "south",
          "southeast")
# Words that only the first segment's text may contain.
FACT_WORDS = frozenset({"room", "floor", *ROOM_COLORS, *FLOOR_COLORS, *CHARACTER_COLORS, *SHAPES})

_DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1),
               "moves down": (0, 1)}
_STILL_WEIGHT = 0.5  # "stays still" is half as likely as each move, so most segments move
_SCENE_CUT_PROB = 1 / 3
_GAP = 2  # pixels kept between the two sprites' boxes at every frame


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
  """Sizes scale with the frame: 10 px sprites, 16x11 px moves and 8 px jumps at 32x48.

  A move goes from one point of `lattice` to the next, so every segment starts on it.
  """
  if height < 16 or width < 16:
    raise ValueError(f"toy_toons frames must be at least 16x16, got {height}x{width}")
  q = round(height / 4)
  sprite = max(5, round(0.3 * min(height, width)))
  xs, ys = _lattice_axis(width, sprite), _lattice_axis(height, sprite)
  return Geometry(height, width, sprite=sprite, floor=q, step_x=int(xs[1] - xs[0]),
                  step_y=int(ys[1] - ys[0]), jump=q)


def _lattice_axis(size: int, sprite: int) -> np.ndarray:
  """int [3]: sprite top-left coordinates that centre it in each third of `size`, kept in frame
  and evenly spaced."""
  first = max(0, round(size / 6 - sprite / 2))
  return first + np.arange(3) * ((size - sprite - 2 * first) // 2)


def lattice(g: Geometry) -> list[tuple[int, int]]:
  """The 9 sprite (x, y) top-lefts a segment can start at, one per PLACES word, in its order.

  Each place word names one point, so a segment's text fixes where its sprites are: with a
  sprite anywhere in a third of the frame, a model trained on squared error draws the mean over
  the third, a faint smear the metrics do not find (on 24 held-out 3 s clips the job's stage 1
  drew the characters' colours in 0.58 of the checks on the lattice, 0.29 off it).
  """
  xs, ys = _lattice_axis(g.width, g.sprite), _lattice_axis(g.height, g.sprite)
  return [(int(x), int(y)) for y in ys for x in xs]


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

  @property
  def places(self) -> tuple[tuple[str, ...], ...]:
    """[segments][characters] PLACES word of where each character starts each segment."""
    g = geometry(self.height, self.width)
    return tuple(tuple(place_word(x, y, g) for x, y in seg) for seg in self.starts)

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


def sprite_mask(shape: str, size: int) -> np.ndarray:
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
  points = np.array(lattice(g))
  for _ in range(1000):
    xy = points[rng.choice(len(points), count, replace=False)]
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
    mask = sprite_mask(character.shape, g.sprite)
    color = np.array(CHARACTER_COLORS[character.color], np.uint8)
    for f, (x, y) in enumerate(paths[:, c]):
      video[f, y:y + g.sprite, x:x + g.sprite][mask] = color
  return video


def place_word(x: int, y: int, g: Geometry) -> str:
  """The PLACES word of a sprite whose top-left is (x, y): the frame third holding its centre."""
  col = min(2, 3 * (x + g.sprite / 2) // g.width)
  row = min(2, 3 * (y + g.sprite / 2) // g.height)
  return PLACES[int(3 * row + col)]


def story_texts(story: Story) -> list[str]:
  """Per-segment paragraphs; only the first states room, colours and shapes.

  Every segment says where each character starts it: without it the place of a sprite is a
  coin toss the text cannot settle, and a model trained on squared error draws the mean over
  places, a faint smear, instead of a sprite.
  """
  chars = story.characters
  texts = []
  for i, (actions, places) in enumerate(zip(story.actions, story.places)):
    sentences = [f"{c.name} in the {p} {a}." for c, p, a in zip(chars, places, actions)]
    if i == 0:
      looks = [f"{c.name} is a {c.color} {c.shape}" for c in chars]
      sentences.insert(0, f"In a {story.room} room with a {story.floor} floor, "
                          f"{', '.join(looks[:-1])} and {looks[-1]}.")
    texts.append(" ".join(sentences))
  return texts


def vocabulary_texts() -> list[str]:
  """A fixed corpus that uses every word `story_texts` can write, for training a tokenizer.

  A word-level tokenizer numbers words by their frequency in its corpus; trained on a dataset's
  stories, its ids (hence every text embedding, hence every model) would change with the number
  of stories drawn. This corpus depends on nothing: one story per wall and floor, each character
  pair, colour pair and shape pair rotating through the lists, and every action pair once.
  """
  colors = list(CHARACTER_COLORS)
  actions = tuple(itertools.product(ACTIONS, repeat=2))
  texts = []
  for i, (room, floor) in enumerate(itertools.product(ROOM_COLORS, FLOOR_COLORS)):
    for j in range(len(NAMES)):
      k = i + j
      characters = tuple(
          Character(NAMES[(j + d) % len(NAMES)], colors[(k + d) % len(colors)],
                    SHAPES[(k + d) % len(SHAPES)]) for d in (0, 1))
      story = Story(seed=0, fps=16, height=32, width=48, room=room, floor=floor,
                    characters=characters, actions=actions,
                    # Starts for the place words only (this corpus is never rendered): the
                    # first character steps through the thirds across and down, so every place
                    # word is written. Changing them renumbers the words, and so every model.
                    starts=tuple(((3 * (a % 3) * 8, 12 * (a // 3)), (0, 0))
                                 for a in range(len(actions))),
                    scene_start=(True,) * len(actions))
      texts += story_texts(story)
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
