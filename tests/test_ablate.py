"""The ablation at its smallest setting, as notebooks/ablations.ipynb runs it (executed by
nbclient: two mixers through the runlocal toy job, evaluated, timed, tabled, the videos shown),
then the commands on its runs: `python -m ttt_jax.ablate` resumes an interrupted ablation
without retraining what finished, `python -m ttt_jax.evaluate` scores story files as it scored the
held-out split, and their errors are one line."""
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXERS = ("none", "swa")  # the two cheapest to compile: the test is about the machinery
# The subprocesses get one CPU device (the toy job's batches are 1), as a user's would.
ENV = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
ABLATE = ["--config=configs/toy.py:runlocal", f"--mixers={','.join(MIXERS)}",
          "--num_storyboards=2", "--step_segments=1"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
  """(workdir, executed notebook)."""
  workdir = tmp_path_factory.mktemp("ablation")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "ablations.ipynb"), as_version=4)
  assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells
             if c.cell_type == "code"), "commit the notebook with its outputs stripped"
  parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  # The package is installed already (the test extra); the rest is the notebook's smallest
  # setting, which is its default.
  parameters.source += f"\nINSTALL = False\nWORKDIR = {str(workdir)!r}\n"
  with mock.patch.dict(os.environ, ENV):
    # A generous wall-clock limit: on a shared machine wall time measures the neighbours.
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  return workdir, nb


def test_notebook_runs_two_mixers_and_shows_the_table_plot_and_videos(ablation):
  workdir, nb = ablation
  # Its default is the smallest setting: every stage of every run at runlocal's 2 steps. (Its
  # time is the machine's, not a test's: it once asserted under 300 CPU seconds, and a Zen 3
  # beside two trainings took 362.)
  for mixer in MIXERS:
    summary = json.loads((workdir / "runs" / f"{mixer}_seed0" / "summary.json").read_text())
    assert summary["stages"] and all(s["steps"] == 2 for s in summary["stages"].values()), summary
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  data = [o.get("data", {}) for o in outputs]
  table = next(d["text/markdown"] for d in data if "text/markdown" in d)
  assert all(f"| {m} |" in table for m in MIXERS)
  assert any("image/png" in d for d in data)
  assert sum("<video" in d.get("text/html", "") for d in data) == len(MIXERS) + 1


def test_ablation_outputs(ablation):
  workdir = ablation[0]
  result = json.loads((workdir / "ablation.json").read_text())
  assert [row["mixer"] for row in result["table"]] == list(MIXERS)
  assert result["storyboards"] == 2 and result["seeds"] == [0]
  for row in result["table"]:
    for metric in ("persistence", "text_following", "frame_quality"):
      assert 0 <= row[metric]["lo"] <= row[metric]["mean"] <= row[metric]["hi"] <= 1
    assert row["train_step_ms"] > 0 and row["params"] > 0
  assert result["table"][0]["vs_none"] == 1.0  # local attention is the reference
  assert result["step_times"]["segments"] == 1
  elo = json.loads((workdir / "elo.json").read_text())
  assert set(elo) == {"persistence", "text_following", "frame_quality", "average"}
  assert set(elo["average"]) == set(MIXERS)
  for name in ("ablation.md", "ablation.png", "prefs.jsonl"):
    assert (workdir / name).stat().st_size > 0
  for mixer in MIXERS:
    run = workdir / "runs" / f"{mixer}_seed0"
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert evaluation["mixer"] == mixer and len(evaluation["storyboards"]) == 2
    assert len(evaluation["metrics"]["persistence"]["per_segment"]["mean"]) == 21
    assert (run / "eval" / "eval.png").stat().st_size > 0
  # The second mixer's run reused the first one's data, text encoder, autoencoder and latents.
  assert os.path.islink(workdir / "runs" / "swa_seed0" / "latents")
  # ... and started from its first stage (configs/toy.py's 3 s stage has no mixer): not retrained.
  # A fresh stage writes its config.json when it starts; the copy keeps the first run's.
  first = [(workdir / "runs" / f"{m}_seed0" / "stages" / "toy_3s" / "config.json").stat()
           for m in MIXERS]
  assert len({s.st_mtime_ns for s in first}) == 1


def command(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env={**os.environ, **ENV}, capture_output=True, text=True)


def test_resumes_an_interrupted_ablation(ablation):
  workdir = ablation[0]
  before = json.loads((workdir / "ablation.json").read_text())
  swa = workdir / "runs" / "swa_seed0"
  metrics = (swa / "stages" / "toy_63s" / "metrics.jsonl").read_text()
  # As if stopped after the last stage trained, before the job's sample and the evaluation.
  (swa / "summary.json").unlink()
  shutil.rmtree(swa / "eval")
  done = command("ttt_jax.ablate", f"--workdir={workdir}", *ABLATE)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "[ablate] none seed 0: finished, skipped" in done.stdout
  assert "[ablate] swa seed 0:" in done.stdout and "encoded" not in done.stdout
  # The evaluation it reran logged Orbax's chatter to the run's log.txt, not to the terminal.
  assert "_NonBlockingMetadataStore" not in done.stdout + done.stderr
  assert "_NonBlockingMetadataStore" in (swa / "log.txt").read_text()
  assert (swa / "stages" / "toy_63s" / "metrics.jsonl").read_text() == metrics  # not retrained
  after = json.loads((workdir / "ablation.json").read_text())
  assert after["table"] == before["table"]  # same seed, same samples, same scores


