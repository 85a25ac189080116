"""Samplers against diffusers' CogVideoX schedulers and pipeline loop; oracle denoising; jit."""
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.diffusion import samplers, schedule as sch

SHAPE = (2, 3, 5)  # [batch, frames, channels]: small, the math is elementwise.


def _config(**overrides):
  """CogVideoX-5b's scheduler config (scheduler/scheduler_config.json), with overrides."""
  config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
                timestep_spacing="trailing")
  config.update(overrides)
  return config


def _ddim(**overrides):
  return pytest.importorskip("diffusers").CogVideoXDDIMScheduler(**_config(**overrides))


def _dpm(**overrides):
  return pytest.importorskip("diffusers").CogVideoXDPMScheduler(**_config(**overrides))


def _patch_dpm_noise(monkeypatch):
  """Makes CogVideoXDPMScheduler.step draw its noise from a list we fill: returns the list."""
  module = pytest.importorskip("diffusers.schedulers.scheduling_dpm_cogvideox")
  torch = pytest.importorskip("torch")
  queue = []
  monkeypatch.setattr(module, "randn_tensor",
                      lambda shape, **_: torch.from_numpy(np.array(queue.pop(0))).reshape(shape))
  return queue


@pytest.mark.parametrize("num_steps", [1, 7, 10, 30, 50])
def test_timesteps_match_diffusers_trailing(num_steps):
  schedule = sch.make_schedule()
  ours = samplers.ddim_timesteps(schedule, num_steps)
  for ref in (_ddim(), _dpm()):
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())
  if num_steps == 50:
    np.testing.assert_array_equal(ours, np.arange(999, 0, -20))


def test_timesteps_reject_counts_where_trailing_spacing_overshoots():
  with pytest.raises(ValueError, match="timesteps for num_steps=61"):
    samplers.ddim_timesteps(sch.make_schedule(), 61)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddim_timesteps(sch.make_schedule(), 0)


