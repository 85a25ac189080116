"""ttt_jax/toy_job.py's host-device split and its check of a workdir's latents (the job itself
runs in tests/test_pipeline.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
_PROBE = ("import sys; from ttt_jax import toy_job; n = toy_job.split_host_cpu(int(sys.argv[1])); "
          "import jax; print(n, len(jax.devices('cpu')))")


def _probe(count: int, xla_flags: str | None) -> tuple[int, int]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _PROBE, str(count)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  set_count, devices = out.stdout.split()
  return int(set_count), int(devices)


@pytest.mark.parametrize("count", [2, 3])
def test_split_host_cpu_sets_the_device_count_before_jax_starts(count):
  assert _probe(count, None) == (count, count)


def test_split_host_cpu_keeps_a_count_xla_flags_already_sets():
  assert _probe(3, "--xla_force_host_platform_device_count=5") == (0, 5)


def test_split_host_cpu_is_a_no_op_once_a_backend_is_up():
  from ttt_jax import toy_job  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  before = os.environ.get("XLA_FLAGS")
  try:
    os.environ.pop("XLA_FLAGS", None)
    assert toy_job.split_host_cpu(4) == 0
    assert "XLA_FLAGS" not in os.environ
  finally:
    if before is not None:
      os.environ["XLA_FLAGS"] = before


def test_channel_weights_at_power_2_make_the_latent_loss_the_decoded_pixels(tmp_path):
  import jax.numpy as jnp
  import numpy as np

  from ttt_jax import checkpoint, toy_job
  from ttt_jax.diffusion import make_schedule, v_prediction_loss
  from ttt_jax.models.pixel_vae import PixelVAE, PixelVAEConfig, fit_linear
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, size=(6, 8, 12, 3)) * np.linspace(0.1, 1, 3)
  mean, basis, std = fit_linear(frames, patch=4, latent_channels=5)
  config = PixelVAEConfig(patch=4, mean=tuple(mean.tolist()),
                          basis=tuple(map(tuple, basis.tolist())), channel_std=tuple(std.tolist()))
  checkpoint.save_model(str(tmp_path), config)
  weights = np.asarray(toy_job.channel_weights(str(tmp_path), 2.0))
  np.testing.assert_allclose(weights.mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(toy_job.channel_weights(str(tmp_path), 1.0),
                             std / std.mean(), rtol=1e-6)
  # x0 MSE at t = 999 (x_t is the noise, v = -x0, so a prediction v_pred predicts x0 = -v_pred):
  # weighted, it is the MSE of the decoded keyframes up to one constant, sum(std**2) / (3 p**2).
  vae, schedule, t = PixelVAE(config), make_schedule(), np.array([999], np.int32)
  ratios = []
  for _ in range(3):
    x0, guess = rng.standard_normal((2, 1, 2, 3, 5)).astype(np.float32)  # [1, F, h, w, C]
    pixels = np.mean((np.asarray(vae.decode(guess[None])) - np.asarray(vae.decode(x0[None]))) ** 2)
    as_dit = lambda z: jnp.asarray(z[None].transpose(0, 1, 4, 2, 3))  # [1, F, C, h, w]
    latent = float(v_prediction_loss(schedule, -as_dit(guess), as_dit(x0), jnp.zeros_like(
        as_dit(x0)), t, weighting="none", channel_weights=weights))
    ratios.append(pixels / latent)
  np.testing.assert_allclose(ratios, np.sum(std ** 2) / 48, rtol=1e-4)


def test_channel_weights_need_a_whitened_autoencoder(tmp_path):
  from ttt_jax import checkpoint, toy_job
  from ttt_jax.models.pixel_vae import PixelVAEConfig
  checkpoint.save_model(str(tmp_path), PixelVAEConfig(patch=4))
  with pytest.raises(ValueError, match="channel_weight_power=2.0.*per-channel std"):
    toy_job.channel_weights(str(tmp_path), 2.0)


def test_latents_of_other_stories_stop_the_job(tmp_path):
  """A rerun whose config builds other stories (here one more) must not train on the old
  stories' latents: the job names both datasets instead."""
  import json  # pylint: disable=g-import-not-at-top
  from ttt_jax import toy_job  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.builders import toy_toons  # pylint: disable=g-import-not-at-top
  one, two = (toy_toons.build(tmp_path / "data", segments=1, num_train=n, num_test=1)
              for n in (1, 2))
  latents = tmp_path / "latents"
  assert toy_job.needs_encoding(str(latents), one)
  latents.mkdir()
  # What precompute records: the absolute source path, which a moved workdir changes.
  (latents / "precompute.json").write_text(json.dumps({"source": str(one.data_path)}))
  assert not toy_job.needs_encoding(str(latents), one)
  with pytest.raises(ValueError, match=r"train1_test1.*train2_test1.*new --workdir"):
    toy_job.needs_encoding(str(latents), two)
