"""The five Tom-and-Jerry stages of ../shared/PAPER.md ("Staged context extension") as one table.

Each stage file is `get_config(arg)` calling `stage_config(seconds, arg)`. `arg="runlocal"`
shrinks the model, frames and batch so the same config runs on a CPU, but keeps the structure:
segment count, latent frame count, stage order, trainable groups and optimizer.
"""
import ml_collections

# seconds -> (steps, previous stage). 30 s: the paper trains 500-1000 steps; we take 500.
STAGES = {3: (5000, None), 9: (5000, 3), 18: (1000, 9), 30: (500, 18), 63: (250, 30)}


def _is_runlocal(arg) -> bool:
  if arg in (None, ""):
    return False
  if arg in ("runlocal", "runlocal=True", "runlocal=true", "runlocal=1"):
    return True
  raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")


def stage_config(seconds: int, arg=None) -> ml_collections.ConfigDict:
  if seconds not in STAGES:
    raise ValueError(f"no stage of {seconds} s; stages: {sorted(STAGES)}")
  runlocal = _is_runlocal(arg)
  steps, previous = STAGES[seconds]
  c = ml_collections.ConfigDict()
  c.stage = f"{seconds}s"
  c.runlocal = runlocal
  c.seed = 0
  c.segments = seconds // 3            # 3-second segments, each with its own text block
  c.latent_frames = 1 + 12 * c.segments  # 12 per segment + the first frame: 13 ... 253
  c.fps = 16
  c.height, c.width = 480, 720         # pixels; latent 60 x 90, 1350 tokens per latent frame

  # The DiT: CogVideoX-5B plus a TTT-MLP mixer (fields of ttt_jax.models.dit.DiTConfig).
  c.model = ml_collections.ConfigDict(dict(
      num_heads=48, head_dim=64, num_layers=42, in_channels=16, out_channels=16,
      text_embed_dim=4096, time_embed_dim=512, sample_height=60, sample_width=90,
      max_text_seq_length=226,
      mixer="ttt_mlp",                 # none | swa | mamba2 | gated_deltanet | ttt_linear | ttt_mlp
      mixer_gate_init=0.1,             # tanh(alpha), tanh(beta) gates start near 0.1
      mixer_options=ml_collections.ConfigDict(dict(
          mini_batch_size=64, inner_lr_base=0.1, checkpoint_group_size=16, impl="dual")),
      remat=True,
      dtype="bfloat16",                # compute; parameters stay float32
  ))
  c.text = ml_collections.ConfigDict(dict(
      checkpoint="",                   # converted T5 (python -m ttt_jax.convert t5 ...)
      tokenizer="",                    # sentencepiece model file (spiece.model)
      max_length=226,
  ))
  c.vae = ml_collections.ConfigDict(dict(
      checkpoint="",                   # converted VAE (python -m ttt_jax.convert vae ...)
      frame_batch_size=2,              # latent frames per decode batch: bounded memory at 63 s
      tiling=True,
  ))
  c.diffusion = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      rescale_zero_terminal_snr=True, snr_shift_scale=1.0))
  c.sampling = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=50, guidance_scale=6.0, dynamic_cfg=False))

  c.data = ml_collections.ConfigDict(dict(
      latents="",                      # python -m ttt_jax.data.precompute output for this stage
  ))
  # Devices: data x fsdp x context x tensor (ttt_jax/parallel/mesh.py); -1 takes the rest.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))

  first = previous is None
  c.init_from = ""                     # previous stage's workdir: parameters only
  c.previous_stage = "" if first else f"{previous}s"
  c.train = ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=64,                   # global
      # Stage 1 trains everything (TTT + gates at 1e-4, the rest at 1e-5, cosine); later stages
      # train the mixers, gates and attention q/k/v/o (+ q/k norms) at a constant 1e-5.
      trainable=("all",) if first else ("mixer", "gates", "attention"),
      lr=1e-5,
      mixer_lr=1e-4 if first else 1e-5,
      schedule="cosine" if first else "constant",
      warmup_steps=100 if first else 50,
      adam_b1=0.9, adam_b2=0.95,
      weight_decay=1e-4,               # not on biases and norms
      grad_clip=0.1,
      text_dropout=0.1,                # for classifier-free guidance
      checkpoint_every=250, keep_checkpoints=3, log_every=10,
      profile_steps=0,                 # >0: a jax.profiler trace of that many steps (clu)
      loss_weighting="snr_plus_one",   # CogVideoX's v-prediction weighting
  ))

  if runlocal:
    c.height, c.width = 32, 48         # latent 4 x 6: 2 x 3 tokens per latent frame
    c.model.update(dict(num_heads=2, head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                        text_embed_dim=32, time_embed_dim=16, sample_height=4, sample_width=6,
                        max_text_seq_length=8, dtype="float32"))
    c.model.mixer_options.update(dict(mini_batch_size=16, checkpoint_group_size=4))
    c.text.max_length = 8
    c.vae.tiling = False
    c.sampling.num_steps = 4
    c.train.update(dict(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1))
  return c
