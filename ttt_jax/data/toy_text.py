"""A language objective for the toy's text encoder: each name token states its character.

The paper's T5 comes pretrained; the toy's is random until `pretrain` trains it (the toy job
does). The objective puts the binding the DiT would otherwise have to work out into the name
tokens: at every token that is a character's name, four linear heads on the encoder's output
predict that character's colour and shape (or "not stated": only segment 1's text states them),
its action and its place (where it starts the segment) in this segment's text. So in "... Toodles
is a red circle ... Toodles in the west moves down." the encoder must carry "red", "circle",
"west" and "moves down" to both "Toodles" tokens, across the sentences, as a pretrained language
model's contextual embeddings would. Two more heads predict the room's and the floor's colour (or
"not stated") at every token of the text, EOS included: trained on the names alone, the encoder
let the room words' outputs drift, and a stage 1 on it drew the room in 8% of held-out clips
against 92%.

  labels(tokenizer, examples)   ids int32 [n, max_length], labels int32 [n, max_length, 6]
                                (-1: no label); story_labels: the same for generated stories
  pretrain(model, ids, labels)  trains a T5Encoder in place; loss curve, held-out accuracy

The texts are those the pipeline encodes (`segment_text` with the scene tokens), padded to
max_length and encoded without an attention mask, as precompute does.
"""
from __future__ import annotations

import numpy as np

from ttt_jax.data import toy_toons
from ttt_jax.data.tokenizer import StoryboardTokenizer, segment_text

COLORS, SHAPES, ACTIONS = tuple(toy_toons.CHARACTER_COLORS), toy_toons.SHAPES, toy_toons.ACTIONS
ROOMS, FLOORS = tuple(toy_toons.ROOM_COLORS), tuple(toy_toons.FLOOR_COLORS)
PLACES = toy_toons.PLACES
HEADS = ("colour", "shape", "action", "place", "room", "floor")
NAME_HEADS = 4  # the first four are labelled on name tokens, the rest on every token
# Colour, shape, room and floor have one class more: "not stated in this text".
NUM_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(ACTIONS), len(PLACES), len(ROOMS) + 1,
               len(FLOORS) + 1)

# (text, name -> (colour, shape, action, place), (room, floor)) of one segment; class ids.
Example = tuple[str, dict[str, tuple[int, int, int, int]], tuple[int, int]]


def story_examples(story: toy_toons.Story) -> list[Example]:
  """Per segment: the text as the pipeline encodes it (`segment_text`) and its class ids."""
  out = []
  for i, (text, actions, places) in enumerate(zip(toy_toons.story_texts(story), story.actions,
                                                  story.places)):
    stated = i == 0  # only segment 1's text states the looks
    targets = {}
    for character, action, place in zip(story.characters, actions, places):
      targets[character.name] = (COLORS.index(character.color) if stated else len(COLORS),
                                 SHAPES.index(character.shape) if stated else len(SHAPES),
                                 ACTIONS.index(action),
                                 PLACES.index(place))
    room = ((ROOMS.index(story.room), FLOORS.index(story.floor)) if stated
            else (len(ROOMS), len(FLOORS)))
    out.append((segment_text(text, story.scene_start[i], story.scene_end[i]), targets, room))
  return out


