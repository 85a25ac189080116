"""CogVideoX's noise schedule: v-prediction on a zero-terminal-SNR, SNR-shifted DDPM schedule.

Notation: `a_t` is alphas_cumprod[t] ("alpha bar"), the signal variance at training timestep t.

    x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise          (add_noise)
    v   = sqrt(a_t) * noise - sqrt(1 - a_t) * x0          (v_target)
    x0  = sqrt(a_t) * x_t - sqrt(1 - a_t) * v             (x0_from_v)
    eps = sqrt(a_t) * v + sqrt(1 - a_t) * x_t             (eps_from_v)

The schedule reproduces diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler constructor
(CogVideoX-5b config: scaled_linear 0.00085..0.012, rescale_betas_zero_snr=True,
snr_shift_scale=1.0; CogVideoX-2b uses snr_shift_scale=3.0), computed in float64 like diffusers
and stored in float32. With the zero-terminal-SNR rescale a_999 is exactly 0: the last training
timestep is pure noise, where x0 = -v.

Everything broadcasts over a leading batch axis: x [batch, ...], t [batch] (or a scalar t).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["alphas_cumprod"],
                   meta_fields=["num_train_timesteps"])
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """alphas_cumprod [num_train_timesteps] float32; a pytree whose only leaf is that array."""
  alphas_cumprod: np.ndarray | jax.Array
  num_train_timesteps: int


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                  rescale_zero_terminal_snr: bool = True,
                  snr_shift_scale: float = 1.0) -> NoiseSchedule:
  """The schedule of diffusers' CogVideoX schedulers with the same arguments."""
  if beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                        dtype=np.float64)**2
  elif beta_schedule == "linear":
    # diffusers builds this one in float32; the float64 product differs by ~1e-7.
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    betas = betas.astype(np.float64)
  else:
    raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
  alphas_cumprod = np.cumprod(1.0 - betas)
  # SD3-style SNR shift: SNR_t -> SNR_t / snr_shift_scale.
  alphas_cumprod = alphas_cumprod / (snr_shift_scale + (1.0 - snr_shift_scale) * alphas_cumprod)
  if rescale_zero_terminal_snr:
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    # shift sqrt(a) so the last step is 0, rescale so the first keeps its value.
    sqrt_a = np.sqrt(alphas_cumprod)
    first, last = sqrt_a[0], sqrt_a[-1]
    sqrt_a = (sqrt_a - last) * (first / (first - last))
    alphas_cumprod = sqrt_a**2
  return NoiseSchedule(alphas_cumprod=alphas_cumprod.astype(np.float32),
                       num_train_timesteps=num_train_timesteps)


def _coefs(schedule: NoiseSchedule, t, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(sqrt(a_t), sqrt(1 - a_t)) for t [batch], shaped to broadcast against x [batch, ...]."""
  a = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
  a = a.reshape(a.shape + (1,) * (ndim - a.ndim))
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(schedule: NoiseSchedule, x0, noise, t) -> jax.Array:
  """Forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise [batch, ...], t [batch]."""
  signal, sigma = _coefs(schedule, t, jnp.ndim(x0))
  return signal * x0 + sigma * noise


def v_target(schedule: NoiseSchedule, x0, noise, t) -> jax.Array:
  """The velocity the model learns to predict: v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
  signal, sigma = _coefs(schedule, t, jnp.ndim(x0))
  return signal * noise - sigma * x0


def x0_from_v(schedule: NoiseSchedule, x_t, v, t) -> jax.Array:
  """Clean-sample estimate from a v-prediction: x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v."""
  signal, sigma = _coefs(schedule, t, jnp.ndim(x_t))
  return signal * x_t - sigma * v


def eps_from_v(schedule: NoiseSchedule, x_t, v, t) -> jax.Array:
  """Noise estimate from a v-prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x_t."""
  signal, sigma = _coefs(schedule, t, jnp.ndim(x_t))
  return signal * v + sigma * x_t


def v_prediction_loss(schedule: NoiseSchedule, v_pred, x0, noise, t,
                      weighting: str = "snr_plus_one", channel_weights=None,
                      foreground_weight: float = 0.0) -> jax.Array:
  """CogVideoX's fine-tuning loss, a scalar (mean over batch of per-example means).

  As in CogVideoX's SAT `VideoDiffusionLoss` and diffusers' examples/cogvideo training scripts,
  the v-prediction is turned into an x0 estimate (diffusers does this through
  `scheduler.get_velocity(model_output, noisy_input, t)`) and compared with the clean latent:

      loss = mean_batch mean_elements( w_t * (x0_from_v(x_t, v_pred) - x0)**2 )

  weighting="snr_plus_one": w_t = 1 / (1 - a_t) = SNR_t + 1, CogVideoX's choice. Since
  x0_pred - x0 = -sqrt(1 - a_t) (v_pred - v), this equals the plain v-space MSE; it is written in
  x0 space to follow the reference computation (same rounding). weighting="none": w_t = 1, the
  unweighted x0-space MSE, which down-weights the noisy timesteps by (1 - a_t).

  channel_weights: None, or [C] weights of the latent channels (axis 2 of [B, F, C, h, w]),
  used as given (so weights of mean 1 keep the loss's scale).
  foreground_weight: lambda >= 0; the error at latent pixels `foreground_mask` marks in x0 costs
  1 + lambda times as much (flat-background video: what is not the row's background).
  """
  if weighting == "snr_plus_one":
    weights = 1.0 / (1.0 - jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)])
  elif weighting == "none":
    weights = jnp.ones(jnp.shape(t), jnp.float32)
  else:
    raise ValueError(f"weighting must be 'snr_plus_one' or 'none', got {weighting!r}")
  x_t = add_noise(schedule, x0, noise, t)
  x0_pred = x0_from_v(schedule, x_t, v_pred, t)
  sq_err = jnp.square(x0_pred.astype(jnp.float32) - x0.astype(jnp.float32))
  if channel_weights is not None:
    w = jnp.asarray(channel_weights, jnp.float32)
    if sq_err.ndim != 5 or w.shape != (sq_err.shape[2],):
      raise ValueError(f"channel_weights of shape {w.shape} for latents {sq_err.shape}: expected "
                       f"one weight per channel of [B, F, C, h, w]")
    sq_err = sq_err * w[:, None, None]
  if foreground_weight:
    if foreground_weight < 0 or sq_err.ndim != 5:
      raise ValueError(f"foreground_weight={foreground_weight} for latents {sq_err.shape}: "
                       f"expected a weight >= 0 and latents [B, F, C, h, w]")
    fg = foreground_mask(x0)
    sq_err = sq_err * (1.0 + foreground_weight * fg[:, :, None].astype(jnp.float32))
  per_example = jnp.mean(sq_err.reshape(sq_err.shape[0], -1), axis=1)
  return jnp.mean(weights * per_example)


