"""Precompute (video -> VAE latents, texts -> T5 embeddings) and the training loader over it.

The test builds everything it needs without torch: a sentencepiece model it trains, a tiny random
VAE and T5 written with checkpoint.save_model, and a tiny source dataset of the features.py schema
(6 examples of 2 segments, 97 frames of 32 x 48 at 16 fps) from a builder defined here.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import tensorflow_datasets as tfds
from flax import nnx, traverse_util

from configs import tomjerry_3s
from ttt_jax import checkpoint
from ttt_jax.data import features
from ttt_jax.data import precompute as precompute_lib
from ttt_jax.data.loader import LatentLoader
from ttt_jax.data.precompute import precompute
from ttt_jax.data.tokenizer import StoryboardTokenizer, segment_text
from ttt_jax.models.t5 import T5Config, T5Encoder, extend_embeddings
from ttt_jax.models.t5_convert import load_t5
from ttt_jax.models.vae import CogVideoXVAE, VAEConfig
from ttt_jax.models.vae_convert import load_converted_vae

CORPUS = ["Tom chases Jerry around the red kitchen.", "Jerry hides in a blue teacup.",
          "The cat slips on a banana peel and crashes.", "A mouse laughs at the cat."] * 20
# Short enough for <start_scene> + text + <end_scene> + EOS to fit max_length 24.
TEXTS = ["Tom runs.", "Jerry hides.", "The cat slips.", "A mouse laughs."]
NUM_EXAMPLES, SEGMENTS, HEIGHT, WIDTH, FPS = 6, 2, 32, 48, 16


class ToySource(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A source builder of the features.py schema over the examples it is given."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, examples, height, width, **kwargs):
    self._examples, self._height, self._width = examples, height, width
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=features.video_features(self._height, self._width))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, example in enumerate(self._examples):
      yield i, example


def toy_example(i, segments=SEGMENTS, height=HEIGHT, width=WIDTH, fps=FPS):
  """A square moving over a gradient; scene flags differ between examples."""
  frames = features.num_frames(segments, fps)
  t = np.arange(frames)[:, None, None]
  y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
  base = (x * 4 + y * 2 + 17 * i) % 256
  square = (np.abs(y - height // 2) < 6) & (np.abs(x - (t * 2 + 5 * i) % width) < 6)
  shape = (frames, height, width)
  video = np.stack([np.broadcast_to(base, shape), np.where(square, 255, 40),
                    (base + 3 * t) % 256], -1).astype(np.uint8)
  return {
      "id": f"toy{i}/0", "video": video,
      "fps": np.int32(fps),
      "texts": [TEXTS[(i + s) % 4] for s in range(segments)],
      "scene_start": np.array([s == 0 or (i + s) % 2 == 0 for s in range(segments)]),
      "scene_end": np.array([s == segments - 1 or (i + s) % 2 == 1 for s in range(segments)]),
  }


def write_source(directory, examples, height=HEIGHT, width=WIDTH):
  builder = ToySource(examples=examples, height=height, width=width, data_dir=str(directory),
                      file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return str(builder.data_dir)


def random_model(build):
  """`build(rngs)`'s module with numpy random weights: eager flax init of the VAE's many small
  convolutions takes ~10 s on CPU, this well under one."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def init(path, x):
    if path[-1] in ("scale", "bias"):  # norm scales 1, biases 0, as flax initialises them
      return np.full(x.shape, float(path[-1] == "scale"), x.dtype)
    fan_in = 1 if path[-1] == "embedding" else np.prod(x.shape[:-1])
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {path: init(path, x) for path, x in flat.items()}))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """(config, source dataset dir, root): config points at the tiny models written here."""
  root = tmp_path_factory.mktemp("precompute_assets")
  config = tomjerry_3s.get_config("runlocal")
  config.segments, config.latent_frames = SEGMENTS, features.latent_frames(SEGMENTS)
  # Room for every TEXTS entry with both scene tokens (this tokenizer has only 40 pieces).
  config.text.max_length = config.model.max_text_seq_length = 24
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(root / "spiece"), vocab_size=40,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  tokenizer = StoryboardTokenizer(root / "spiece.model", max_length=config.text.max_length)

  t5_config = T5Config(vocab_size=40, d_model=config.model.text_embed_dim, d_kv=8, d_ff=64,
                       num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16)
  t5 = random_model(lambda rngs: T5Encoder(t5_config, rngs=rngs))
  extend_embeddings(t5, tokenizer.vocab_size - 40, jax.random.key(1))  # sentinels + scene tokens
  checkpoint.save_model(root / "t5", t5.config, t5)
  vae_config = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=config.model.in_channels, norm_num_groups=4,
                         sample_height=HEIGHT, sample_width=WIDTH)
  checkpoint.save_model(root / "vae", vae_config, random_model(lambda rngs: CogVideoXVAE(vae_config, rngs=rngs)))

  config.text.checkpoint, config.text.tokenizer = str(root / "t5"), str(root / "spiece.model")
  config.vae.checkpoint = str(root / "vae")
  source = write_source(root / "source", [toy_example(i) for i in range(NUM_EXAMPLES)])
  return config, source, root