def labels(tokenizer: StoryboardTokenizer,
           examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n, max_length], labels int32 [n, max_length, 6]): HEADS' classes; -1 where a
  head has no label (the first NAME_HEADS off the name tokens, all on padding)."""
  name_ids = {}
  for name in toy_toons.NAMES:
    ids = tokenizer.tokenize(name)
    if len(ids) != 1:
      raise ValueError(f"the tokenizer splits the name {name!r} into {len(ids)} pieces; the "
                       "objective needs one token per name")
    name_ids[ids[0]] = name
  ids, mask = tokenizer.encode([text for text, _, _ in examples])
  out = np.full(ids.shape + (len(HEADS),), -1, np.int32)
  for row, (_, targets, room) in enumerate(examples):
    out[row, mask[row], NAME_HEADS:] = room
    for col, token in enumerate(ids[row]):
      name = name_ids.get(int(token))
      if name is not None:
        out[row, col, :NAME_HEADS] = targets[name]
  return ids, out


def story_labels(tokenizer: StoryboardTokenizer, seeds: range, segments: int,
                 **geometry: int) -> tuple[np.ndarray, np.ndarray]:
  """`labels` of every segment of the stories `toy_toons.generate_story(seed, segments,
  **geometry)` for seed in `seeds` (geometry: fps, height, width)."""
  examples = []
  for seed in seeds:
    examples += story_examples(toy_toons.generate_story(seed, segments, **geometry))
  return labels(tokenizer, examples)


# Steps one compiled call takes (a lax.scan over them): one nnx.jit call a step added its
# dispatch to each step's ~45 ms of compute (the toy job's 1500 steps: 99 s against 73 s).
_STEPS_PER_CALL = 50


def pretrain(model, ids: np.ndarray, targets: np.ndarray, *, steps: int, batch_size: int,
             lr: float, seed: int, held_out: tuple[np.ndarray, np.ndarray] | None = None,
             steps_per_call: int = _STEPS_PER_CALL) -> dict[str, list[float]]:
  """Trains `model` (a T5Encoder, in place) with one linear head per HEADS on (ids, targets)
  from `labels`; the heads are dropped afterwards. Step s trains on the rows
  `np.random.default_rng(seed).integers(0, n, (steps, batch_size))[s]`, whatever
  `steps_per_call` (how many steps one compiled call scans over). Returns {"loss": the loss every
  10% of the steps, "accuracy": each of HEADS' over its labelled tokens of `held_out` (ids,
  targets)}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if steps < 1 or batch_size < 1 or steps_per_call < 1:
    raise ValueError(f"pretrain needs steps >= 1, batch_size >= 1 and steps_per_call >= 1, got "
                     f"{steps}, {batch_size}, {steps_per_call}")
  if not (targets >= 0).any():
    raise ValueError("no labelled token in the pretraining texts")
  d = model.config.d_model
  rngs = nnx.Rngs(seed)
  heads = nnx.List([nnx.Linear(d, k, rngs=rngs) for k in NUM_CLASSES])
  graphdef, params, rest = nnx.split(nnx.List([model, heads]), nnx.Param, ...)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss_fn(params, ids, targets):
    model, heads = nnx.merge(graphdef, params, rest)
    h = model(ids)
    total = 0.0
    for k, head in enumerate(heads):
      t = targets[..., k]
      ce = optax.softmax_cross_entropy_with_integer_labels(head(h), jnp.maximum(t, 0))
      mask = (t >= 0).astype(ce.dtype)
      total = total + jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return total / len(heads)

  @jax.jit
  def train_steps(params, opt_state, ids, targets):  # ids [k, batch, L], targets [k, batch, L, 6]
    def one(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), (ids, targets))
    return params, opt_state, losses

  picks = np.random.default_rng(seed).integers(0, len(ids), (steps, batch_size))
  opt_state, losses = tx.init(params), []
  for first in range(0, steps, steps_per_call):
    pick = picks[first:first + steps_per_call]
    params, opt_state, chunk = train_steps(params, opt_state, jnp.asarray(ids[pick]),
                                           jnp.asarray(targets[pick]))
    losses.append(chunk)
  losses = np.concatenate(jax.device_get(losses))
  every = max(steps // 10, 1)
  curve = [float(losses[s]) for s in range(steps) if (s + 1) % every == 0 or s == steps - 1]
  nnx.update(model, params[0])
  accuracy = []
  if held_out is not None:  # the trained encoder in place, the heads from the trained state
    _, heads = nnx.merge(graphdef, params, rest)
    h = model(jnp.asarray(held_out[0]))
    for k, head in enumerate(heads):
      t = held_out[1][..., k]
      hit = np.asarray(jnp.argmax(head(h), -1)) == t
      accuracy.append(float(hit[t >= 0].mean()))
  return dict(loss=curve, accuracy=accuracy)
