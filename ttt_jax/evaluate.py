"""Scores a trained toy run on held-out storyboards: persistence, text following, frame quality.

  python -m ttt_jax.evaluate --workdir=runs/toy [--storyboards=a.json,b.json]
      [--num_storyboards=N] [--out=DIR] [--seed=N] [--stage=NAME] [--guidance_scale=G]
      [--num_steps=N] [--sampler=ddim|dpmpp_2m] [--verbose]

--workdir is a toy job's workdir (python -m ttt_jax.train --config=configs/toy.py); its last
stage (the one trained on the most segments, stages/<stage>/model; --stage=NAME picks another,
e.g. toy_9s, scored on held-out stories of its own length) is sampled through
`sample.Sampler`, the toy job's own sampler, with the stage's saved config
(checkpoint.load_run_config); --guidance_scale, --num_steps and --sampler replace its
sampling settings, so one trained run can be scored under several (eval.json records them).

Storyboards: by default the toy_toons test split of that stage's dataset (never trained on), or,
with --num_storyboards=N, its first N stories: test stories beyond the split's size come from the
same held-out seeds (builders/toy_toons.story_seed), so they are never trained on either.
--storyboards takes toy_toons story files instead (`toy_toons.Story.to_json()`, as this command
writes them to OUT/stories/): a sampling storyboard alone (a list of segment texts) cannot be
scored, as the metrics need the story's facts and actions, and its rendering.

Per storyboard (one video, one seed, the same for every storyboard and every run, so runs are
compared on the same noise):
  persistence     toy_metrics.persistence_score: per segment the mean of its room, colour and shape
                  checks; "mean" is its "overall" (segments 2..N, which no text describes);
  text_following  toy_metrics.text_following_score per segment; "mean" over segments;
  frame_quality   per segment, 1 - (colour + edge) / 2 against the story's own rendering:
                  colour, the total-variation distance between the two videos' colour histograms
                  (4 levels a channel, 64 bins); edge, the difference of their edge densities (the
                  share of adjacent pixel pairs that differ by more than 24/255, 1 -
                  toy_metrics.frame_statistics' flatness). 1 means the frames have the rendering's
                  palette proportions and its amount of edges; it does not say where things are
                  (persistence and text following do), and it needs no network.
  colour_at_place toy_metrics.colour_at_place over segments 2..N (and segment 1's "stated"): of
                  the colours drawn where the story puts each character, the shares that are its
                  own, the other character's ("swapped"), a third character colour, or the
                  background. Outside the bootstrap: it says why persistence's colours fail.
                  "stated_first_scene" / "swapped_first_scene" count the later segments still
                  in segment 1's scene (the colour can carry on from the frame before),
                  "..._after_cut" those after a scene cut (only a name-to-colour memory helps);
                  each the mean over the storyboards that have such segments.

OUT (default WORKDIR/eval, replaced whole, never half-written): eval.json (per storyboard, and
"metrics": means over storyboards with percentile-bootstrap intervals, overall and per segment),
eval.png (score against segment index, one line per metric, the intervals shaded), videos/*.mp4,
stories/*.json.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from ttt_jax import bootstrap, cli
from ttt_jax.data import toy_metrics, toy_toons
from ttt_jax.data.features import frames_per_segment

METRICS = ("persistence", "text_following", "frame_quality")
_LABELS = {"persistence": "persistence", "text_following": "text following",
           "frame_quality": "frame quality"}
_COLOUR_LEVELS = 4  # per channel: coarse enough that an H.264 round trip keeps a flat colour's bin
# The toy_toons dataset folder name of builders/toy_toons.make_config.
_DATASET = re.compile(r"^(\d+)s_(\d+)x(\d+)_(\d+)fps_train(\d+)_test(\d+)_seed(\d+)$")


# ---------------------------------------------------------------------------- what is evaluated

def last_stage(workdir: str, stage: str | None = None) -> str:
  """The stage folder of `workdir` trained on the most segments that has its model/, or the
  finished stage named `stage` (e.g. toy_9s)."""
  stages = os.path.join(workdir, "stages")
  found = {}
  for name in sorted(os.listdir(stages)) if os.path.isdir(stages) else []:
    config = os.path.join(stages, name, "config.json")
    if os.path.isfile(config) and os.path.isdir(os.path.join(stages, name, "model")):
      with open(config, encoding="utf-8") as f:
        found[name] = (json.load(f)["segments"], os.path.join(stages, name))
  if not found:
    raise ValueError(f"--workdir {workdir}: no finished stage (stages/*/model and config.json); "
                     "expected the workdir of a finished toy job (python -m ttt_jax.train "
                     "--config=configs/toy.py)")
  if stage is None:
    return max(found.values())[1]
  if stage not in found:
    raise ValueError(f"--stage {stage}: not a finished stage of {workdir}; finished: "
                     f"{', '.join(found)}")
  return found[stage][1]


def held_out_stories(workdir: str, config: Any, count: int = 0) -> list[tuple[str, Any]]:
  """[(name, Story)]: the first `count` (0: the split's size) stories of the test split of the
  toy_toons dataset in `workdir`/data with the stage's segments, frame size and rate."""
  from ttt_jax.data.builders import toy_toons as builder  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "data", "toy_toons")
  want = (3 * config.segments, config.height, config.width, config.fps)
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    match = _DATASET.match(name)
    if match and tuple(map(int, match.groups()[:4])) == want:
      num_test, seed = int(match.group(6)), int(match.group(7))
      return [(f"test_{i}", toy_toons.generate_story(
          builder.story_seed(seed, "test", i), config.segments, config.fps, config.height,
          config.width)) for i in range(count or num_test)]
  raise ValueError(f"--workdir {workdir}: no toy_toons dataset of {want[0]} s at "
                   f"{config.height}x{config.width}, {config.fps} fps under {root}")