@pytest.fixture(scope="module")
def dataset(assets):
  config, source, root = assets
  info = precompute(config, source, root / "latents", text_batch_size=3)
  return str(root / "latents"), info


def test_precompute_matches_direct_encoders(assets, dataset):
  config, source, _ = assets
  out, info = dataset
  assert sorted(os.listdir(os.path.dirname(out))) == ["latents", "source", "spiece.model",
                                                      "spiece.vocab", "t5", "vae"]
  assert {"dataset_info.json", "features.json", "precompute.json",
          "null_text_embeds.npy"} <= set(os.listdir(out))
  assert info == json.load(open(os.path.join(out, "precompute.json")))
  assert info["num_examples"] == NUM_EXAMPLES and info["segments"] == SEGMENTS
  assert info["latent_shape"] == [25, 4, 6, 4] and info["text_shape"] == [2, 24, 32]

  vae_config, vae = load_converted_vae(config.vae.checkpoint)
  assert info["scaling_factor"] == vae_config.scaling_factor
  _, t5 = load_t5(config.text.checkpoint)
  tokenizer = StoryboardTokenizer(config.text.tokenizer, max_length=config.text.max_length)
  got = tfds.builder_from_directory(out).as_data_source()["train"]
  src = tfds.builder_from_directory(source).as_data_source()["train"]
  assert len(got) == NUM_EXAMPLES
  for i in (0, 3):
    ex, raw = got[i], src[i]
    assert ex["id"].decode() == f"toy{i}/0"  # source order kept
    # Latents: the VAE on [-1, 1] frames, 8-frame encoder batches (frame_batch_size 2 latent).
    video = jnp.asarray(raw["video"][None].astype(np.float32) / 127.5 - 1.0)
    mean, logvar = vae.encode(video, frame_batch_size=8)
    assert ex["latent_mean"].shape == ex["latent_logvar"].shape == (25, 4, 6, 4)
    np.testing.assert_allclose(ex["latent_mean"], mean[0], atol=1e-5)
    np.testing.assert_allclose(ex["latent_logvar"], logvar[0], atol=1e-5)
    # Texts: each segment with its own scene tokens.
    prompts = [segment_text(t.decode(), s, e)
               for t, s, e in zip(raw["texts"], raw["scene_start"], raw["scene_end"])]
    ids, _ = tokenizer.encode(prompts)
    for row, start, end in zip(ids, raw["scene_start"], raw["scene_end"]):
      assert (tokenizer.start_scene_id in row) == start and (tokenizer.end_scene_id in row) == end
    assert ex["text_embeds"].dtype == np.float32
    np.testing.assert_allclose(ex["text_embeds"], t5(jnp.asarray(ids)), atol=1e-5)
    np.testing.assert_array_equal(ex["scene_start"], raw["scene_start"])
    assert [t.decode() for t in ex["texts"]] == [t.decode() for t in raw["texts"]]
  null = np.load(os.path.join(out, "null_text_embeds.npy"))
  np.testing.assert_allclose(null, t5(jnp.asarray(tokenizer.encode([""])[0]))[0], atol=1e-5)


def test_schema_mismatches_are_clear_errors(assets, tmp_path):
  config, source, _ = assets
  wrong = config.copy_and_resolve_references()
  wrong.height = 64
  with pytest.raises(ValueError, match=r"does not fit config 3s.*64x48.*video feature"):
    precompute(wrong, source, tmp_path / "a")
  wrong = config.copy_and_resolve_references()
  wrong.segments = 1
  with pytest.raises(ValueError, match=r"1 segments.*example 'toy0/0' has 2 segments"):
    precompute(wrong, source, tmp_path / "b")
  wrong = config.copy_and_resolve_references()
  wrong.model.text_embed_dim = 64
  with pytest.raises(ValueError, match="T5 d_model 32 != config.model.text_embed_dim 64"):
    precompute(wrong, source, tmp_path / "c")
  wrong = config.copy_and_resolve_references()
  wrong.model.temporal_compression_ratio = 8  # a DiT that expects the toy's keyframe spacing
  with pytest.raises(ValueError, match="VAE temporal_compression_ratio 4 != "
                                       "config.model.temporal_compression_ratio 8"):
    precompute(wrong, source, tmp_path / "f")
  with pytest.raises(FileNotFoundError, match="not a tfds dataset directory"):
    precompute(config, tmp_path, tmp_path / "d")
  with pytest.raises(ValueError, match="no split 'test'"):
    precompute(config, source, tmp_path / "e", split="test")
  assert os.listdir(tmp_path) == []


