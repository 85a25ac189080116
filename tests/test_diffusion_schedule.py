"""The noise schedule and training loss against diffusers' CogVideoX schedulers and training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.diffusion import schedule as sch


def _diffusers_scheduler(**overrides):
  """CogVideoX-5b's scheduler config (scheduler/scheduler_config.json), with overrides."""
  diffusers = pytest.importorskip("diffusers")
  config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
                timestep_spacing="trailing")
  config.update(overrides)
  return diffusers.CogVideoXDDIMScheduler(**config)


@pytest.mark.parametrize("snr_shift_scale", [1.0, 3.0])
def test_alphas_cumprod_match_diffusers(snr_shift_scale):
  ref = _diffusers_scheduler(snr_shift_scale=snr_shift_scale).alphas_cumprod.numpy()
  schedule = sch.make_schedule(snr_shift_scale=snr_shift_scale)
  assert schedule.alphas_cumprod.dtype == np.float32
  assert schedule.alphas_cumprod.shape == (1000,)
  np.testing.assert_allclose(schedule.alphas_cumprod, ref, rtol=1e-6, atol=1e-7)
  # Zero terminal SNR: the last timestep is exactly pure noise.
  assert schedule.alphas_cumprod[-1] == 0.0
  # The SNR shift lowers every intermediate SNR by the factor snr_shift_scale (before the
  # rescale): check one landmark value so a wrong formula cannot pass both parametrizations.
  assert schedule.alphas_cumprod[0] == pytest.approx(
      {1.0: 0.99915, 3.0: 0.99745}[snr_shift_scale], abs=2e-5)


def test_alphas_cumprod_without_rescale_and_linear_betas():
  ref = _diffusers_scheduler(beta_schedule="linear", rescale_betas_zero_snr=False,
                             snr_shift_scale=3.0).alphas_cumprod.numpy()
  schedule = sch.make_schedule(beta_schedule="linear", rescale_zero_terminal_snr=False,
                               snr_shift_scale=3.0)
  # diffusers accumulates this one in float32.
  np.testing.assert_allclose(schedule.alphas_cumprod, ref, rtol=0, atol=1e-6)
  assert schedule.alphas_cumprod[-1] > 1e-5


def test_unknown_beta_schedule_raises():
  with pytest.raises(ValueError, match="beta_schedule"):
    sch.make_schedule(beta_schedule="squaredcos_cap_v2")


def test_forward_process_matches_diffusers_and_inverts():
  torch = pytest.importorskip("torch")
  ref = _diffusers_scheduler()
  schedule = sch.make_schedule()
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 3, 2, 5)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 19, 500, 999], np.int32)

  x_t = np.asarray(sch.add_noise(schedule, x0, noise, t))
  x_t_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                          torch.from_numpy(t).long()).numpy()
  np.testing.assert_allclose(x_t, x_t_ref, rtol=1e-5, atol=1e-6)
  v = np.asarray(sch.v_target(schedule, x0, noise, t))
  v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise),
                           torch.from_numpy(t).long()).numpy()
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)

  # x0 and eps are recovered from (x_t, v) at every noise level, including pure noise (t=999:
  # x_t = noise, v = -x0) and the cleanest (t=0).
  np.testing.assert_allclose(sch.x0_from_v(schedule, x_t, v, t), x0, atol=2e-5)
  np.testing.assert_allclose(sch.eps_from_v(schedule, x_t, v, t), noise, atol=2e-5)
  np.testing.assert_array_equal(x_t[3], noise[3])
  np.testing.assert_allclose(v[3], -x0[3], atol=1e-7)


def test_scalar_timestep_broadcasts():
  schedule = sch.make_schedule()
  x0 = jnp.ones((2, 3))
  noise = jnp.full((2, 3), 2.0)
  a = float(schedule.alphas_cumprod[400])
  np.testing.assert_allclose(sch.add_noise(schedule, x0, noise, 400),
                             np.full((2, 3), a**0.5 + 2.0 * (1.0 - a)**0.5), rtol=1e-6)


