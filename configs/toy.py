"""The toy main job: the paper's whole pipeline on procedural cartoons, on a CPU in minutes.

  python -m ttt_jax.train --config=configs/toy.py --workdir=runs/toy        # 2 cores: 11-18 min
  python -m ttt_jax.train --config=configs/toy.py:long --workdir=runs/long  # run 8's, 4x
  python -m ttt_jax.train --config=configs/toy.py:images=false --workdir=runs/r8  # clips only

Builds toy_toons for the five stages (3, 9, 18, 30, 63 s), a tokenizer trained on their texts, a
text encoder and a fitted autoencoder (see ttt_jax/toy_job.py for which are trained and why), then
trains the DiT through an image stage and the five stages with hand-off, samples one minute from
a held-out storyboard and reports toy_toons' persistence, text-following and frame statistics.
Rerunning with the same workdir resumes where it stopped. On two cores the default took 10:37
(run 10's recipe, Zen 4 with AVX-512), and run 11's 11:53 and 18:01 on two days on the same Zen
3 model, with byte-identical results: the host's load sets the time.

The stage configs are configs/tomjerry_common.stage_config's, with the same structure (segment
counts, latent frame counts, schedules, optimizer, clipping, text dropout); what changes is size,
step counts, learning rates, and what a DiT trained from scratch at this size needs where the
paper's starts from a pretrained CogVideoX (README, "Why the toy sampled noise" and "How the toy
learns to remember", has the measurements):
  * width 128 (4 heads x 32): at equal CPU time it reaches a lower loss than width 64;
  * absolute positions: RoPE alone gives attention only relative positions, and a two-layer
    model cannot tell the wall from the floor; CogVideoX-5B-I2V's learned positional table
    (initialised, as in diffusers, to the 3D sin-cos table) is added to the tokens;
  * the x0-space loss (train.loss_weighting="none"), and stage 1 at batch 4: a model this small
    trained this briefly draws the characters better with both (README, "Drawing the
    characters");
  * an image stage before the 3 s stage: the same backbone on single keyframes of the 3 s clips,
    16 stories a step (IMAGES below), as CogVideoX trains on images beside videos;
  * keyframes every 8 frames, not CogVideoX's 4: the toy's motion is smooth, and a segment is
    then 6 latent frames, a 9 s step about 0.6 of the time (KEYFRAME_EVERY);
  * the 3 s stage trains the backbone without mixers, the role the pretrained CogVideoX plays in
    the paper, at about a third of the CPU time a step: on single segments the mixer has nothing
    to carry, and stage 1 shut its memory path 67-fold;
  * the 9 s stage, where the mixers and gates start, trains the paper's groups (mixers, gates,
    attention) at mixer lr 3e-3, with half of each batch at the noisiest timesteps (t >= 950),
    the only steps where a later segment needs the first one's text, and half at every
    timestep, which keeps the stage-1 drawing (all of it at t >= 950 and lr 1e-2, an earlier
    job, took the 9 s model's frame quality from 0.85 to 0.54). Training attention there, not
    the mixers and gates alone, is what lets a later segment draw each name in its own colour
    rather than either of the story's two (README, "Who wears which colour (run 11)"). The
    later stages train the same groups, again half at t >= 950, which keeps the memory path
    learning as the videos grow;
  * the 18 s stage at 300 steps: after an image stage and stage 1, three times its 100 kept the
    room in the later segments of 12 held-out minutes 0.90 of the time against 0.65, persistence
    0.413 against 0.314; without the image stage (run 7), 0.298 against 0.224 (README,
    "Memory needs steps");
  * the 30 s and 63 s stages at lr 3e-4: their few samples at 1e-3 undid the 18 s stage's memory;
  * the memory stages (9 s on) weight the x0 loss of each whitened latent channel by its
    std**2, which makes it the decoded pixels' squared error: under the whitened loss the three
    flat-colour channels are 3 of 16 equal shares, and the 9 s stage carried 2% of the floor's
    colour from segment 1's text to segments 2-3 (76% of the wall's); weighted as pixels, 27-31%
    (README, "Exact places, and the memory stages' loss in pixels");
`:runlocal` shrinks it further for the tests; `:mixer=NAME` swaps the sequence mixer;
`:images=false` drops the image stage and gives the 3 s stage run 8's 3000 steps.
"""
import ml_collections