def test_crash_leaves_no_dataset(assets, tmp_path, monkeypatch):
  config, source, _ = assets
  calls = []
  encode = precompute_lib._Encoders.video

  def failing(self, video):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("disk on fire")
    return encode(self, video)

  monkeypatch.setattr(precompute_lib._Encoders, "video", failing)
  with pytest.raises(RuntimeError, match="disk on fire"):
    precompute(config, source, tmp_path / "out")
  assert os.listdir(tmp_path) == []  # neither out nor its temporary sibling


def fake_posterior(self, video):
  """Stands in for the VAE: example k (its first pixel is 17 k) gets mean = k + a pattern that
  tells every axis apart and logvar -30 (k even) or log 4 (k odd)."""
  k = int(video[0, 0, 0, 0]) // 17
  shape = (25, 4, 6, 4)
  mean = (k + np.arange(np.prod(shape)).reshape(shape) / 1000).astype(np.float32)
  return mean, np.full(shape, -30.0 if k % 2 == 0 else np.log(4.0), np.float32)


@pytest.fixture(scope="module")
def fake_dataset(assets, tmp_path_factory):
  config, source, _ = assets
  out = tmp_path_factory.mktemp("fake") / "latents"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(precompute_lib._Encoders, "video", fake_posterior)
    precompute(config, source, out, text_dtype="float16")
  return str(out)


def test_latent_sample_layout_and_statistics(fake_dataset):
  loader = LatentLoader(fake_dataset, batch_size=2, seed=0, shuffle=False)
  batch = loader.batch(0)
  assert list(batch["ids"]) == ["toy0/0", "toy1/0"]
  assert batch["latents"].shape == (2, 25, 4, 4, 6) and batch["latents"].dtype == np.float32
  assert batch["text"].shape == (2, 2, 24, 32) and batch["text"].dtype == np.float32
  s = loader.scaling_factor
  mean0, _ = fake_posterior(None, np.zeros((1, 1, 1, 3), np.uint8))
  # logvar -30: the sample is the mean, scaled, in [frames, C, h, w].
  np.testing.assert_allclose(batch["latents"][0], mean0.transpose(0, 3, 1, 2) * s, atol=1e-5)
  mean1, _ = fake_posterior(None, np.full((1, 1, 1, 3), 17, np.uint8))
  noise = batch["latents"][1] / s - mean1.transpose(0, 3, 1, 2)
  assert abs(noise.mean()) < 0.15 and abs(noise.std() - 2.0) < 0.1  # 2400 draws of N(0, 4)
  assert loader.null_text.shape == (24, 32) and loader.null_text.dtype == np.float32


def test_precompute_refuses_non_finite_and_existing_out(assets, fake_dataset, tmp_path,
                                                        monkeypatch):
  config, source, _ = assets
  with pytest.raises(FileExistsError, match="exists"):
    precompute(config, source, fake_dataset)
  monkeypatch.setattr(precompute_lib._Encoders, "video", fake_posterior)
  shutil.copytree(fake_dataset, tmp_path / "copy")
  precompute(config, source, tmp_path / "copy", overwrite=True)  # now with float32 texts
  assert os.listdir(tmp_path) == ["copy"]
  assert LatentLoader(tmp_path / "copy", batch_size=2, seed=0).info["text_dtype"] == "float32"
  shutil.rmtree(tmp_path / "copy")
  monkeypatch.setattr(precompute_lib._Encoders, "video",
                      lambda self, v: (np.full((25, 4, 6, 4), np.nan, np.float32),) * 2)
  with pytest.raises(FloatingPointError, match="toy0/0.*non-finite"):
    precompute(config, source, tmp_path / "out")
  assert os.listdir(tmp_path) == []