def load_stories(paths: list[str], config: Any) -> list[tuple[str, Any]]:
  """[(file stem, Story)] of toy_toons story files; errors name the file."""
  stories = []
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"--storyboards {path}: not valid JSON: {e}") from e
    if isinstance(data, list):
      raise ValueError(f"--storyboards {path} is a sampling storyboard (a list of segments); "
                       "scoring needs the toy_toons story behind it (its facts, actions and "
                       "rendering): pass toy_toons.Story.to_json(), as evaluate writes to "
                       "OUT/stories/")
    try:
      story = toy_toons.Story.from_json(json.dumps(data))
    except (KeyError, TypeError) as e:
      raise ValueError(f"--storyboards {path}: not a toy_toons story (missing or bad field "
                       f"{e})") from e
    if (story.height, story.width, story.fps) != (config.height, config.width, config.fps):
      raise ValueError(f"--storyboards {path}: a {story.height}x{story.width} story at "
                       f"{story.fps} fps; the run draws {config.height}x{config.width} at "
                       f"{config.fps} fps")
    stories.append((os.path.splitext(os.path.basename(path))[0], story))
  if len({name for name, _ in stories}) < len(stories):
    raise ValueError(f"--storyboards: two files share a name ({paths}); names label the "
                     "results")
  return stories


# ---------------------------------------------------------------------------- metrics

