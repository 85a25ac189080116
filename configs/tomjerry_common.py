"""The five Tom-and-Jerry stages of ../shared/PAPER.md ("Staged context extension") as one table.

Each stage file is `get_config(arg)` calling `stage_config(seconds, arg)`. The argument
(configs/arguments.py) takes `runlocal`, `mixer=<name>` and `bf16`:

  configs/tomjerry_3s.py                      the paper's TTT-MLP stage
  configs/tomjerry_3s.py:runlocal             the same on a CPU: smaller model, frames and
                                              batch, same structure (segment and latent frame
                                              counts, stage order, trainable groups, optimizer)
  configs/tomjerry_3s.py:runlocal,mixer=swa   a baseline of configs/mixers.py, same stage
  configs/tomjerry_3s.py:runlocal,bf16        runlocal in the real configs' bfloat16 compute
                                              (runlocal alone is float32)

Every number is the public reference's (ttt-video-dit, configs/train/ttt-mlp and
configs/eval/ttt-mlp) unless a comment says why not; README "Recipe" lists them beside the
paper's.
"""
import copy

import ml_collections

from configs.arguments import parse_arguments
from configs.mixers import mixer_options
from ttt_jax.data.features import latent_frames

# seconds -> (steps, previous stage): the reference's TTT-MLP runs. The paper says 500-1000
# steps at 30 s; the reference trains 1000.
STAGES = {3: (5000, None), 9: (5000, 3), 18: (1000, 9), 30: (1000, 18), 63: (250, 30)}
# seconds -> warm-up steps (linear from 0), the reference's.
WARMUP_STEPS = {3: 100, 9: 100, 18: 50, 30: 50, 63: 25}
# T5 tokens per segment (the reference's txt_maxlen): chosen so that segments x text + latent
# frames x 1350 is a multiple of 64, TTT-MLP's mini-batch, so no mini-batch is padded.
TEXT_LENGTH = {3: 498, 9: 502, 18: 471, 30: 497, 63: 458}
# runlocal (6 tokens a latent frame, mini-batch 16): the same property at CPU size, >= 8 tokens.
RUNLOCAL_TEXT_LENGTH = {3: 18, 9: 22, 18: 15, 30: 9, 63: 10}


def _layout(fsdp: int, context: int = 1, tensor: int = 1, data: int = 1, remat: str = "full",
            remat_every_k_layers: int = 1, attention: str = "splash", ttt_impl: str = "pallas"):
  return dict(mesh=dict(data=data, fsdp=fsdp, context=context, tensor=tensor),
              model=dict(remat=remat, remat_every_k_layers=remat_every_k_layers,
                         attention_impl=attention, mixer_options=dict(impl=ttt_impl)))


# seconds -> {TPU slice: what fits it}: mesh, remat policy, attention and TTT kernel, as
# `python -m ttt_jax.plan` compiled them, every entry at all 42 layers (README "Plan" has the
# bytes a chip and each entry's compile time and host memory). plan.py applies the
# --topology's, train.py the one it runs on (ttt_jax/parallel/slices.py); flags that set these
# fields win. The global batch of 64 needs data x fsdp <= 64, so a slice of more chips splits
# the sequence over context; 48 heads divide by context x tensor. Slices: the paper trains on
# 256 H100s; v6e-256 (918 bf16 TFLOP/s a chip) is about that, v5p (459) runs the short stages
# on 64 chips, the rest on 128.
SLICE_LAYOUTS = {
    3: {"v5p-128": _layout(fsdp=64), "v6e-64": _layout(fsdp=64)},
    9: {"v5p-128": _layout(fsdp=64), "v6e-256": _layout(fsdp=64, context=4)},
    18: {"v5p-256": _layout(fsdp=64, context=2),
         "v6e-256": _layout(fsdp=16, context=8, tensor=2)},
    30: {"v5p-256": _layout(fsdp=32, context=4),
         "v6e-256": _layout(fsdp=16, context=8, tensor=2)},
    63: {"v5p-256": _layout(fsdp=16, context=8),
         "v6e-256": _layout(fsdp=16, context=8, tensor=2, remat_every_k_layers=2)},
}