def test_truncated_texts_are_counted_in_the_report(assets, dataset, tmp_path, monkeypatch):
  config, source, _ = assets
  assert dataset[1]["truncated_texts"] == 0 and dataset[1]["truncated_examples"] == []
  short = config.copy_and_resolve_references()
  short.text.max_length = short.model.max_text_seq_length = 14
  tokenizer = StoryboardTokenizer(config.text.tokenizer, max_length=14)
  src = tfds.builder_from_directory(source).as_data_source()["train"]
  want = [f"toy{i}/0 segment {s}: {len(tokenizer.tokenize(p)) + 1} tokens"
          for i in range(NUM_EXAMPLES)
          for s, p in enumerate(segment_text(t.decode(), a, b) for t, a, b in zip(
              src[i]["texts"], src[i]["scene_start"], src[i]["scene_end"]))
          if len(tokenizer.tokenize(p)) > 13]
  assert 0 < len(want) < NUM_EXAMPLES * SEGMENTS  # some cut, some not
  monkeypatch.setattr(precompute_lib._Encoders, "video", fake_posterior)
  info = precompute(short, source, tmp_path / "short")
  assert info["truncated_texts"] == len(want) and info["truncated_examples"] == want


def test_crop_frames_cuts_each_example_to_consecutive_latent_frames(fake_dataset):
  whole = LatentLoader(fake_dataset, batch_size=2, seed=0, shuffle=False)
  starts = set()
  for frames in (1, 3):
    loader = LatentLoader(fake_dataset, batch_size=2, seed=0, shuffle=False, frames=frames)
    for step in range(12):
      full, cut = whole.batch(step)["latents"], loader.batch(step)["latents"]
      assert cut.shape == (2, frames) + full.shape[2:]
      for row in range(2):  # the same posterior sample, cut at one start
        start = [k for k in range(25 - frames + 1)
                 if np.array_equal(full[row, k:k + frames], cut[row])]
        assert start, (frames, step, row)
        starts.add(start[0])
      np.testing.assert_array_equal(cut, loader.batch(step)["latents"])  # pure in (seed, step)
  assert len(starts) > 10  # the start is drawn, not always frame 0
  for frames in (0, 26):
    with pytest.raises(ValueError, match=f"frames={frames}.*25 latent frames"):
      LatentLoader(fake_dataset, batch_size=2, seed=0, frames=frames)


def test_loader_is_a_pure_function_of_seed_and_step(dataset):
  out, _ = dataset
  a = LatentLoader(out, batch_size=2, seed=3)
  b = LatentLoader(out, batch_size=2, seed=3)
  c = LatentLoader(out, batch_size=2, seed=4)
  for step in (0, 5):
    x, y, z = a.batch(step), b.batch(step), c.batch(step)
    np.testing.assert_array_equal(x["latents"], y["latents"])
    np.testing.assert_array_equal(x["text"], y["text"])
    np.testing.assert_array_equal(x["ids"], y["ids"])
    assert np.abs(x["latents"] - z["latents"]).max() > 1e-3
  # Resuming: step 4 reached by iterating (with or without prefetch) is step 4 asked directly.
  direct = a.batch(4)
  for loader in (a, LatentLoader(out, batch_size=2, seed=3, prefetch=0)):
    steps = dict(loader.iterate(0, num_steps=5))
    assert sorted(steps) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(steps[4]["latents"], direct["latents"])
    np.testing.assert_array_equal(steps[4]["ids"], direct["ids"])
  step, resumed = next(iter(a.iterate(4)))
  assert step == 4
  np.testing.assert_array_equal(resumed["latents"], direct["latents"])
  assert [s for s, _ in zip(range(3), (s for s, _ in a))] == [0, 1, 2]


def _ids(loader, steps):
  return [list(loader.batch(s)["ids"]) for s in steps]


