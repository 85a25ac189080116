"""StoryboardTokenizer on a tiny sentencepiece model trained here, checked against transformers."""
import numpy as np
import pytest
import sentencepiece

from ttt_jax.data.tokenizer import SCENE_END, SCENE_START, StoryboardTokenizer, segment_text

CORPUS = [
    "Tom chases Jerry across the kitchen floor.",
    "Jerry hides inside a small hole in the wall.",
    "The cat slips on a banana peel and falls down.",
    "A dog sleeps in the garden under a big tree.",
    "Tom sets a trap with a piece of cheese.",
    "Jerry laughs and runs away with the cheese.",
    "The house is quiet at night while the moon shines.",
    "Tom tiptoes down the stairs holding a frying pan.",
] * 4
VOCAB = 64


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A T5-style sentencepiece model (pad 0, EOS 1, unk 2, no BOS) saved as <dir>/spiece.model."""
  directory = tmp_path_factory.mktemp("spm")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(directory / "spiece"), vocab_size=VOCAB,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      minloglevel=2)
  return directory


@pytest.fixture(scope="module")
def spm_path(spm_dir):
  return spm_dir / "spiece.model"


def test_roundtrip_plain_text(spm_path):
  tok = StoryboardTokenizer(spm_path, max_length=64)
  texts = CORPUS[:3]
  ids, mask = tok.encode(texts)
  assert ids.shape == mask.shape == (3, 64) and ids.dtype == np.int32
  assert [tok.decode(row) for row in ids] == texts


def test_padding_eos_and_truncation(spm_path):
  tok = StoryboardTokenizer(spm_path, max_length=20)
  short, long = "Tom runs.", " ".join(CORPUS[:4])
  n_short = len(tok.tokenize(short))
  assert n_short + 1 < 20 < len(tok.tokenize(long))
  ids, mask = tok.encode([short, long])
  assert ids.shape == (2, 20)
  # Short: its ids, EOS (1), then pad (0) with the mask off.
  assert ids[0, :n_short].tolist() == tok.tokenize(short)
  assert ids[0, n_short] == tok.eos_id == 1
  assert (ids[0, n_short + 1:] == tok.pad_id).all() and tok.pad_id == 0
  assert mask[0].tolist() == [True] * (n_short + 1) + [False] * (20 - n_short - 1)
  # Long: cut to 19 ids, EOS last, no padding.
  assert ids[1, :19].tolist() == tok.tokenize(long)[:19]
  assert ids[1, 19] == tok.eos_id and mask[1].all()


def test_scene_tokens(spm_path):
  tok = StoryboardTokenizer(spm_path, max_length=48)
  # After the pieces and T5's 100 sentinel ids, in transformers' order: end, then start.
  assert (tok.end_scene_id, tok.start_scene_id, tok.vocab_size) == (VOCAB + 100, VOCAB + 101,
                                                                    VOCAB + 102)
  body = tok.tokenize("Tom chases Jerry.")
  ids, mask = tok.encode([segment_text("Tom chases Jerry.", True, True),
                          "Tom" + SCENE_END + " the cat " + SCENE_START + "Jerry"])
  n = len(body)
  assert ids[0, :n + 3].tolist() == [tok.start_scene_id, *body, tok.end_scene_id, tok.eos_id]
  assert mask[0].sum() == n + 3
  row = ids[1].tolist()
  assert row.count(tok.end_scene_id) == row.count(tok.start_scene_id) == 1
  assert row.index(tok.end_scene_id) == len(tok.tokenize("Tom"))
  assert row.index(tok.start_scene_id) == len(tok.tokenize("Tom")) + 1 + len(
      tok.tokenize("the cat"))
  assert tok.decode(ids[0]) == SCENE_START + "Tom chases Jerry." + SCENE_END

  plain = StoryboardTokenizer(spm_path, max_length=48, add_scene_tokens=False, num_extra_ids=0)
  assert plain.start_scene_id is None and plain.vocab_size == VOCAB
  assert plain.encode([segment_text("Tom", True, False)])[0].max() < VOCAB

  # num_extra_ids=0: the scene tokens are the two ids right after the vocabulary.
  bare = StoryboardTokenizer(spm_path, num_extra_ids=0)
  assert (bare.end_scene_id, bare.start_scene_id) == (VOCAB, VOCAB + 1)


def test_segment_text():
  assert segment_text("A.", True, True) == "<start_scene>A.<end_scene>"
  assert segment_text("A.", True, False) == "<start_scene>A."
  assert segment_text("A.", False, True) == "A.<end_scene>"
  assert segment_text("A.", False, False) == "A."


def test_matches_transformers_t5_tokenizer(spm_dir, spm_path):
  """Same ids as the reference pipeline: T5Tokenizer + add_special_tokens([end, start])."""
  from transformers import T5Tokenizer
  hf = T5Tokenizer.from_pretrained(str(spm_dir))
  hf.add_special_tokens({"additional_special_tokens": [SCENE_END, SCENE_START]})
  tok = StoryboardTokenizer(spm_path, max_length=24)
  texts = [segment_text(CORPUS[0], True, True), "Tom <start_scene> chases  Jerry. <end_scene> x",
           "  Tom   chases  ", CORPUS[1] + " " + CORPUS[2], ""]
  want = hf(texts, max_length=24, truncation=True, padding="max_length", return_tensors="np")
  ids, mask = tok.encode(texts)
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"].astype(bool))


def test_errors(tmp_path, spm_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    StoryboardTokenizer(missing)
  with pytest.raises(TypeError):
    StoryboardTokenizer(spm_path).encode("a string, not a list")
