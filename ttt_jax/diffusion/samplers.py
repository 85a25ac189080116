"""CogVideoX's samplers (DDIM, SDE-DPM-Solver++ 2M) with classifier-free guidance, as one lax.scan.

Each step reproduces diffusers' CogVideoXDDIMScheduler.step / CogVideoXDPMScheduler.step for a
v-prediction model, and the loop reproduces CogVideoXPipeline's (guidance, dynamic CFG, the DPM
scheduler's look-back to the previous x0 prediction). The whole loop is a `lax.scan` over a
precomputed `SamplingPlan`, so `jax.jit(sample)` compiles the denoiser once, whatever num_steps.
A Python loop can drive `sample_step` instead (e.g. for a progress bar):

    plan = make_plan(schedule, 50, guidance_scale=6.0, rng=rng)
    state = init_state(x_T)
    step = jax.jit(functools.partial(sample_step, denoise_fn, schedule=schedule,
                                     sampler="dpmpp_2m"))
    for i in range(50):
      state = step(state, jax.tree.map(lambda a: a[i], plan), cond=cond, uncond=uncond)
    x0 = state.x

`denoise_fn(x_t [batch, ...], t int32 [batch], cond) -> v [batch, ...]` is any function;
this module imports no model code.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.diffusion.schedule import NoiseSchedule, x0_from_v

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

# alphas_cumprod "after" the last step (diffusers' final_alpha_cumprod): CogVideoX's scheduler
# configs set set_alpha_to_one=True, so the last step lands on the clean sample.
FINAL_ALPHA_CUMPROD = 1.0

SAMPLERS = ("ddim", "dpmpp_2m")


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """diffusers' timestep_spacing="trailing": int32 [num_steps], e.g. 999, 979, ..., 19 for 50."""
  num_train = schedule.num_train_timesteps
  if not 1 <= num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  timesteps = np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
  if len(timesteps) != num_steps:
    # np.arange with a float step overshoots by one for some counts (61, 103, ...); diffusers
    # then runs an extra step at t=-1. Refuse rather than reproduce that.
    raise ValueError(f"trailing spacing gives {len(timesteps)} timesteps for num_steps="
                     f"{num_steps} (float rounding in the spacing formula); use another count")
  return timesteps.astype(np.int32)


def dynamic_guidance_scales(guidance_scale: float, timesteps: np.ndarray) -> np.ndarray:
  """CogVideoXPipeline's use_dynamic_cfg scale per step, float32 [num_steps].

  diffusers (0.42) computes, at training timestep t of N inference steps,
      1 + s * (1 - cos(pi * ((N - t) / N) ** 5)) / 2.
  With t in 0..999 rather than a step index, (N - t) / N is far below -1 and the scale oscillates
  between 1 and 1 + s instead of ramping (diffusers issue #9641). CogVideoX's SAT sampler does the
  same (step_index = num_steps - timestep), and its authors keep this wave-like schedule on
  purpose (zai-org/CogVideo#267), so it is reproduced as is. The power of a number of size ~20 is
  ~1e7 radians, beyond float32, hence this host-side float64 computation.
  """
  n = len(timesteps)
  return np.array([1.0 + guidance_scale * (1.0 - math.cos(math.pi * ((n - int(t)) / n)**5.0)) / 2.0
                   for t in timesteps], dtype=np.float32)


class SamplingPlan(NamedTuple):
  """Per-step inputs of the loop, each with a leading [num_steps] axis (what the scan runs over)."""
  timestep: np.ndarray        # int32: t_i.
  prev_timestep: np.ndarray   # int32: t_i - num_train // num_steps (diffusers); < 0: clean.
  back_timestep: np.ndarray   # int32: t_{i-1}, -1 on the first step (DPM++ 2M's look-back).
  guidance_scale: np.ndarray  # float32: classifier-free guidance scale of the step.
  index: np.ndarray           # int32: i, for progress callbacks.
  key: jax.Array | None       # [num_steps] PRNG keys for DPM++ 2M's noise; None without rng.


