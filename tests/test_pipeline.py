"""The toy main job at its local size, end to end, as `python -m ttt_jax.train` runs it; a
rerun resumes (every piece is found complete) and gives the same summary; the sampling command it
prints works as printed."""
import json
import os
import shlex
import subprocess
import sys

from ttt_jax.data.video_io import read_mp4

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_pipeline_runlocal_end_to_end_and_resume(tmp_path):
  # The default job's stages: the image stage, then the five of the paper.
  cmd = [sys.executable, "-m", "ttt_jax.train", "--config=configs/toy.py:runlocal",
         f"--workdir={tmp_path}"]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["stages"]) == ["toy_images", "toy_3s", "toy_9s", "toy_18s", "toy_30s",
                                     "toy_63s"]
  for name, stage in summary["stages"].items():
    assert stage["steps"] == 2
    # The 3 s backbone has no mixer: the 9 s stage starts the mixers and gates (configs/toy.py).
    assert (stage["initialised_fresh"] > 0) == (name == "toy_9s"), (name, stage)
  for stage in ("toy_9s", "toy_18s", "toy_30s", "toy_63s"):  # each one handed off
    config = json.loads((tmp_path / "stages" / stage / "config.json").read_text())
    assert config["init_from"] == str(tmp_path / "stages" / f"toy_{config['previous_stage']}")
  # The image stage (keyframes of the 3 s clips, configs/toy.py) hands off to the 3 s stage.
  config = json.loads((tmp_path / "stages" / "toy_3s" / "config.json").read_text())
  assert config["init_from"] == str(tmp_path / "stages" / "toy_images")
  images = json.loads((tmp_path / "stages" / "toy_images" / "config.json").read_text())
  assert images["data"]["crop_frames"] == 1 and images["data"]["latents"] == config["data"][
      "latents"]
  frames, fps = read_mp4(tmp_path / summary["sample"]["video"])
  assert frames.shape == (1009, 32, 48, 3) and fps == 16  # one minute (63 s) at 16 fps
  assert summary["sample"]["reference"]["persistence"]["overall"] == 1.0
  assert set(summary["sample"]["autoencoded"]) == set(summary["sample"]["reference"])
  assert 0.0 <= summary["sample"]["persistence"]["overall"] <= 1.0
  storyboard = json.loads((tmp_path / "storyboard.json").read_text())
  assert len(storyboard) == 21
  assert (tmp_path / summary["sample"]["persistence_plot"]).stat().st_size > 0
  assert len(summary["sample"]["per_segment"]["room"]) == 21
  # The terminal gets the job's own lines; Orbax's and tfds' INFO chatter goes to log.txt.
  assert "Closing" not in first.stdout + first.stderr
  assert "[toy] toy_3s:" in first.stdout and (tmp_path / "log.txt").stat().st_size > 0
  before = (tmp_path / "summary.json").read_text()
  out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
  assert "encoded" not in out.stdout  # nothing re-encoded, no stage retrained
  # The same seed, the same numbers: the resampled video scores exactly as before.
  assert (tmp_path / "summary.json").read_text() == before
  command = out.stdout.split("with another seed) with:")[1].split("\n")[1]
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "ttt_jax.sample"]
  subprocess.run([sys.executable, *args[1:]], cwd=REPO, env=env, check=True,
                 capture_output=True)
  assert read_mp4(tmp_path / "samples" / "seed1" / "video.mp4")[0].shape == (1009, 32, 48, 3)


def test_autoencode_is_the_fitted_autoencoders_round_trip(tmp_path):
  """A full-rank fit (48 channels of 4x4x3 blocks) codes a still video's keyframes exactly and
  the frames between them are the keyframes' blend: the video comes back to the pixel; 4
  channels lose detail."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ttt_jax import checkpoint, toy_job  # pylint: disable=g-import-not-at-top
  from ttt_jax.models import pixel_vae  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  still = np.repeat(rng.integers(0, 256, (1, 8, 12, 3), dtype=np.uint8), 9, axis=0)
  noise = rng.integers(0, 256, (9, 8, 12, 3)).astype(np.float32) / 127.5 - 1.0
  errors = []
  for channels in (48, 4):
    mean, basis, std = pixel_vae.fit_linear(noise, 4, channels)
    config = pixel_vae.PixelVAEConfig(patch=4, mean=tuple(mean.tolist()),
                                      basis=tuple(map(tuple, basis.tolist())),
                                      channel_std=tuple(std.tolist()))
    checkpoint.save_model(tmp_path / str(channels), config)
    out = toy_job.autoencode(str(tmp_path / str(channels)), still)
    assert out.shape == still.shape and out.dtype == np.uint8
    errors.append(np.abs(out.astype(int) - still).max())
  assert errors[0] <= 1 and errors[1] > 20, errors