def _segment_frames(video: np.ndarray, fps: int) -> list[np.ndarray]:
  per = frames_per_segment(fps)
  return [video[1 + i * per:1 + (i + 1) * per] for i in range((len(video) - 1) // per)]


def colour_histogram(frames: np.ndarray) -> np.ndarray:
  """[64] shares of pixels in each colour bin (4 levels per channel) of uint8 frames [..., 3]."""
  q = np.asarray(frames, np.int64).reshape(-1, 3) * _COLOUR_LEVELS // 256
  bins = (q[:, 0] * _COLOUR_LEVELS + q[:, 1]) * _COLOUR_LEVELS + q[:, 2]
  return np.bincount(bins, minlength=_COLOUR_LEVELS ** 3) / len(bins)


def frame_quality(video: np.ndarray, reference: np.ndarray, fps: int) -> dict[str, Any]:
  """Per segment: 1 - (colour distance + edge distance) / 2 of `video` against `reference`
  (module docstring), with both distances; "mean" over segments."""
  colour, edge = [], []
  for v, r in zip(_segment_frames(video, fps), _segment_frames(reference, fps)):
    colour.append(0.5 * float(np.abs(colour_histogram(v) - colour_histogram(r)).sum()))
    edge.append(abs(toy_metrics.frame_statistics(v)["flatness"]
                    - toy_metrics.frame_statistics(r)["flatness"]))
  quality = [1 - (c + e) / 2 for c, e in zip(colour, edge)]
  return {"mean": float(np.mean(quality)), "per_segment": quality,
          "colour_distance": colour, "edge_distance": edge}


def score(video: np.ndarray, story: Any) -> dict[str, Any]:
  """The three metrics of one generated video uint8 [frames, H, W, 3] of `story`."""
  persistence = toy_metrics.persistence_score(video, story)
  per_segment = np.mean([persistence[k] for k in ("room", "color", "shape")], axis=0)
  text = toy_metrics.text_following_score(video, story)
  return {
      "persistence": {"mean": persistence["overall"], "per_segment": per_segment.tolist(),
                      **{k: persistence[k] for k in ("room", "color", "shape")}},
      "text_following": {"mean": text["mean"], "per_segment": text["per_segment"]},
      "frame_quality": frame_quality(video, toy_toons.render(story), story.fps),
      "colour_at_place": place_shares(toy_metrics.colour_at_place(video, story)),
  }


def place_shares(place: dict[str, Any]) -> dict[str, float | None]:
  """toy_metrics.colour_at_place's result -> {"stated_segment_1", each class's later share, and
  "stated" and "swapped" in segment 1's scene and after a cut (None: the story has none)}."""
  return {"stated_segment_1": place["stated"][0],
          **{k: place[f"{k}_later"] for k in toy_metrics.PLACE_CLASSES},
          **{f"{k}_{scene}": place[f"{k}_{scene}"] for scene in ("first_scene", "after_cut")
             for k in ("stated", "swapped")}}


def mean_place_shares(per_storyboard: list[dict[str, Any]]) -> dict[str, float | None]:
  """place_shares averaged over storyboards, each key over those that have it (not None)."""
  out = {}
  for k in per_storyboard[0]:
    values = [s[k] for s in per_storyboard if s[k] is not None]
    out[k] = float(np.mean(values)) if values else None
  return out


def summarise(per_storyboard: list[dict[str, Any]], *, resamples: int = bootstrap.RESAMPLES,
              confidence: float = bootstrap.CONFIDENCE, seed: int = 0) -> dict[str, Any]:
  """{metric: {"mean", "lo", "hi", "per_segment": {"mean": [..], "lo": [..], "hi": [..]}}}: means
  over storyboards, bootstrap intervals; a segment's mean is over the storyboards that have it."""
  out = {}
  for metric in METRICS:
    longest = max(len(s[metric]["per_segment"]) for s in per_storyboard)
    table = np.full((len(per_storyboard), 1 + longest), np.nan)  # column 0: the overall mean
    for row, s in zip(table, per_storyboard):
      row[0] = s[metric]["mean"]
      row[1:1 + len(s[metric]["per_segment"])] = s[metric]["per_segment"]
    m = bootstrap.mean_interval(table, resamples=resamples, confidence=confidence, seed=seed)
    out[metric] = {k: float(v[0]) for k, v in m.items()}
    out[metric]["per_segment"] = {k: v[1:].tolist() for k, v in m.items()}
  return out


def plot_per_segment(lines: dict[str, dict[str, list[float]]], path: str, title: str = "",
                     ylabel: str = "score") -> str:
  """Writes a PNG of score against segment index: one line per entry of `lines` ({label:
  {"mean", "lo", "hi"}} lists over segments), its interval shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
  longest = 1
  for label, line in lines.items():
    x = np.arange(1, len(line["mean"]) + 1)
    longest = max(longest, len(x))
    ax.plot(x, line["mean"], marker="o", markersize=3, label=label)
    ax.fill_between(x, line["lo"], line["hi"], alpha=0.15)
  # Segment 1's text states the facts; every later segment must remember them.
  ax.axvspan(0.5, 1.5, color="0.9", zorder=0)
  ticks = np.arange(1, longest + 1)
  ax.set_xticks(ticks[::max(1, longest // 11)])
  ax.set(xlabel="segment (3 s each; only segment 1's text states the facts)", ylabel=ylabel,
         ylim=(-0.05, 1.25), xlim=(0.5, longest + 0.5), title=title)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.legend(loc="upper right", ncol=4, fontsize=8)  # above 1, clear of the lines
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------- the command

def sampling_overrides(guidance_scale: float | None = None, num_steps: int | None = None,
                       sampler: str | None = None) -> dict[str, Any]:
  """The sampling fields to replace in the run's config (None: keep), checked; errors name the
  flag."""
  from ttt_jax.diffusion.samplers import SAMPLERS  # pylint: disable=g-import-not-at-top
  if guidance_scale is not None and not guidance_scale >= 1.0:
    # diffusion.sample guides iff the scale is above 1: below, it would silently not guide.
    raise ValueError(f"--guidance_scale {guidance_scale}: expected a number >= 1 (1: no "
                     "classifier-free guidance)")
  if num_steps is not None and num_steps < 1:
    raise ValueError(f"--num_steps {num_steps}: expected a positive number of denoising steps")
  if sampler is not None and sampler not in SAMPLERS:
    raise ValueError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
  given = dict(guidance_scale=guidance_scale, num_steps=num_steps, sampler=sampler)
  return {k: v for k, v in given.items() if v is not None}


def run(workdir: str, storyboards: list[str] | None = None, out: str | None = None, *,
        num_storyboards: int = 0, seed: int | None = None, stage: str | None = None,
        sampling: dict[str, Any] | None = None,
        resamples: int = bootstrap.RESAMPLES) -> dict[str, Any]:
  """Samples and scores; writes OUT/{eval.json, eval.png, videos/, stories/} and returns
  eval.json's contents (module docstring). `sampling`: fields of the run's config.sampling to
  replace (`sampling_overrides`). The libraries' logs go to WORKDIR/log.txt."""
  from ttt_jax import toy_job  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir}: no such folder")
  # Orbax's and tfds' INFO lines go to the run's log.txt, as its toy job's did.
  with toy_job.logs_to_file(os.path.join(workdir, "log.txt")):
    return _run(workdir, storyboards, out, num_storyboards, seed, stage, sampling or {},
                resamples)


def _run(workdir: str, storyboards: list[str] | None, out: str | None, num_storyboards: int,
         seed: int | None, stage: str | None, sampling: dict[str, Any],
         resamples: int) -> dict[str, Any]:
  """`run`'s body, its logs already going to the run's log.txt."""
  from ttt_jax import checkpoint, sample  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.storyboard import parse_storyboard  # pylint: disable=g-import-not-at-top
  from ttt_jax.data.video_io import to_uint8, write_mp4  # pylint: disable=g-import-not-at-top

  out = cli.check_output_dir(out or os.path.join(workdir, "eval"), "--out", overwrite=True)
  stage_dir = last_stage(workdir, stage)
  config = checkpoint.load_run_config(stage_dir)
  config.sampling.update(sampling)
  stories = (load_stories(storyboards, config) if storyboards
             else held_out_stories(workdir, config, num_storyboards))
  seed = config.seed if seed is None else seed
  sampler = sample.Sampler(config, os.path.join(stage_dir, "model"))
  results = []
  with cli.atomic_output_dir(out, overwrite=True) as tmp:
    os.makedirs(os.path.join(tmp, "videos"))
    os.makedirs(os.path.join(tmp, "stories"))
    for name, story in stories:
      segments = parse_storyboard(toy_toons.story_to_storyboard(story), name)
      video = to_uint8(sampler.decode(sampler.generate(segments, seed, progress=False)))
      write_mp4(os.path.join(tmp, "videos", f"{name}.mp4"), video, fps=config.fps)
      with open(os.path.join(tmp, "stories", f"{name}.json"), "w", encoding="utf-8") as f:
        f.write(story.to_json())
      results.append({"name": name, "segments": story.segments,
                      "video": f"videos/{name}.mp4", **score(video, story)})
    result = {"workdir": workdir, "stage": config.stage, "mixer": config.model.mixer,
              "seed": seed, "sampling": config.sampling.to_dict(),
              "confidence": bootstrap.CONFIDENCE, "resamples": resamples,
              "metrics": summarise(results, resamples=resamples),
              "colour_at_place": mean_place_shares([r["colour_at_place"] for r in results]),
              "storyboards": results}
    with open(os.path.join(tmp, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    plot_per_segment({_LABELS[m]: result["metrics"][m]["per_segment"] for m in METRICS},
                     os.path.join(tmp, "eval.png"),
                     title=f"{config.model.mixer}, {len(results)} held-out storyboards, "
                           f"{round(100 * bootstrap.CONFIDENCE)}% intervals")
  return result


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sampling = sampling_overrides(f.guidance_scale, f.num_steps, f.sampler)
  result = run(f.workdir, f.storyboards, f.out, num_storyboards=f.num_storyboards, seed=f.seed,
               stage=f.stage, sampling=sampling)
  print(json.dumps({**{m: {k: round(v, 4) for k, v in result["metrics"][m].items()
                          if k != "per_segment"} for m in METRICS},
                    "colour_at_place": {k: v if v is None else round(v, 4)
                                        for k, v in result["colour_at_place"].items()}}))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "a finished toy job's workdir")
  flags.DEFINE_list("storyboards", [], "toy_toons story JSON files (default: the test split)")
  flags.DEFINE_integer("num_storyboards", 0, "held-out stories to sample (0: the test split)")
  flags.DEFINE_string("out", None, "output folder (default WORKDIR/eval; replaced)")
  flags.DEFINE_integer("seed", None, "sampling seed (default: the stage config's)")
  flags.DEFINE_string("stage", None, "the stage to score, e.g. toy_9s (default: the longest)")
  flags.DEFINE_float("guidance_scale", None, "classifier-free guidance (default: the config's)")
  flags.DEFINE_integer("num_steps", None, "denoising steps (default: the config's)")
  flags.DEFINE_string("sampler", None, "ddim or dpmpp_2m (default: the config's)")
  flags.mark_flags_as_required(["workdir"])
  cli.run_absl(main)