def make_plan(schedule: NoiseSchedule, num_steps: int, *, guidance_scale: float = 1.0,
              dynamic_cfg: bool = False, rng: jax.Array | None = None) -> SamplingPlan:
  """The sampling loop's per-step inputs; step i's noise is normal(split(rng, num_steps)[i])."""
  timesteps = ddim_timesteps(schedule, num_steps)
  if dynamic_cfg:
    scales = dynamic_guidance_scales(guidance_scale, timesteps)
  else:
    scales = np.full(num_steps, guidance_scale, np.float32)
  return SamplingPlan(
      timestep=timesteps,
      prev_timestep=(timesteps - schedule.num_train_timesteps // num_steps).astype(np.int32),
      back_timestep=np.concatenate([[-1], timesteps[:-1]]).astype(np.int32),
      guidance_scale=scales,
      index=np.arange(num_steps, dtype=np.int32),
      key=None if rng is None else jax.random.split(rng, num_steps))


def _alpha(schedule: NoiseSchedule, t) -> jax.Array:
  """alphas_cumprod[t], FINAL_ALPHA_CUMPROD where t < 0 (the step after the last)."""
  t = jnp.asarray(t)
  a = jnp.asarray(schedule.alphas_cumprod)[jnp.maximum(t, 0)]
  return jnp.where(t >= 0, a, jnp.float32(FINAL_ALPHA_CUMPROD))


def _bcast(c: jax.Array, ndim: int) -> jax.Array:
  return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def ddim_step(schedule: NoiseSchedule, v, x_t, t, prev_t) -> tuple[jax.Array, jax.Array]:
  """One deterministic DDIM step x_t -> x_{prev_t}: returns (x_prev, x0_pred).

  CogVideoXDDIMScheduler.step with prediction_type="v_prediction" (it ignores eta: no noise):
      x_prev = sqrt((1 - a_prev) / (1 - a_t)) x_t + (sqrt(a_prev) - sqrt(a_t) * that) x0_pred.
  t, prev_t: scalars or [batch]; prev_t < 0 means a_prev = 1.
  """
  ndim = jnp.ndim(x_t)
  a_t, a_prev = _bcast(_alpha(schedule, t), ndim), _bcast(_alpha(schedule, prev_t), ndim)
  x0 = x0_from_v(schedule, x_t, v, t)
  coef_x = jnp.sqrt((1.0 - a_prev) / (1.0 - a_t))
  coef_x0 = jnp.sqrt(a_prev) - jnp.sqrt(a_t) * coef_x
  return coef_x * x_t + coef_x0 * x0, x0


def _log_snr_half(a: jax.Array) -> jax.Array:
  """lambda = log(sqrt(a / (1 - a))): -inf at a = 0, +inf at a = 1, as in diffusers."""
  return jnp.log(jnp.sqrt(a / (1.0 - a)))


def dpmpp_2m_step(schedule: NoiseSchedule, v, x_t, t, prev_t, back_t, x0_prev,
                  noise) -> tuple[jax.Array, jax.Array]:
  """One SDE-DPM-Solver++(2M) step x_t -> x_{prev_t}: returns (x_prev, x0_pred).

  CogVideoXDPMScheduler.step with prediction_type="v_prediction". With lambda = log sqrt(SNR) and
  h = lambda(prev_t) - lambda(t):
      x_prev = sqrt((1-a_prev)/(1-a_t)) e^-h x_t - expm1(-2h) sqrt(a_prev) D
               + sqrt(1-a_prev) sqrt(1 - e^-2h) noise,
  where D = x0_pred (first order) on the first step (back_t < 0) and on the last (prev_t < 0),
  and otherwise D = (1 + 1/2r) x0_pred - (1/2r) x0_prev with r = (lambda(t) - lambda(back_t)) / h.
  diffusers draws fresh noise for the second-order update and discards the first draw, so one
  standard-normal `noise` per step is the same process. With zero terminal SNR, lambda(999) =
  -inf: the first step re-noises x0_pred to t_1, and the second's r is inf (first order too).
  x0_prev is ignored on the first step (pass zeros); t, prev_t, back_t: scalars or [batch].
  """
  ndim = jnp.ndim(x_t)
  a_t, a_prev, a_back = (_bcast(_alpha(schedule, s), ndim) for s in (t, prev_t, back_t))
  x0 = x0_from_v(schedule, x_t, v, t)
  lam_t = _log_snr_half(a_t)
  h = _log_snr_half(a_prev) - lam_t
  mult_x = jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.exp(-h)
  mult_d = jnp.expm1(-2.0 * h) * jnp.sqrt(a_prev)
  mult_noise = jnp.sqrt(1.0 - a_prev) * jnp.sqrt(1.0 - jnp.exp(-2.0 * h))
  second_order = _bcast((jnp.asarray(back_t) >= 0) & (jnp.asarray(prev_t) >= 0), ndim)
  r = (lam_t - _log_snr_half(a_back)) / h
  # Selected before use: on the last step h = inf makes r = 0 and 1 / (2r) = inf.
  mult_back = jnp.where(second_order, 1.0 / (2.0 * r), 0.0)
  d = (1.0 + mult_back) * x0 - mult_back * x0_prev
  return mult_x * x_t - mult_d * d + mult_noise * noise, x0


def cfg_denoise(denoise_fn: DenoiseFn, x_t, t, cond, uncond, guidance_scale) -> jax.Array:
  """Classifier-free guidance in one batched call: v_u + s (v_c - v_u), float32.

  x_t [batch, ...] and t [batch] are repeated and cond/uncond (pytrees of [batch, ...] arrays,
  uncond = negative-prompt embeddings) concatenated on the batch axis, uncond first (diffusers).
  """
  batch = x_t.shape[0]
  both = lambda u, c: jnp.concatenate([u, c], axis=0)
  v = denoise_fn(both(x_t, x_t), both(t, t), jax.tree.map(both, uncond, cond))
  v = v.astype(jnp.float32)
  v_uncond, v_cond = v[:batch], v[batch:]
  return v_uncond + guidance_scale * (v_cond - v_uncond)


class SamplerState(NamedTuple):
  """The loop's carry."""
  x: jax.Array        # Current latent x_t [batch, ...]; the sample after the last step.
  x0_pred: jax.Array  # Latest clean-latent prediction, float32 (DPM++ 2M's look-back).


def init_state(x_T: jax.Array) -> SamplerState:
  return SamplerState(x=x_T, x0_pred=jnp.zeros(x_T.shape, jnp.float32))


def sample_step(denoise_fn: DenoiseFn, state: SamplerState, step: SamplingPlan, *,
                schedule: NoiseSchedule, sampler: str = "ddim", cond: Any = None,
                uncond: Any = None) -> SamplerState:
  """One denoising step; `step` is one row of a SamplingPlan. Guided iff uncond is given."""
  x = state.x
  t = jnp.full((x.shape[0],), step.timestep, jnp.int32)
  if uncond is None:
    v = denoise_fn(x, t, cond).astype(jnp.float32)
  else:
    v = cfg_denoise(denoise_fn, x, t, cond, uncond, step.guidance_scale)
  if sampler == "ddim":
    x_prev, x0 = ddim_step(schedule, v, x, step.timestep, step.prev_timestep)
  elif sampler == "dpmpp_2m":
    if step.key is None:
      raise ValueError("sampler 'dpmpp_2m' injects noise: pass rng")
    noise = jax.random.normal(step.key, x.shape, jnp.float32)
    x_prev, x0 = dpmpp_2m_step(schedule, v, x, step.timestep, step.prev_timestep,
                               step.back_timestep, state.x0_pred, noise)
  else:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  return SamplerState(x=x_prev.astype(x.dtype), x0_pred=x0.astype(jnp.float32))


def sample(denoise_fn: DenoiseFn, x_T: jax.Array, *, schedule: NoiseSchedule, num_steps: int,
           sampler: str = "ddim", rng: jax.Array | None = None, guidance_scale: float = 1.0,
           dynamic_cfg: bool = False, cond: Any = None, uncond: Any = None,
           callback: Callable[[Any], None] | None = None) -> jax.Array:
  """Runs the whole sampling loop as one lax.scan; returns the clean latent [batch, ...].

  x_T: initial noise (CogVideoX's init_noise_sigma is 1), kept in its dtype between steps.
  num_steps, sampler, guidance_scale, dynamic_cfg: Python values (static under jit).
  rng: needed by "dpmpp_2m" (step i uses normal(split(rng, num_steps)[i])); unused by "ddim".
  As in CogVideoXPipeline, guidance (with `uncond`, the negative prompt) runs iff
  guidance_scale > 1; dynamic_cfg makes the scale per step (`dynamic_guidance_scales`).
  callback(step_index) is called from the device after each step (jax.debug.callback).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if sampler == "dpmpp_2m" and rng is None:
    raise ValueError("sampler 'dpmpp_2m' injects noise: pass rng")
  guided = guidance_scale > 1.0
  if guided and (cond is None or uncond is None):
    raise ValueError("guidance_scale > 1 needs both cond and uncond")
  plan = make_plan(schedule, num_steps, guidance_scale=guidance_scale, dynamic_cfg=dynamic_cfg,
                   rng=rng if sampler == "dpmpp_2m" else None)
  step_fn = functools.partial(sample_step, denoise_fn, schedule=schedule, sampler=sampler,
                              cond=cond, uncond=uncond if guided else None)

  def body(state, step):
    state = step_fn(state, step)
    if callback is not None:
      jax.debug.callback(callback, step.index)
    return state, None

  state, _ = jax.lax.scan(body, init_state(x_T), plan)
  return state.x