def test_evaluate_scores_story_files_as_the_held_out_split(ablation, tmp_path):
  run = ablation[0] / "runs" / "none_seed0"
  story = run / "eval" / "stories" / "test_1.json"
  done = command("ttt_jax.evaluate", f"--workdir={run}", f"--storyboards={story}",
                 f"--out={tmp_path / 'eval'}")
  assert done.returncode == 0, done.stderr[-3000:]
  ours = json.loads((tmp_path / "eval" / "eval.json").read_text())["storyboards"]
  held_out = json.loads((run / "eval" / "eval.json").read_text())["storyboards"][1]
  assert [s["name"] for s in ours] == ["test_1"]
  for metric in ("persistence", "text_following", "frame_quality"):
    assert ours[0][metric] == held_out[metric]
  assert (tmp_path / "eval" / "eval.png").stat().st_size > 0
  # The libraries' INFO lines went to the run's log.txt, not the terminal.
  assert "Closing" not in done.stdout + done.stderr
  assert "Closing" in (run / "log.txt").read_text()
  # The same story under other sampling settings: recorded, and a different video.
  done = command("ttt_jax.evaluate", f"--workdir={run}", f"--storyboards={story}",
                 f"--out={tmp_path / 'other'}", "--guidance_scale=1", "--num_steps=1",
                 "--sampler=dpmpp_2m")
  assert done.returncode == 0, done.stderr[-3000:]
  other = json.loads((tmp_path / "other" / "eval.json").read_text())
  assert {k: other["sampling"][k] for k in ("guidance_scale", "num_steps", "sampler")} == {
      "guidance_scale": 1.0, "num_steps": 1, "sampler": "dpmpp_2m"}
  assert ((tmp_path / "other" / "videos" / "test_1.mp4").read_bytes()
          != (tmp_path / "eval" / "videos" / "test_1.mp4").read_bytes())


def test_evaluate_scores_an_earlier_stage_on_stories_of_its_length(ablation, tmp_path):
  run = ablation[0] / "runs" / "none_seed0"
  done = command("ttt_jax.evaluate", f"--workdir={run}", "--stage=toy_9s", "--num_storyboards=1",
                 f"--out={tmp_path / 'eval'}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert result["stage"] == "toy_9s"
  assert [s["segments"] for s in result["storyboards"]] == [3]
  assert len(result["metrics"]["persistence"]["per_segment"]["mean"]) == 3


@pytest.mark.parametrize("module,args,expected", [
    ("ttt_jax.evaluate", ["--workdir={tmp}"],
     "--workdir {tmp}: no finished stage (stages/*/model and config.json); expected the workdir "
     "of a finished toy job (python -m ttt_jax.train --config=configs/toy.py)"),
    ("ttt_jax.evaluate", ["--workdir={run}", "--storyboards={run}/storyboard.json"],
     "--storyboards {run}/storyboard.json is a sampling storyboard (a list of segments); scoring "
     "needs the toy_toons story behind it (its facts, actions and rendering): pass "
     "toy_toons.Story.to_json(), as evaluate writes to OUT/stories/"),
    ("ttt_jax.evaluate", ["--workdir={run}", "--guidance_scale=0.5"],
     "--guidance_scale 0.5: expected a number >= 1 (1: no classifier-free guidance)"),
    ("ttt_jax.evaluate", ["--workdir={run}", "--stage=toy_99s"],
     "--stage toy_99s: not a finished stage of {run}; finished: toy_18s, toy_30s, toy_3s, "
     "toy_63s, toy_9s, toy_images"),
    ("ttt_jax.evaluate", ["--workdir={run}", "--sampler=euler"],
     "--sampler 'euler': expected one of ddim, dpmpp_2m"),
    ("ttt_jax.ablate", ["--config=configs/toy.py:runlocal", "--workdir={tmp}", "--mixers=lstm"],
     "unknown mixer 'lstm'; the config argument mixer= takes one of none, swa, mamba2, "
     "gated_deltanet, ttt_linear, ttt_mlp"),
    ("ttt_jax.ablate", ["--config=configs/toy.py:mixer=swa", "--workdir={tmp}"],
     "--config configs/toy.py:mixer=swa: leave mixer= out, --mixers chooses the mixers"),
])
def test_errors_are_one_line(ablation, tmp_path, module, args, expected):
  paths = {"tmp": str(tmp_path), "run": str(ablation[0] / "runs" / "none_seed0")}
  done = command(module, *(a.format(**paths) for a in args))
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f"python -m {module}: error: {expected.format(**paths)}")