@pytest.mark.parametrize("snr_shift_scale,num_steps", [(1.0, 50), (3.0, 50), (1.0, 7)])
def test_ddim_step_matches_diffusers(snr_shift_scale, num_steps):
  torch = pytest.importorskip("torch")
  ref = _ddim(snr_shift_scale=snr_shift_scale)
  ref.set_timesteps(num_steps)
  schedule = sch.make_schedule(snr_shift_scale=snr_shift_scale)
  plan = samplers.make_plan(schedule, num_steps)
  rng = np.random.default_rng(0)
  for i in sorted({0, 1, num_steps // 2, num_steps - 1}):
    x = rng.standard_normal(SHAPE).astype(np.float32)
    v = rng.standard_normal(SHAPE).astype(np.float32)
    t = int(plan.timestep[i])
    want_x, want_x0 = ref.step(torch.from_numpy(v), t, torch.from_numpy(x), return_dict=False)
    got_x, got_x0 = samplers.ddim_step(schedule, v, x, plan.timestep[i], plan.prev_timestep[i])
    np.testing.assert_allclose(got_x, want_x.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i}")
    np.testing.assert_allclose(got_x0, want_x0.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("snr_shift_scale,num_steps", [(1.0, 50), (3.0, 50), (1.0, 7)])
def test_dpmpp_2m_steps_match_diffusers(monkeypatch, snr_shift_scale, num_steps):
  """All steps, each from diffusers' own state, so each step is compared on equal inputs."""
  torch = pytest.importorskip("torch")
  queue = _patch_dpm_noise(monkeypatch)
  ref = _dpm(snr_shift_scale=snr_shift_scale)
  ref.set_timesteps(num_steps)
  schedule = sch.make_schedule(snr_shift_scale=snr_shift_scale)
  plan = samplers.make_plan(schedule, num_steps)
  rng = np.random.default_rng(1)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  old_x0 = None
  for i in range(num_steps):
    v = rng.standard_normal(SHAPE).astype(np.float32)
    # diffusers draws a first noise, then on second-order steps a second one that replaces it.
    first, second = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    queue[:] = [first, second]
    second_order = i > 0 and plan.prev_timestep[i] >= 0
    t, back = int(plan.timestep[i]), (int(plan.timestep[i - 1]) if i > 0 else None)
    want_x, want_x0 = ref.step(torch.from_numpy(v),
                               None if old_x0 is None else torch.from_numpy(old_x0), t, back,
                               torch.from_numpy(x), return_dict=False)
    assert len(queue) == (0 if second_order else 1)  # the classification diffusers used
    got_x, got_x0 = samplers.dpmpp_2m_step(
        schedule, v, x, plan.timestep[i], plan.prev_timestep[i], plan.back_timestep[i],
        np.zeros(SHAPE, np.float32) if old_x0 is None else old_x0,
        second if second_order else first)
    np.testing.assert_allclose(got_x0, want_x0.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_x, want_x.numpy(), rtol=2e-5, atol=2e-5, err_msg=f"step {i}")
    x, old_x0 = want_x.numpy(), want_x0.numpy()
  if num_steps == 50:
    # The last step (prev_t < 0, a_prev = 1) lands on its x0 prediction, without noise.
    np.testing.assert_allclose(x, old_x0, atol=1e-6)


def test_dpmpp_2m_first_step_renoises_x0_prediction():
  """Zero terminal SNR: the first step sees x_T only through v; x = sqrt(a') x0 + sigma' n."""
  schedule = sch.make_schedule()
  plan = samplers.make_plan(schedule, 50)
  x, v, noise = (np.random.default_rng(k).standard_normal(SHAPE).astype(np.float32)
                 for k in range(3))
  got, x0 = samplers.dpmpp_2m_step(schedule, v, x, plan.timestep[0], plan.prev_timestep[0],
                                   plan.back_timestep[0], np.zeros(SHAPE, np.float32), noise)
  np.testing.assert_allclose(x0, -v, atol=1e-7)
  a_next = schedule.alphas_cumprod[979]
  np.testing.assert_allclose(got, np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * noise, atol=1e-6)


def test_steps_accept_per_example_timesteps():
  schedule = sch.make_schedule()
  x, v, x0_prev, noise = (np.random.default_rng(k).standard_normal(SHAPE).astype(np.float32)
                          for k in range(4))
  t, prev_t, back_t = np.array([979, 39]), np.array([959, 19]), np.array([999, 59])
  got = samplers.ddim_step(schedule, v, x, t, prev_t)[0]
  got_dpm = samplers.dpmpp_2m_step(schedule, v, x, t, prev_t, back_t, x0_prev, noise)[0]
  for b in range(2):
    np.testing.assert_allclose(got[b], samplers.ddim_step(
        schedule, v[b:b + 1], x[b:b + 1], t[b], prev_t[b])[0][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_dpm[b], samplers.dpmpp_2m_step(
        schedule, v[b:b + 1], x[b:b + 1], t[b], prev_t[b], back_t[b], x0_prev[b:b + 1],
        noise[b:b + 1])[0][0], rtol=1e-6, atol=1e-6)


def _oracle(schedule, x0):
  """The exact v for clean sample x0: from x0 = sqrt(a) x_t - sqrt(1-a) v,
  v = (sqrt(a) x_t - x0) / sqrt(1 - a) (a < 1 at every sampled t; at t=999, v = -x0)."""
  def denoise_fn(x_t, t, cond):
    del cond
    a = jnp.asarray(schedule.alphas_cumprod)[t][:, None, None]
    return (jnp.sqrt(a) * x_t - x0) / jnp.sqrt(1.0 - a)
  return denoise_fn


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("snr_shift_scale,num_steps", [(1.0, 50), (3.0, 50), (1.0, 10)])
def test_oracle_denoiser_recovers_x0(sampler, snr_shift_scale, num_steps):
  schedule = sch.make_schedule(snr_shift_scale=snr_shift_scale)
  x0 = 2.0 * jax.random.normal(jax.random.key(0), SHAPE)
  x_T = jax.random.normal(jax.random.key(1), SHAPE)
  out = samplers.sample(_oracle(schedule, x0), x_T, schedule=schedule, num_steps=num_steps,
                        sampler=sampler, rng=jax.random.key(2))
  np.testing.assert_allclose(out, x0, atol=1e-4)
  assert float(jnp.max(jnp.abs(x_T - x0))) > 1.0


@pytest.mark.parametrize("sampler,guidance_scale", [("ddim", 1.0), ("ddim", 3.0),
                                                    ("dpmpp_2m", 1.0), ("dpmpp_2m", 3.0)])
def test_oracle_denoiser_through_the_toy_jobs_sampling_path(sampler, guidance_scale):
  """The toy job's setting (25 steps, CFG 3, a latent of the toy's size): with the exact v the
  guided path returns the latent to float32 rounding, so sampling is not why a model fails."""
  schedule = sch.make_schedule()
  x0 = jax.random.normal(jax.random.key(0), (1, 13, 16, 8, 12))
  x_T = jax.random.normal(jax.random.key(1), x0.shape)
  a = jnp.asarray(schedule.alphas_cumprod)

  def denoise_fn(x_t, t, text):  # the cond and uncond texts give the same v: CFG is exact
    del text
    at = a[t].reshape(-1, 1, 1, 1, 1)
    return (jnp.sqrt(at) * x_t - x0) / jnp.sqrt(1.0 - at)

  out = samplers.sample(denoise_fn, x_T, schedule=schedule, num_steps=25, sampler=sampler,
                        rng=jax.random.key(2), guidance_scale=guidance_scale,
                        cond=jnp.ones(3), uncond=jnp.zeros(3))
  assert float(jnp.max(jnp.abs(out - x0))) < 2e-6


def _toy_denoiser(xp):
  """A smooth stand-in for the model, the same in jax (xp=jnp) and torch (xp=torch)."""
  def denoise_fn(x_t, t, cond):
    scale = 0.5 + t[:, None, None] / 1000.0
    return xp.tanh(0.7 * x_t + cond[:, None, :]) * scale - 0.1 * x_t
  return denoise_fn


def _pipeline_loop(scheduler, latents, cond, uncond, num_steps, guidance_scale, use_dynamic_cfg):
  """CogVideoXPipeline.__call__'s denoising loop (diffusers 0.42), with a toy transformer."""
  torch = pytest.importorskip("torch")
  dpm_class = pytest.importorskip("diffusers").CogVideoXDPMScheduler
  transformer = _toy_denoiser(torch)
  scheduler.set_timesteps(num_steps)
  timesteps = scheduler.timesteps
  do_classifier_free_guidance = guidance_scale > 1.0
  prompt_embeds = torch.cat([uncond, cond]) if do_classifier_free_guidance else cond
  old_pred_original_sample = None
  for i, t in enumerate(timesteps):
    latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
    timestep = t.expand(latent_model_input.shape[0])
    noise_pred = transformer(latent_model_input, timestep, prompt_embeds).float()
    scale = guidance_scale
    if use_dynamic_cfg:
      scale = 1 + guidance_scale * (
          (1 - math.cos(math.pi * ((num_steps - t.item()) / num_steps) ** 5.0)) / 2)
    if do_classifier_free_guidance:
      noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
      noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
    if not isinstance(scheduler, dpm_class):
      latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    else:
      latents, old_pred_original_sample = scheduler.step(
          noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
          return_dict=False)
  return latents


@pytest.mark.parametrize("sampler,guidance_scale,dynamic_cfg", [
    ("ddim", 6.0, False), ("ddim", 6.0, True), ("dpmpp_2m", 6.0, True), ("dpmpp_2m", 1.0, False)])
def test_sample_matches_diffusers_pipeline_loop(monkeypatch, sampler, guidance_scale,
                                                dynamic_cfg):
  torch = pytest.importorskip("torch")
  num_steps = 50
  schedule = sch.make_schedule()
  rng = jax.random.key(3)
  x_T = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
  cond, uncond = (np.random.default_rng(k).standard_normal((2, 5)).astype(np.float32)
                  for k in (5, 6))
  got = samplers.sample(_toy_denoiser(jnp), x_T, schedule=schedule, num_steps=num_steps,
                        sampler=sampler, rng=rng, guidance_scale=guidance_scale,
                        dynamic_cfg=dynamic_cfg, cond=cond, uncond=uncond)

  # Feed diffusers the noise our step i draws (both of its draws, only one is used).
  queue = _patch_dpm_noise(monkeypatch)
  for key in jax.random.split(rng, num_steps):
    noise = np.asarray(jax.random.normal(key, SHAPE, jnp.float32))
    queue.extend([noise, noise])
  scheduler = _dpm() if sampler == "dpmpp_2m" else _ddim()
  want = _pipeline_loop(scheduler, torch.from_numpy(x_T), torch.from_numpy(cond),
                        torch.from_numpy(uncond), num_steps, guidance_scale, dynamic_cfg)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=2e-5)
  assert float(jnp.std(got)) > 0.1  # not a degenerate all-zero output


def test_dynamic_guidance_matches_diffusers_formula():
  pipeline = pytest.importorskip("diffusers.pipelines.cogvideo.pipeline_cogvideox")
  source = inspect.getsource(pipeline.CogVideoXPipeline.__call__)
  # The formula we reproduce, with the training timestep t where a step index was meant
  # (diffusers#9641). If diffusers changes it, this test says so.
  assert ("self._guidance_scale = 1 + guidance_scale * (\n"
          "                        (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / "
          "num_inference_steps) ** 5.0)) / 2\n") in source
  timesteps = samplers.ddim_timesteps(sch.make_schedule(), 50)
  scales = samplers.dynamic_guidance_scales(4.0, timesteps)
  # Values published with diffusers PR #13172 for guidance 4 and 50 steps (t = 999, 979, ...).
  np.testing.assert_allclose(scales[:9], [1.8610, 2.0290, 4.9829, 4.6136, 2.1921, 3.1813, 1.0251,
                                          3.1136, 1.4120], atol=1e-4)
  assert scales.dtype == np.float32 and np.all((scales >= 1.0) & (scales <= 5.0))
  plan = samplers.make_plan(sch.make_schedule(), 50, guidance_scale=4.0, dynamic_cfg=True)
  np.testing.assert_array_equal(plan.guidance_scale, scales)


def test_cfg_batches_cond_and_uncond_in_one_call():
  calls = []

  def denoise_fn(x_t, t, cond):
    calls.append((x_t.shape, t.shape, jax.tree.map(jnp.shape, cond)))
    return _toy_denoiser(jnp)(x_t, t, cond["text"])

  x = jax.random.normal(jax.random.key(0), SHAPE)
  t = jnp.full((2,), 500, jnp.int32)
  cond = {"text": jax.random.normal(jax.random.key(1), (2, 5))}
  uncond = {"text": jax.random.normal(jax.random.key(2), (2, 5))}
  v_cond, v_uncond = denoise_fn(x, t, cond), denoise_fn(x, t, uncond)
  calls.clear()
  np.testing.assert_allclose(samplers.cfg_denoise(denoise_fn, x, t, cond, uncond, 1.0), v_cond,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(samplers.cfg_denoise(denoise_fn, x, t, cond, uncond, 6.0),
                             v_uncond + 6.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
  assert calls == [((4, 3, 5), (4,), {"text": (4, 5)})] * 2


def test_sample_jits_once_and_is_deterministic():
  traces = []

  def denoise_fn(x_t, t, cond):
    traces.append(None)  # runs at trace time only
    return _toy_denoiser(jnp)(x_t, t, cond)

  cond, uncond = jnp.ones((2, 5)), jnp.zeros((2, 5))
  run = jax.jit(functools.partial(samplers.sample, denoise_fn, schedule=sch.make_schedule(),
                                  num_steps=50, sampler="dpmpp_2m", guidance_scale=6.0,
                                  dynamic_cfg=True))
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  first = run(x_T, rng=jax.random.key(1), cond=cond, uncond=uncond)
  again = run(x_T, rng=jax.random.key(1), cond=cond, uncond=uncond)
  other = run(x_T, rng=jax.random.key(2), cond=cond, uncond=uncond)
  assert len(traces) == 1  # one trace of the denoiser for all 50 steps and all three calls
  np.testing.assert_array_equal(first, again)
  assert float(jnp.max(jnp.abs(first - other))) > 1e-2  # the noise comes from rng


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_python_loop_over_sample_step_equals_sample(sampler):
  schedule = sch.make_schedule()
  denoise_fn = _toy_denoiser(jnp)
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  cond, uncond = jnp.ones((2, 5)), -jnp.ones((2, 5))
  rng = jax.random.key(1)
  want = samplers.sample(denoise_fn, x_T, schedule=schedule, num_steps=10, sampler=sampler,
                         rng=rng, guidance_scale=3.0, cond=cond, uncond=uncond)
  plan = samplers.make_plan(schedule, 10, guidance_scale=3.0, rng=rng)
  step = jax.jit(functools.partial(samplers.sample_step, denoise_fn, schedule=schedule,
                                   sampler=sampler))
  state = samplers.init_state(x_T)
  for i in range(10):
    state = step(state, jax.tree.map(lambda a: a[i], plan), cond=cond, uncond=uncond)
  np.testing.assert_allclose(state.x, want, rtol=1e-5, atol=1e-5)


def test_callback_reports_every_step():
  seen = []
  schedule = sch.make_schedule()
  x0 = jnp.ones(SHAPE)
  samplers.sample(_oracle(schedule, x0), jnp.zeros(SHAPE), schedule=schedule, num_steps=5,
                  callback=lambda i: seen.append(int(i)))
  jax.effects_barrier()
  assert sorted(seen) == [0, 1, 2, 3, 4]


def test_sample_argument_errors():
  schedule = sch.make_schedule()
  fn, x = _toy_denoiser(jnp), jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="rng"):
    samplers.sample(fn, x, schedule=schedule, num_steps=5, sampler="dpmpp_2m",
                    cond=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="uncond"):
    samplers.sample(fn, x, schedule=schedule, num_steps=5, guidance_scale=6.0,
                    cond=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="sampler"):
    samplers.sample(fn, x, schedule=schedule, num_steps=5, sampler="euler")