def _reference_loss(model_output, x0, noise, t, weighted):
  """diffusers' examples/cogvideo/train_cogvideox_lora.py loss, in torch."""
  torch = pytest.importorskip("torch")
  scheduler = _diffusers_scheduler()
  x0, noise, model_output = map(torch.from_numpy, (x0, noise, model_output))
  timesteps = torch.from_numpy(t).long()
  noisy = scheduler.add_noise(x0, noise, timesteps)
  model_pred = scheduler.get_velocity(model_output, noisy, timesteps)  # = x0 prediction
  weights = 1 / (1 - scheduler.alphas_cumprod[timesteps]) if weighted else torch.ones(len(t))
  while len(weights.shape) < len(model_pred.shape):
    weights = weights.unsqueeze(-1)
  loss = torch.mean((weights * (model_pred - x0)**2).reshape(len(t), -1), dim=1)
  return loss.mean().item()


@pytest.mark.parametrize("weighting", ["snr_plus_one", "none"])
def test_v_prediction_loss_matches_cogvideox_training(weighting):
  schedule = sch.make_schedule()
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((3, 4, 6)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  v_pred = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([3, 450, 999], np.int32)
  loss = float(sch.v_prediction_loss(schedule, v_pred, x0, noise, t, weighting=weighting))
  ref = _reference_loss(v_pred, x0, noise, t, weighted=weighting == "snr_plus_one")
  assert loss == pytest.approx(ref, rel=1e-4)
  if weighting == "snr_plus_one":
    # SNR+1 weighting in x0 space is exactly the v-space MSE.
    v = sch.v_target(schedule, x0, noise, t)
    assert loss == pytest.approx(float(jnp.mean((v_pred - v)**2)), rel=1e-4)


def test_v_prediction_loss_is_zero_for_exact_v_and_rejects_unknown_weighting():
  schedule = sch.make_schedule()
  x0 = jax.random.normal(jax.random.key(0), (2, 8))
  noise = jax.random.normal(jax.random.key(1), (2, 8))
  t = jnp.array([10, 990])
  v = sch.v_target(schedule, x0, noise, t)
  assert float(sch.v_prediction_loss(schedule, v, x0, noise, t)) < 1e-9
  with pytest.raises(ValueError, match="weighting"):
    sch.v_prediction_loss(schedule, v, x0, noise, t, weighting="min_snr")


def test_channel_weights_weight_each_latent_channel_and_check_their_shape():
  schedule = sch.make_schedule()
  rng = np.random.default_rng(2)
  x0, noise, v_pred = (rng.standard_normal((2, 3, 4, 2, 5)).astype(np.float32) for _ in range(3))
  t = np.array([100, 960], np.int32)
  w = np.array([4.0, 1.0, 0.5, 0.25], np.float32)
  loss = float(sch.v_prediction_loss(schedule, v_pred, x0, noise, t, weighting="none",
                                     channel_weights=w))
  # A loop over examples and channels, in float64.
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  x_t = np.sqrt(a)[:, None, None, None, None] * x0 + np.sqrt(1 - a)[:, None, None, None, None] * noise
  pred = np.sqrt(a)[:, None, None, None, None] * x_t - np.sqrt(1 - a)[:, None, None, None, None] * v_pred
  per_example = [sum(w[c] * np.sum((pred[b, :, c] - x0[b, :, c]) ** 2) for c in range(4))
                 / x0[b].size for b in range(2)]
  assert loss == pytest.approx(np.mean(per_example), rel=1e-5)
  with pytest.raises(ValueError, match="one weight per channel"):
    sch.v_prediction_loss(schedule, v_pred, x0, noise, t, channel_weights=w[:3])


def test_foreground_mask_marks_what_differs_from_each_rows_background():
  rng = np.random.default_rng(3)
  # [B=2, F=3, C=4, h=5, w=7]: each row one background vector, then objects pasted on.
  x0 = np.repeat(rng.standard_normal((2, 3, 4, 5, 1)), 7, axis=-1).astype(np.float32)
  x0 += 1e-4 * rng.standard_normal(x0.shape).astype(np.float32)  # codec-level noise: background
  truth = np.zeros((2, 3, 5, 7), bool)
  truth[0, 0, 1:3, 2:5] = truth[1, 2, 4, 0:3] = truth[0, 1, 0, 6] = True
  truth[1, 0, 2, 0:2] = truth[1, 0, 2, 4:6] = True  # two objects in a row: 4 of its 7 pixels
  b, f, y, x = np.nonzero(truth)
  x0[b, f, :, y, x] += 2.0 + 10 * rng.random((len(b), 4)).astype(np.float32)  # all distinct
  np.testing.assert_array_equal(np.asarray(sch.foreground_mask(x0)), truth)


def test_foreground_mask_memory_stays_linear_in_the_row_width():
  # A real config's minute: 253 latent frames of 16 x 60 x 90. The all-pairs comparison alone
  # would be [253, 60, 90, 90] (490 MB as float32, 7.9 GB with its channel axis).
  x0 = jax.ShapeDtypeStruct((1, 253, 16, 60, 90), jnp.float32)
  compiled = jax.jit(sch.foreground_mask).lower(x0).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * 253 * 60 * 90 * 16 * 4, temp  # a few copies of the input at most


def test_foreground_weight_weights_the_marked_pixels():
  schedule = sch.make_schedule()
  rng = np.random.default_rng(4)
  x0 = np.repeat(rng.standard_normal((2, 3, 4, 5, 1)), 6, axis=-1).astype(np.float32)
  x0[0, :, :, 1:3, 1:3] += 3.0
  x0[1, 2, :, 4, 5] -= 3.0
  noise, v_pred = (rng.standard_normal(x0.shape).astype(np.float32) for _ in range(2))
  t = np.array([10, 990], np.int32)
  w = np.array([2.0, 1.0, 0.5, 0.5], np.float32)
  loss = float(sch.v_prediction_loss(schedule, v_pred, x0, noise, t, weighting="none",
                                     channel_weights=w, foreground_weight=5.0))
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  total = []
  for b in range(2):  # a loop over every latent element, in float64
    x_t = np.sqrt(a[b]) * x0[b] + np.sqrt(1 - a[b]) * noise[b]
    pred = np.sqrt(a[b]) * x_t - np.sqrt(1 - a[b]) * v_pred[b]
    acc = 0.0
    for f, c, y, x in np.ndindex(*x0.shape[1:]):
      fg = (b == 0 and 1 <= y < 3 and 1 <= x < 3) or (b, f, y, x) == (1, 2, 4, 5)
      acc += w[c] * (6.0 if fg else 1.0) * (pred[f, c, y, x] - x0[b, f, c, y, x]) ** 2
    total.append(acc / x0[b].size)
  assert loss == pytest.approx(np.mean(total), rel=1e-5)
  with pytest.raises(ValueError, match="foreground_weight"):
    sch.v_prediction_loss(schedule, v_pred, x0, noise, t, foreground_weight=-1.0)


def test_schedule_is_a_pytree_usable_under_jit():
  schedule = sch.make_schedule()
  leaves = jax.tree.leaves(schedule)
  assert len(leaves) == 1 and leaves[0].shape == (1000,)
  x0 = jnp.ones((2, 3))
  t = jnp.array([5, 700])
  out = jax.jit(sch.add_noise)(schedule, x0, jnp.zeros_like(x0), t)
  np.testing.assert_allclose(out[:, 0], np.sqrt(schedule.alphas_cumprod[[5, 700]]), rtol=1e-6)


def test_sample_timesteps_is_uniform_over_training_range():
  schedule = sch.make_schedule()
  t = sch.sample_timesteps(jax.random.key(0), 20000, schedule)
  assert t.shape == (20000,) and t.dtype == jnp.int32
  assert int(t.min()) == 0 and int(t.max()) == 999
  assert float(jnp.mean(t)) == pytest.approx(499.5, abs=6.0)  # std of the mean ~2.0
  np.testing.assert_array_equal(t, sch.sample_timesteps(jax.random.key(0), 20000, schedule))


def test_sample_timesteps_draws_a_share_from_the_high_range():
  schedule = sch.make_schedule()
  t = np.asarray(sch.sample_timesteps(jax.random.key(1), 40000, schedule, 0.5, 800))
  # Half uniform over [0, 1000), half uniform over [800, 1000): P(t >= 800) = 0.5 * 0.2 + 0.5.
  assert np.mean(t >= 800) == pytest.approx(0.6, abs=0.015)
  assert t.min() == 0 and t.max() == 999
  # Below 800 only the uniform half draws: flat, 0.5 / 1000 a timestep.
  assert np.mean(t < 400) == pytest.approx(0.2, abs=0.01)
  all_high = np.asarray(sch.sample_timesteps(jax.random.key(1), 1000, schedule, 1.0, 950))
  assert all_high.min() >= 950
  with pytest.raises(ValueError, match="high_fraction"):
    sch.sample_timesteps(jax.random.key(1), 4, schedule, 1.5, 0)
  with pytest.raises(ValueError, match="high_from"):
    sch.sample_timesteps(jax.random.key(1), 4, schedule, 0.5, 1000)