def test_every_example_once_per_epoch(dataset):
  out, _ = dataset
  everything = sorted(f"toy{i}/0" for i in range(NUM_EXAMPLES))
  # drop_remainder, 6 = 3 x 2: epochs of 3 whole batches, each epoch its own permutation.
  loader = LatentLoader(out, batch_size=2, seed=0)
  epochs = [sum(_ids(loader, range(e * 3, e * 3 + 3)), []) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == everything
  assert epochs[0] != epochs[1]
  # Without drop_remainder batches of 4 straddle epochs: 3 steps = 2 epochs of 6 positions.
  stream = sum(_ids(LatentLoader(out, batch_size=4, seed=0, drop_remainder=False), range(3)), [])
  assert sorted(stream[:6]) == sorted(stream[6:]) == everything
  # With it, the 2 left over each epoch are skipped: 4 distinct a batch.
  loader = LatentLoader(out, batch_size=4, seed=0)
  assert loader.steps_per_epoch == 1
  assert all(len(set(ids)) == 4 for ids in _ids(loader, range(4)))
  # Unshuffled: dataset order.
  assert sum(_ids(LatentLoader(out, batch_size=3, seed=0, shuffle=False), range(2)), []) == [
      f"toy{i}/0" for i in range(NUM_EXAMPLES)]


def test_any_rows_of_the_global_batch_are_those_rows_of_the_whole_batch(dataset):
  # A process reads the rows its devices hold; they need not be contiguous (tests/test_multihost
  # builds the global batch from two processes' rows).
  out, _ = dataset
  loader = LatentLoader(out, batch_size=4, seed=1, drop_remainder=False)
  whole = loader.batch(2)  # straddles two epochs of 6 examples
  for rows in ([0, 2], [1, 3], [3], [0, 1, 2, 3]):
    part = loader.batch(2, rows)
    for key in ("ids", "latents", "text"):
      np.testing.assert_array_equal(part[key], whole[key][rows])
  with pytest.raises(ValueError, match=r"rows \[0, 4\] not all in \[0, batch_size 4\)"):
    loader.batch(0, [0, 4])


def test_loader_errors(dataset, tmp_path):
  out, _ = dataset
  with pytest.raises(FileNotFoundError, match="no precomputed dataset"):
    LatentLoader(tmp_path / "missing", batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size 8 > 6 examples with drop_remainder"):
    LatentLoader(out, batch_size=8, seed=0)
  assert len(LatentLoader(out, batch_size=8, seed=0, drop_remainder=False).batch(0)["ids"]) == 8
  with pytest.raises(ValueError, match="batch_size must be positive"):
    LatentLoader(out, batch_size=0, seed=0)
  # A corrupt scaling factor overflows the latents.
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  info = json.loads((bad / "precompute.json").read_text())
  (bad / "precompute.json").write_text(json.dumps({**info, "scaling_factor": 1e38}))
  with pytest.raises(FloatingPointError, match="non-finite latents"):
    LatentLoader(bad, batch_size=2, seed=0).batch(0)
  # A truncated examples file: an error naming the dataset and its file, not a bare Riegeli one.
  cut = tmp_path / "cut"
  shutil.copytree(out, cut)
  (records,) = [f for f in os.listdir(cut) if ".array_record" in f]
  os.truncate(cut / records, os.path.getsize(cut / records) // 2)
  with pytest.raises(ValueError, match=re.escape(f"{cut}: cannot ") + ".*" + re.escape(records)
                     + ".*damaged or truncated"):
    LatentLoader(cut, batch_size=2, seed=0, shuffle=False).batch(NUM_EXAMPLES // 2 - 1)
  (cut / "precompute.json").write_text("{")
  with pytest.raises(ValueError, match=r"precompute.json: not valid JSON"):
    LatentLoader(cut, batch_size=2, seed=0)


def test_loader_imports_no_tensorflow(dataset):
  out, _ = dataset
  code = ("import sys; from ttt_jax.data.loader import LatentLoader; "
          f"b = LatentLoader({out!r}, batch_size=2, seed=0).batch(0); "
          "assert b['latents'].shape == (2, 25, 4, 4, 6); "
          "print(sorted(m for m in ('tensorflow', 'jax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.stdout.strip() == "[]"


def test_cli_writes_the_same_dataset(assets, dataset, tmp_path):
  """`python -m ttt_jax.data.precompute` with config overrides = the library call."""
  import subprocess
  import sys
  config, source, root = assets
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "cli"
  subprocess.run(
      [sys.executable, "-m", "ttt_jax.data.precompute", "--config=configs/tomjerry_3s.py:runlocal",
       f"--config.segments={SEGMENTS}", f"--config.latent_frames={config.latent_frames}",
       "--config.text.max_length=24", "--config.model.max_text_seq_length=24",
       f"--config.text.checkpoint={config.text.checkpoint}",
       f"--config.text.tokenizer={config.text.tokenizer}",
       f"--config.vae.checkpoint={config.vae.checkpoint}", f"--source={source}", f"--out={out}"],
      cwd=repo, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}, check=True,
      capture_output=True)
  a = tfds.builder_from_directory(str(out)).as_data_source()["train"]
  b = tfds.builder_from_directory(dataset[0]).as_data_source()["train"]
  assert len(a) == len(b) == NUM_EXAMPLES
  for i in range(len(a)):
    for key in ("latent_mean", "latent_logvar", "text_embeds"):
      np.testing.assert_allclose(a[i][key], b[i][key], atol=1e-5)
    assert a[i]["id"] == b[i]["id"]