from configs.arguments import given_arguments, parse_arguments
from configs.mixers import use_mixer
from configs.tomjerry_common import STAGES, stage_config
from ttt_jax.data.features import latent_frames

# seconds -> (steps, global batch) of the main job. Stage 1 is where the DiT learns to draw; stage 2
# where the mixers learn to remember. Stage 1 at batch 4: twice the steps of batch 8 for the same
# compute drew the characters better (README, "Drawing the characters").
# The 3 s stage follows the image stage (IMAGES): the two together drew segment 1 of 12 held-out
# minutes at colours 0.81 and shapes 0.45 where run 8's 3000 clip steps alone drew 0.57 and 0.30,
# in about the same time (README, "The image stage in the job (run 9)"). With keyframes every 8
# frames (KEYFRAME_EVERY) a 9 s step takes about 0.6 of its time at 4, and the job spends the
# time saved on 2x the clip steps and 1.5x the 9 s and 18 s steps (run 10: 12 held-out minutes
# at persistence 0.554 [0.529, 0.578] and text following 0.216 against run 9's 0.543 and 0.198,
# in 12.5 minutes against 14.5-15; README, "Keyframes every 8 frames (run 10)").
TOY_STAGES = {3: (2400, 4), 9: (450, 4), 18: (450, 2), 30: (30, 2), 63: (15, 1)}
# `:images=false`: no image stage, and run 8's 3000 steps for the 3 s stage. Run 8 itself (commit
# 610c5e0: keyframes every 4 frames, 300-step 9 s and 18 s stages) scored 12 held-out minutes at
# persistence 0.481 [0.443, 0.518] and text following 0.085; this variant was not rerun since.
CLIPS_ONLY_STEPS = 3000
# `:long`: four times run 8's training, stage 1 on clips alone (no image stage unless
# `:long,images`). On run 11's recipe (25 minutes here): on 12 held-out minutes persistence 0.711
# [0.676, 0.748] and text following 0.361 [0.292, 0.433] against the job's 0.616 and 0.254;
# segment 1 draws the characters' colours and shapes at 0.91 and 0.78 against 0.87 and 0.63
# (README, "`:long`: four times the training").
LONG_STAGES = {3: (12800, 4), 9: (1200, 4), 18: (1200, 2), 30: (80, 2), 63: (40, 1)}
# The image stage: (steps, batch) before the 3 s stage, on the 3 s clips' keyframes, one at a
# time, as one-frame videos (CogVideoX trains on images beside videos). A keyframe step at batch
# 16 sees four times the stories of a clip step at batch 4 for two thirds of its time, so stage 1
# sees many more drawings (README, "The image stage again", "The image stage in the job").
IMAGES, LONG_IMAGES = (2400, 16), (9600, 16)
# Tokens a segment's text is padded to. The longest text (segment 1's, which states the room and
# every character) is 34 with EOS; 36, with the text encoder at 1200 steps, scored 0.467 on 12
# held-out minutes against 48's 0.543, the room in later segments 0.87 against 0.97 (one
# training each; README, "The image stage in the job (run 9)").
TEXT_LENGTH = 48
# The autoencoder keeps every KEYFRAME_EVERY-th frame and interpolates linearly between them
# (ttt_jax/models/pixel_vae.py). Every toy motion is smooth over a 3 s segment, so 8 frames (half
# a second) lose under half a pixel of it, and a segment is 6 latent frames, not CogVideoX's 12.
KEYFRAME_EVERY = 8
# The 30 s and 63 s stages train few samples of few stories: at lr 1e-3 they undid the memory the
# 18 s stage had learned (README, "The late stages"); at 3e-4 the minute keeps it.
LATE_FROM, LATE_LR = 30, 3e-4
# The 9 s stage trains the memory path, half of it at the noisiest timesteps (module docstring).
# Against all of it there at mixer lr 1e-2 (an earlier job), two trainings of stages 2-5 each,
# on 12 held-out minutes: persistence 0.188 and 0.154 against 0.113 and 0.154, and the 9 s
# model's frame quality 0.73 and 0.74 against 0.54 and 0.55 (README, "The 9 s stage"). It trains
# the paper's groups, attention too (stage_config's `trainable`): with the mixers and gates alone
# a later segment drew the other character's colour where a character stood as often as its
# own (0.31 and 0.31, two trainings, 12 held-out 9 s storyboards); with attention, 0.40 against
# 0.28 (README, "Who wears which colour (run 11)").
MEMORY = dict(high_t_fraction=0.5, high_t_from=950, mixer_lr=3e-3)
# The memory stages' x0 loss weights each whitened latent channel by its std**2 (toy_job.
# channel_weights), the decoded pixels' squared error (module docstring).
MEMORY_CHANNEL_WEIGHT_POWER = 2.0


