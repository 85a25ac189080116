"""Diffusion for CogVideoX-style v-prediction: noise schedule, training loss, samplers.

Takes a denoise function `denoise_fn(x_t, t, cond) -> v`; imports no model code.
"""
from ttt_jax.diffusion.samplers import (
    SamplerState,
    SamplingPlan,
    cfg_denoise,
    ddim_step,
    ddim_timesteps,
    dpmpp_2m_step,
    dynamic_guidance_scales,
    init_state,
    make_plan,
    sample,
    sample_step,
)
from ttt_jax.diffusion.schedule import (
    NoiseSchedule,
    add_noise,
    eps_from_v,
    make_schedule,
    sample_timesteps,
    v_prediction_loss,
    v_target,
    x0_from_v,
)

__all__ = [
    "NoiseSchedule", "SamplerState", "SamplingPlan", "add_noise", "cfg_denoise", "ddim_step",
    "ddim_timesteps", "dpmpp_2m_step", "dynamic_guidance_scales", "eps_from_v", "init_state",
    "make_plan", "make_schedule", "sample", "sample_step", "sample_timesteps",
    "v_prediction_loss", "v_target", "x0_from_v",
]