def stage_config(seconds: int, arg=None) -> ml_collections.ConfigDict:
  if seconds not in STAGES:
    raise ValueError(f"no stage of {seconds} s; stages: {sorted(STAGES)}")
  args = parse_arguments(arg, runlocal=False, mixer="ttt_mlp", bf16=False)
  runlocal = args["runlocal"]
  steps, previous = STAGES[seconds]
  c = ml_collections.ConfigDict()
  c.stage = f"{seconds}s"
  c.runlocal = runlocal
  c.seed = 0
  c.segments = seconds // 3            # 3-second segments, each with its own text block
  c.fps = 16
  c.latent_frames = latent_frames(c.segments, c.fps)  # 13, 37, 73, 121, 253
  c.height, c.width = 480, 720         # pixels; latent 60 x 90, 1350 tokens per latent frame

  text_length = (RUNLOCAL_TEXT_LENGTH if runlocal else TEXT_LENGTH)[seconds]

  # The DiT: CogVideoX-5B plus a sequence mixer (fields of ttt_jax.models.dit.DiTConfig).
  c.model = ml_collections.ConfigDict(dict(
      num_heads=48, head_dim=64, num_layers=42, in_channels=16, out_channels=16,
      text_embed_dim=4096, time_embed_dim=512, sample_height=60, sample_width=90,
      max_text_seq_length=text_length,
      mixer=args["mixer"],             # configs/mixers.py: none | swa | mamba2 | ... | ttt_mlp
      mixer_gate_init=0.1,             # tanh(alpha), tanh(beta) gates start near 0.1
      mixer_options=mixer_options(args["mixer"], runlocal),
      # True = "full": each block recomputed in the backward pass. Other policies
      # (ttt_jax/models/dit.REMAT_POLICIES) through `python -m ttt_jax.plan --remat=NAME`; a bool
      # here because configs built on this one (configs/toy.py) set remat=False.
      remat=True,
      remat_every_k_layers=1,          # k > 1: keep every k-th block input only
      # "xla" holds a segment's whole [18k x 18k] x 48-head scores in the backward pass (about
      # 62 GB of float32 per sample at 3 s: ttt_jax/plan.py); "chunked" holds 512 rows.
      attention_impl="xla",
      dtype="bfloat16",                # compute; parameters stay float32
  ))
  c.text = ml_collections.ConfigDict(dict(
      checkpoint="",                   # converted T5 (python -m ttt_jax.convert t5 ...)
      tokenizer="",                    # sentencepiece model file (spiece.model)
      max_length=text_length,          # CogVideoX was pre-trained at 226; see TEXT_LENGTH
  ))
  # Latent scale: the converted VAE's scaling_factor, 0.7 for CogVideoX-5B (what it was
  # pre-trained on), applied by the loader and undone by sampling. The reference uses 1.0; we
  # keep 0.7 on purpose (README "Recipe").
  c.vae = ml_collections.ConfigDict(dict(
      checkpoint="",                   # converted VAE (python -m ttt_jax.convert vae ...)
      frame_batch_size=2,              # latent frames per decode batch: bounded memory at 63 s
      tiling=True,
  ))
  c.diffusion = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      rescale_zero_terminal_snr=True, snr_shift_scale=1.0))
  # The reference samples with SAT's VPSDEDPMPP2MSampler (= our "dpmpp_2m", SDE DPM-Solver++
  # 2M) and DynamicCFG(scale 6, exp 5): dynamic_cfg is that ramp, exponent 5
  # (ttt_jax/diffusion/samplers.dynamic_guidance_scales). "ddim" with a constant scale stays an
  # option (sampling.sampler="ddim", sampling.dynamic_cfg=False).
  c.sampling = ml_collections.ConfigDict(dict(
      sampler="dpmpp_2m", num_steps=50, guidance_scale=6.0, dynamic_cfg=True))

  c.data = ml_collections.ConfigDict(dict(
      latents="",                      # python -m ttt_jax.data.precompute output for this stage
      # Train on this many consecutive latent frames of each example, from a random start
      # (ttt_jax/data/loader.py); 0: all. 1 trains on keyframes as images (the toy's image phase).
      crop_frames=0,
  ))
  # Devices: data x fsdp x context x tensor (ttt_jax/parallel/mesh.py); -1 takes the rest.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
  # Per TPU slice, the mesh, remat, attention and TTT kernel that fit (SLICE_LAYOUTS). None at
  # runlocal size (2 heads); the TTT kernel only for the TTT-MLP layer they were measured with.
  layouts = {} if runlocal else copy.deepcopy(SLICE_LAYOUTS[seconds])
  if args["mixer"] != "ttt_mlp":
    for layout in layouts.values():
      del layout["model"]["mixer_options"]
  c.slice_layouts = ml_collections.ConfigDict(layouts)

  first = previous is None
  c.init_from = ""                     # previous stage's workdir: parameters only
  c.previous_stage = "" if first else f"{previous}s"
  c.train = ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=64,                   # global
      # Micro-batches a step (gradient accumulation); 0: global batch / (data x fsdp), one
      # sample a chip per micro-batch, what a 3 s sample of the 5B DiT fits (ttt_jax/plan.py).
      grad_accum_steps=0,
      # Stage 1 trains everything: mixers + gates on a cosine from 1e-4 to lr_end = 1e-5, the
      # rest at 1e-5 (its cosine from 1e-5 to 1e-5 is constant), as the reference. Later stages
      # train the mixers, gates and attention q/k/v/o (+ q/k norms) at a constant 1e-5.
      trainable=("all",) if first else ("mixer", "gates", "attention"),
      lr=1e-5,
      mixer_lr=1e-4 if first else 1e-5,
      lr_end=1e-5,                     # where "cosine" ends, for both groups
      schedule="cosine" if first else "constant",
      warmup_steps=WARMUP_STEPS[seconds],
      adam_b1=0.9, adam_b2=0.95,
      weight_decay=1e-4,               # not on biases and norms
      grad_clip=0.1,
      text_dropout=0.1,                # for classifier-free guidance
      checkpoint_every=250, keep_checkpoints=3, log_every=10,
      profile_steps=0,                 # >0: a jax.profiler trace of that many steps (clu)
      loss_weighting="snr_plus_one",   # CogVideoX's v-prediction weighting
      # Timesteps are CogVideoX's uniform draw; a share `high_t_fraction` of them is drawn from
      # [high_t_from, 1000) instead (diffusion.sample_timesteps says why one would).
      high_t_fraction=0.0, high_t_from=0,
  ))

  if runlocal:
    c.height, c.width = 32, 48         # latent 4 x 6: 2 x 3 tokens per latent frame
    c.model.update(dict(num_heads=2, head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                        text_embed_dim=32, time_embed_dim=16, sample_height=4, sample_width=6,
                        # float32 for tests that compare numbers; `bf16` keeps the real
                        # configs' dtype path (bf16 compute, float32 parameters and TTT state).
                        dtype="bfloat16" if args["bf16"] else "float32"))
    c.vae.tiling = False
    c.sampling.num_steps = 4
    # One micro-batch: the toy job's stages (built on runlocal) step their whole small batch.
    c.train.update(dict(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1,
                        grad_accum_steps=1))
  return c