def foreground_mask(x0, tol: float = 0.5) -> jax.Array:
  """bool [B, F, h, w]: latent pixels of x0 [B, F, C, h, w] that differ from their row's
  background, the value most pixels of the row share (within `tol`, RMS over channels).

  A flat-colour cartoon's wall and floor encode to one latent per row band, so this marks the
  sprites (and the pixels their edges touch): small objects a squared error over the whole frame
  weighs by their area only.
  """
  x = jnp.moveaxis(jnp.asarray(x0, jnp.float32), 2, -1)  # [B, F, h, w, C]
  near = lambda ref: jnp.mean(jnp.square(x - ref[..., None, :]), -1) < tol ** 2  # [B, F, h, w]
  # One candidate column at a time: the all-pairs comparison is [B, F, h, w, w, C], 8 GB an
  # example at the real configs' 253 x 60 x 90 latents; this holds one [B, F, h, w] at a time.
  shared = jax.lax.map(lambda i: jnp.sum(near(x[..., i, :]), -1), jnp.arange(x.shape[-2]))
  background = jnp.argmax(shared, 0)  # [B, F, h]: the row's most shared pixel (first on ties)
  return ~near(jnp.take_along_axis(x, background[..., None, None], -2)[..., 0, :])


def sample_timesteps(rng: jax.Array, batch: int, schedule: NoiseSchedule,
                     high_fraction: float = 0.0, high_from: int = 0) -> jax.Array:
  """Training timesteps: int32 [batch].

  Uniform over {0, ..., num_train_timesteps - 1} (CogVideoX's), except that a `high_fraction`
  share of the batch, in expectation, is drawn uniformly from {high_from, ..., T - 1} instead:
  what a video's later segments can only learn from its first one's text (long-range memory)
  is needed only at the noisiest steps, where their own frames do not show it yet.
  """
  if not 0.0 <= high_fraction <= 1.0:
    raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
  if not 0 <= high_from < schedule.num_train_timesteps:
    raise ValueError(f"high_from must be in [0, {schedule.num_train_timesteps}), got {high_from}")
  if high_fraction == 0.0:
    return jax.random.randint(rng, (batch,), 0, schedule.num_train_timesteps, dtype=jnp.int32)
  u_rng, h_rng, c_rng = jax.random.split(rng, 3)
  t = jax.random.randint(u_rng, (batch,), 0, schedule.num_train_timesteps, dtype=jnp.int32)
  high = jax.random.randint(h_rng, (batch,), high_from, schedule.num_train_timesteps,
                            dtype=jnp.int32)
  return jnp.where(jax.random.uniform(c_rng, (batch,)) < high_fraction, high, t)
