"""The toy text encoder's pretraining objective (ttt_jax/data/toy_text.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece
from flax import nnx

from ttt_jax.data import toy_text, toy_toons
from ttt_jax.data.tokenizer import StoryboardTokenizer
from ttt_jax.models.t5 import T5Config, T5Encoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  # As toy_job.build_text_encoder trains it: word pieces of the fixed corpus.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(toy_toons.vocabulary_texts()), model_prefix=str(root / "spiece"),
      vocab_size=1000, hard_vocab_limit=False, model_type="word", pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  return StoryboardTokenizer(root / "spiece.model", max_length=48)


def test_labels_mark_each_name_token_with_its_character(tokenizer):
  story = toy_toons.generate_story(7, segments=3)
  examples = toy_text.story_examples(story)
  ids, targets = toy_text.labels(tokenizer, examples)
  assert ids.shape == (3, 48) and targets.shape == (3, 48, 6)
  pieces = [[tokenizer.decode([int(t)]).strip() for t in row] for row in ids]
  for seg, (row, labels) in enumerate(zip(pieces, targets)):
    names = [c.name for c in story.characters]
    # Segment 1 names each character twice (its looks, its action); later segments once.
    # Nothing is cut: the EOS is there.
    assert tokenizer.eos_id in list(ids[seg])
    assert sum(p in names for p in row) == (4 if seg == 0 else 2)
    # Room and floor on every token of the text and its EOS, nowhere on the padding.
    length = list(ids[seg]).index(tokenizer.eos_id) + 1
    want_room = ([toy_text.ROOMS.index(story.room), toy_text.FLOORS.index(story.floor)]
                 if seg == 0 else [len(toy_text.ROOMS), len(toy_text.FLOORS)])
    assert (labels[:length, toy_text.NAME_HEADS:] == want_room).all()
    assert (labels[length:] == -1).all()
    for col, piece in enumerate(row[:length]):
      if piece not in names:
        assert (labels[col, :toy_text.NAME_HEADS] == -1).all(), (seg, piece)
        continue
      c = story.characters[names.index(piece)]
      action = story.actions[seg][names.index(piece)]
      place = story.places[seg][names.index(piece)]
      want_color = toy_text.COLORS.index(c.color) if seg == 0 else len(toy_text.COLORS)
      want_shape = toy_text.SHAPES.index(c.shape) if seg == 0 else len(toy_text.SHAPES)
      assert labels[col, :toy_text.NAME_HEADS].tolist() == [
          want_color, want_shape, toy_text.ACTIONS.index(action), toy_text.PLACES.index(place)]
      # The text says the same place: "<name> in the <place> <action>."
      assert f"{c.name} in the {place} {action}." in examples[seg][0]
  # The texts are the pipeline's: the scene tokens where the story cuts.
  assert examples[0][0].startswith("<start_scene>")
  assert examples[-1][0].endswith("<end_scene>")


def test_labels_refuse_a_tokenizer_that_splits_names(tmp_path):
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(["a b c d e f g h"] * 20), model_prefix=str(tmp_path / "s"),
      vocab_size=40, hard_vocab_limit=False, model_type="char", pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  tok = StoryboardTokenizer(tmp_path / "s.model", max_length=32)
  story = toy_toons.generate_story(0, segments=1)
  with pytest.raises(ValueError, match="splits the name"):
    toy_text.labels(tok, toy_text.story_examples(story))


def test_pretrain_learns_the_binding_and_keeps_the_encoder_shape(tokenizer):
  config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=32)
  model = T5Encoder(config, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

  ids, targets = toy_text.story_labels(tokenizer, range(300), 3)
  held_out = toy_text.story_labels(tokenizer, range(10_000, 10_040), 3)
  out = toy_text.pretrain(model, ids, targets, steps=400, batch_size=32, lr=3e-3, seed=0,
                          held_out=held_out)
  assert out["loss"][-1] < 0.5 * out["loss"][0]
  # Chance on the name tokens of held-out stories, for a model that ignores the text: the
  # most frequent class of each head.
  chance = [np.bincount(held_out[1][..., k][held_out[1][..., k] >= 0]).max()
            / (held_out[1][..., k] >= 0).sum() for k in range(len(toy_text.HEADS))]
  assert all(a > c + 0.15 for a, c in zip(out["accuracy"], chance)), (out["accuracy"], chance)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  assert jax.tree.structure(after) == jax.tree.structure(before)  # the heads are not kept
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after),
                                                   jax.tree.leaves(before)))
  assert model(jnp.asarray(ids[:2])).shape == (2, 48, 32)


def _naive_pretrain(model, ids, targets, *, steps, batch_size, lr, seed):
  """The objective one nnx.Optimizer step at a time, the heads built as `pretrain` builds them."""
  rngs = nnx.Rngs(seed)
  heads = nnx.List([nnx.Linear(model.config.d_model, k, rngs=rngs)
                    for k in toy_text.NUM_CLASSES])
  both = nnx.List([model, heads])
  optimizer = nnx.Optimizer(both, optax.adam(optax.cosine_decay_schedule(lr, steps)),
                            wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    pick = rng.integers(0, len(ids), batch_size)

    def loss_fn(both):
      model, heads = both
      h = model(jnp.asarray(ids[pick]))
      per_head = []
      for k, head in enumerate(heads):
        t = jnp.asarray(targets[pick][..., k])
        logp = jax.nn.log_softmax(head(h), -1)
        ce = -jnp.take_along_axis(logp, jnp.maximum(t, 0)[..., None], -1)[..., 0]
        per_head.append(jnp.sum(jnp.where(t >= 0, ce, 0.0)) / jnp.maximum(jnp.sum(t >= 0), 1))
      return sum(per_head) / len(per_head)

    loss, grads = nnx.value_and_grad(loss_fn)(both)
    optimizer.update(both, grads)
    losses.append(float(loss))
  return losses


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_pretrain_matches_a_step_at_a_time(tokenizer, steps_per_call):
  """The scanned calls (10 steps: 4 + 4 + 2 with a remainder) train what one optimizer step at
  a time does, on the same rows."""
  config = T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                    num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=32)
  ids, targets = toy_text.story_labels(tokenizer, range(20), 2)
  fast, naive = T5Encoder(config, rngs=nnx.Rngs(0)), T5Encoder(config, rngs=nnx.Rngs(0))
  out = toy_text.pretrain(fast, ids, targets, steps=10, batch_size=4, lr=3e-3, seed=3,
                          steps_per_call=steps_per_call)
  losses = _naive_pretrain(naive, ids, targets, steps=10, batch_size=4, lr=3e-3, seed=3)
  np.testing.assert_allclose(out["loss"], losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(fast, nnx.Param)),
                  jax.tree.leaves(nnx.state(naive, nnx.Param))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_pretrain_rejects_bad_arguments(tokenizer):
  config = T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                    num_heads=4)
  model = T5Encoder(config, rngs=nnx.Rngs(0))
  ids = np.zeros((2, 32), np.int32)
  with pytest.raises(ValueError, match="steps >= 1"):
    toy_text.pretrain(model, ids, np.zeros((2, 32, 6), np.int32), steps=0, batch_size=2,
                      lr=1e-3, seed=0)
  with pytest.raises(ValueError, match="no labelled token"):
    toy_text.pretrain(model, ids, np.full((2, 32, 6), -1, np.int32), steps=1, batch_size=2,
                      lr=1e-3, seed=0)


def test_the_toy_job_saves_the_pretrained_encoder(tmp_path):
  from configs import toy
  from ttt_jax import checkpoint, toy_job
  from ttt_jax.data.builders import toy_toons as builder
  datasets = {3: builder.build(str(tmp_path / "data"), segments=1, num_train=1, num_test=1)}
  saved = {}
  for steps in (0, 5):
    config = toy.get_config("runlocal")
    config.text.relative_attention_buckets = 32
    config.text.pretrain.update(steps=steps, stories=3, batch_size=4)
    _, t5_dir = toy_job.build_text_encoder(config, str(tmp_path / f"w{steps}"), datasets)
    t5_config = checkpoint.read_json(f"{t5_dir}/config.json")
    assert t5_config["relative_attention_num_buckets"] == 32
    saved[steps] = checkpoint.load_params(f"{t5_dir}/params")
  # The same random start (config.seed), then 5 steps of the objective.
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(saved[0]),
                                                 jax.tree.leaves(saved[5]))]
  assert any(moved) and jax.tree.structure(saved[0]) == jax.tree.structure(saved[5])