def _toy_stage(seconds: int, runlocal: bool, long: bool, images: bool
               ) -> ml_collections.ConfigDict:
  c = stage_config(seconds, "runlocal")
  c.stage = f"toy_{seconds}s"
  c.runlocal = runlocal
  c.height, c.width = 32, 48
  c.latent_frames = latent_frames(c.segments, c.fps, KEYFRAME_EVERY)
  # Linear patch autoencoder on 4x4 blocks: latents 8 x 12 x 16, 4 x 6 tokens a frame.
  c.model.update(dict(num_heads=4, head_dim=32, num_layers=2, in_channels=16, out_channels=16,
                      temporal_compression_ratio=KEYFRAME_EVERY,
                      text_embed_dim=64, time_embed_dim=32, sample_height=8, sample_width=12,
                      max_text_seq_length=TEXT_LENGTH, use_learned_positional_embeddings=True,
                      # Recomputing blocks saves memory this job does not need, for ~10% time;
                      # unrolling the two layers' scan saves 21% of a 3 s step and 13% of a 9 s
                      # one on 2 cores (README, "The toy main job").
                      remat=False, unroll_layers=True, dtype="float32"))
  # No rematerialisation in the TTT scan (checkpoint_group_size None): the toy's memory is
  # small, and against groups of 4 a 9 s step is 4-8% faster and compiles 7-13 s sooner (63 s),
  # the same loss and gradients to 4e-7 (README, "The image stage in the job (run 9)").
  c.model.mixer_options.update(dict(mini_batch_size=24, checkpoint_group_size=None))
  c.text.max_length = TEXT_LENGTH
  c.vae.update(dict(tiling=False, frame_batch_size=4))
  c.sampling.update(dict(sampler="ddim", dynamic_cfg=False, num_steps=25, guidance_scale=3.0))
  steps, batch = (LONG_STAGES if long else TOY_STAGES)[seconds]
  if seconds == 3 and not (images or long):
    steps = CLIPS_ONLY_STEPS
  first = STAGES[seconds][1] is None
  c.train.update(dict(
      steps=steps, batch_size=batch, lr=2e-3 if first else 1e-3,
      mixer_lr=3e-3 if first else 1e-3, warmup_steps=80 if first else 5,
      # The x0-space MSE, not CogVideoX's v-space one: v-space weights the nearly clean
      # timesteps by SNR + 1, and a model trained from scratch spends its few steps there
      # (README, "Drawing the characters").
      loss_weighting="none",
      # > 0 weights the sprites' x0 error 1 + this times as much (diffusion.foreground_mask):
      # measured at 1-16 on the memory stages, it carried the characters and lost the room
      # (README, "Weighting the characters").
      foreground_weight=0.0,
      checkpoint_every=max(steps // 2, 1), keep_checkpoints=2, log_every=10))
  if first:  # the backbone alone (module docstring)
    c.model.mixer, c.model.mixer_options = "none", {}
  else:  # the memory stages weight the loss as pixels (module docstring)
    c.train.channel_weight_power = MEMORY_CHANNEL_WEIGHT_POWER
  if seconds >= LATE_FROM:
    c.train.update(lr=LATE_LR, mixer_lr=LATE_LR)
  if seconds == 9:
    c.train.update(MEMORY)
  elif not first:  # half of each batch keeps training the memory path
    c.train.update(high_t_fraction=0.5, high_t_from=MEMORY["high_t_from"])
  if runlocal:
    c.train.update(dict(steps=2, batch_size=1, warmup_steps=1, checkpoint_every=1,
                        log_every=1))
    c.sampling.num_steps = 2
  return c


def _toy_images(runlocal: bool, long: bool) -> ml_collections.ConfigDict:
  """The image stage: the 3 s stage's backbone on single keyframes of its clips."""
  c = _toy_stage(3, runlocal, long, images=True)
  c.stage = "toy_images"
  c.data.crop_frames = 1
  if not runlocal:
    steps, batch = LONG_IMAGES if long else IMAGES
    c.train.update(dict(steps=steps, batch_size=batch, checkpoint_every=steps // 2))
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`arg` (configs/arguments.py): `runlocal`, `long`, `images` (the image stage first: on by
  default, off by default under `long`, whose measured recipe has none), `mixer=<name>`
  (configs/mixers.py)."""
  args = parse_arguments(arg, runlocal=False, long=False, images=True, mixer="ttt_mlp")
  runlocal, long = args["runlocal"], args["long"]
  images = args["images"] and (not long or "images" in given_arguments(arg))
  c = ml_collections.ConfigDict()
  c.pipeline = "toy"
  c.seed = 0
  c.height, c.width, c.fps = 32, 48, 16
  c.toy = ml_collections.ConfigDict(dict(
      dataset_seed=0,
      # Stories per stage. Stage 1 sees each fact combination it must generalise from: 256
      # stories, a few seconds to render and encode; the 9 s and 18 s stages' 1200 and 600
      # samples see each of theirs about 5 times (not 37: the same held-out scores, a memory
      # stage that does not learn its stories). The 30 s and 63 s stages train 60 and 15
      # samples: on 8 and 4 stories they learned those stories and lost the drawing and the
      # memory the 18 s stage had (README, "The late stages"); more stories cost only encoding.
      num_train=dict(s3=256, s9=256, s18=128, s30=32, s63=16) if not runlocal
      else dict(s3=2, s9=1, s18=1, s30=1, s63=1),
      num_test=2 if not runlocal else 1,
      sample_story=0,                  # index into the 63 s test split: held out from training
      # XLA CPU devices the job's train steps split their batch over (0: one per core; the
      # command sets it before JAX starts: toy_job.split_host_cpu says why).
      cpu_devices=0,
  ))
  # Linear patch autoencoder (PCA of 4x4x3 blocks to 16 channels), fitted by the pipeline.
  # normalize="channel": each channel whitened (ttt_jax/models/pixel_vae.py says why).
  c.vae = ml_collections.ConfigDict(dict(kind="pixel", patch=4, latent_channels=16,
                                         temporal_compression_ratio=KEYFRAME_EVERY,
                                         normalize="channel"))
  # A T5 v1.1 encoder of this size, random, then trained on a language objective and frozen.
  c.text = ml_collections.ConfigDict(dict(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                          num_heads=4, max_length=TEXT_LENGTH))
  # T5's relative-position buckets over +-32 tokens: 32 (16 a direction) tell offsets 0-7 apart
  # and longer ones in log-spaced buckets, which the objective needs; 8 tell only 0 and 1 apart
  # (3000 steps reached held-out colour accuracy 0.83).
  c.text.relative_attention_buckets = 32
  # ttt_jax/data/toy_text.py's objective (name tokens state their character's colour, shape,
  # action and place, every token the room and floor) on `stories` stories of `segments`;
  # steps=0 keeps the encoder random. The paper's T5 is pretrained; a random one left stage 1
  # drawing the room in 0.83 of held-out clips and the characters' colours in 0.18, a trained
  # one 1.00 and 0.28 (README, "Drawing the characters"). 2000 steps: colour accuracy 0.993 in
  # 115 s; 1000 steps: 0.916.
  c.text.pretrain = ml_collections.ConfigDict(dict(
      steps=1500 if not runlocal else 5, stories=2000 if not runlocal else 8, segments=3,
      batch_size=64, lr=3e-3))
  c.stages = ml_collections.ConfigDict(
      {f"s{s}": _toy_stage(s, runlocal, long, images) for s in STAGES})
  if images:
    c.stages.images = _toy_images(runlocal, long)
  for stage in c.stages.values():
    # One seed for the job: `--config.seed=1` must reach the DiT's initialisation, the data order
    # and the noise of every stage, not only the text encoder's (it used to reach only that).
    # A shared reference: setting any stage's seed sets the job's and every other stage's.
    stage.seed = c.get_ref("seed")
  for seconds in STAGES:
    stage = c.stages[f"s{seconds}"]
    if seconds == 3:  # the backbone has no mixer, whatever the later stages use
      continue
    use_mixer(stage.model, args["mixer"], runlocal=True)  # the toy's sizes are runlocal's
  return c
