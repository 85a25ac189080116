"""Every command's errors: one line naming the flag, file, segment or field, exit status 1,
nothing on disk lost or half-made; --verbose keeps the traceback. Plus the shared helpers
(config-override neighbours, the atomic output folder)."""
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from ttt_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "--config=configs/tomjerry_3s.py:runlocal"
# Placeholders that get past sampling's "config.text.checkpoint is empty" check.
MODEL_PATHS = ["--config.text.checkpoint=x", "--config.text.tokenizer=x",
               "--config.vae.checkpoint=x"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A previous sample, a storyboard, a broken one, an unfinished training workdir, a model
  folder whose config.json is not JSON, garbage safetensors, a taken convert destination."""
  root = tmp_path_factory.mktemp("cli")
  (root / "previous").mkdir()
  (root / "previous" / "video.mp4").write_text("the first result")
  (root / "story.json").write_text(json.dumps([{"text": "Tom runs."}]))
  (root / "bad_story.json").write_text(json.dumps([{"text": "Tom runs."}, {"text": ""}]))
  (root / "unfinished" / "checkpoints").mkdir(parents=True)
  (root / "model" / "params").mkdir(parents=True)
  (root / "model" / "config.json").write_text("{'num_layers': 2,")
  (root / "diffusers").mkdir()
  (root / "diffusers" / "config.json").write_text("{}")
  (root / "diffusers" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(64))
  (root / "taken" / "params").mkdir(parents=True)
  return root


# (id, module, arguments ({r} is the fixture folder), expected last line of stderr (regex),
#  files that must be unchanged (path: content or None for "exists"), paths that must not exist).
CASES = [
    ("train unknown key", "ttt_jax.train",
     [RUNLOCAL, "--workdir={r}/wd", "--config.nope=1"],
     r"--config.nope: config has no field 'nope'; config has: data, diffusion, .*, width$",
     {}, ["wd"]),
    ("train misspelt key", "ttt_jax.train",
     [RUNLOCAL, "--workdir={r}/wd", "--config.train.stepz=1"],
     r"--config.train.stepz: config.train has no field 'stepz'; did you mean "
     r"config.train.steps\?$", {}, ["wd"]),
    ("train bad value", "ttt_jax.train",
     [RUNLOCAL, "--workdir={r}/wd", "--config.train.steps=ten"],
     r"flag --config.train.steps=ten: invalid literal for int\(\) .*'ten'$", {}, ["wd"]),
    ("train no dataset", "ttt_jax.train",
     [RUNLOCAL, "--workdir={r}/wd", "--config.data.latents={r}/nowhere"],
     r"no precomputed dataset at '.*/nowhere' \(no precompute.json; .*\)$", {}, ["wd"]),
    ("sample out not empty", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/model", "--storyboard={r}/story.json", "--out={r}/previous"],
     r"--out .*/previous exists and is not empty \(video.mp4\); pass --overwrite to replace "
     r"it, or choose another folder$", {"previous/video.mp4": "the first result"}, []),
    ("sample out is a file", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/model", "--storyboard={r}/story.json",
      "--out={r}/story.json"], r"--out .*/story.json is a file, expected a folder$",
     {"story.json": None}, []),
    ("sample bad storyboard", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/model", "--storyboard={r}/bad_story.json", "--out={r}/new"],
     r".*/bad_story.json: segment 1: field 'text' must be a non-empty string, got ''$", {},
     ["new"]),
    ("sample training workdir", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/unfinished", "--storyboard={r}/story.json", "--out={r}/new"],
     r"--checkpoint .*/unfinished is a training workdir without model/ \(the run has not "
     r"finished\); .*$", {}, ["new"]),
    ("sample config.json not JSON", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/model", "--storyboard={r}/story.json", "--out={r}/new",
      *MODEL_PATHS], r".*/model/config.json: not valid JSON \(Expecting property name .*\)$",
     {}, ["new"]),
    ("sample misspelt key", "ttt_jax.sample",
     [RUNLOCAL, "--checkpoint={r}/model", "--storyboard={r}/story.json", "--out={r}/new",
      "--config.sampling.num_stepz=2"],
     r"--config.sampling.num_stepz: config.sampling has no field 'num_stepz'; did you mean "
     r"config.sampling.num_steps\?$", {}, ["new"]),
    ("convert bad mixer_options", "ttt_jax.convert",
     ["cogvideox", "--src={r}/diffusers", "--dst={r}/dst", "--mixer_options={{bad"],
     r"--mixer_options '\{bad' is not valid JSON \(.*\); expected an object, .*$", {}, ["dst"]),
    ("convert unknown mixer", "ttt_jax.convert",
     ["cogvideox", "--src={r}/diffusers", "--dst={r}/dst", "--mixer=bogus"],
     r"--mixer 'bogus': expected one of \['none', 'swa', .*\]$", {}, ["dst"]),
    ("convert dst taken", "ttt_jax.convert",
     ["vae", "--src={r}/diffusers", "--dst={r}/taken"],
     r"--dst .*/taken already holds \['params'\]; choose another folder or remove them$",
     {"taken/params": None}, []),
    ("convert garbage safetensors", "ttt_jax.convert",
     ["cogvideox", "--src={r}/diffusers", "--dst={r}/dst"],
     r".*/diffusers/diffusion_pytorch_model.safetensors: not a valid safetensors file "
     r"\(Error while deserializing header: .*\)$", {}, ["dst"]),
    ("precompute out not empty", "ttt_jax.data.precompute",
     [RUNLOCAL, "--source={r}/nowhere", "--out={r}/previous"],
     r"--out .*/previous exists and is not empty \(video.mp4\); .*$",
     {"previous/video.mp4": "the first result"}, []),
    ("storyboard builder no source", "ttt_jax.data.builders.tomjerry_storyboard",
     [RUNLOCAL, "--source={r}/nowhere", "--data_dir={r}/tfds"],
     r".*/nowhere: source folder of videos and annotations not found$", {}, ["tfds"]),
]


def _run(module, args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("name,module,args,message,unchanged,absent", CASES,
                         ids=[c[0] for c in CASES])
def test_error_is_one_line_and_loses_nothing(files, name, module, args, message, unchanged,
                                             absent):
  del name
  result = _run(module, [a.format(r=files) for a in args])
  assert result.returncode == 1, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"python -m {module}: error: "), result.stderr
  assert re.fullmatch(message, last[len(f"python -m {module}: error: "):]), last
  assert "Traceback" not in result.stderr, result.stderr
  for path, content in unchanged.items():
    assert os.path.exists(files / path), path
    if content is not None:
      assert (files / path).read_text() == content
  for path in absent:
    assert not os.path.exists(files / path), path
  assert not [f for f in os.listdir(files) if ".incomplete-" in f]


def test_verbose_keeps_the_traceback(files):
  result = _run("ttt_jax.convert", ["cogvideox", f"--src={files}/diffusers", f"--dst={files}/d",
                                    "--mixer=bogus", "--verbose"])
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("ValueError: --mixer 'bogus'")


# ---------------------------------------------------------------------------- the helpers

def test_unknown_override_names_the_key_and_its_neighbours():
  config = ml_collections.ConfigDict({"train": {"steps": 1, "step_size": 2, "lr": 3},
                                      "seed": 0})
  assert cli.unknown_override(config, "train.steps") is None
  assert cli.unknown_override(config, "train.stepz") == (
      "--config.train.stepz: config.train has no field 'stepz'; did you mean "
      "config.train.steps or config.train.step_size?")
  assert cli.unknown_override(config, "optim.lr") == (
      "--config.optim.lr: config has no field 'optim'; config has: seed, train")
  assert cli.unknown_override(config, "seed.x") == (
      "--config.seed.x: config.seed has no field 'x'; config.seed has: no fields")


def test_atomic_output_dir_replaces_whole_or_not_at_all(tmp_path):
  out = tmp_path / "out"
  with cli.atomic_output_dir(str(out)) as tmp:
    (tmp_path / os.path.basename(tmp) / "a.txt").write_text("first")
    assert not out.exists()  # nothing under the final name until the end
  assert os.listdir(out) == ["a.txt"]
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    with cli.atomic_output_dir(str(out)):
      pass
  with pytest.raises(RuntimeError, match="crash"):
    with cli.atomic_output_dir(str(out), overwrite=True) as tmp:
      (tmp_path / os.path.basename(tmp) / "b.txt").write_text("second")
      raise RuntimeError("crash")
  assert os.listdir(out) == ["a.txt"] and (out / "a.txt").read_text() == "first"
  with cli.atomic_output_dir(str(out), overwrite=True) as tmp:
    (tmp_path / os.path.basename(tmp) / "b.txt").write_text("second")
  assert os.listdir(out) == ["b.txt"]
  assert os.listdir(tmp_path) == ["out"]  # no .incomplete-* or .old-* left


def test_one_line_joins_a_multi_line_message():
  error = ValueError("does not fit:\n  missing: ['a']\n  unexpected: []")
  assert cli.one_line(error) == "does not fit: missing: ['a'] unexpected: []"
  assert cli.one_line(RuntimeError()) == "RuntimeError"


def test_sample_takes_a_finished_training_workdir_for_its_model(tmp_path):
  from ttt_jax.sample import resolve_checkpoint  # pylint: disable=g-import-not-at-top
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "model" / "params").mkdir(parents=True)
  assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "model")
  assert resolve_checkpoint(str(tmp_path / "model")) == str(tmp_path / "model")
  with pytest.raises(ValueError, match="expected a model folder with params/ and config.json"):
    resolve_checkpoint(str(tmp_path / "checkpoints"))


def test_huge_pages_restarts_only_a_ttt_jax_command_once(tmp_path, monkeypatch):
  """`python -m ttt_jax.X` restarts with glibc's hugetlb tunable (others kept), once; never
  where the kernel's THP mode, the libc, an opt-out or another launcher says no."""
  calls = []
  monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(cli.platform, "libc_ver", lambda: ("glibc", "2.36"))
  mode = tmp_path / "enabled"
  monkeypatch.setattr(cli, "_THP_MODE", str(mode))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.delenv("TTT_JAX_HUGE_PAGES", raising=False)
  command = ["python3", "-m", "ttt_jax.train", "--config=configs/toy.py"]

  mode.write_text("always [madvise] never\n")
  cli.huge_pages(command)
  (exe, argv, env), = calls
  assert exe == sys.executable and argv == [sys.executable] + command[1:]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"

  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])  # the restarted process
  cli.huge_pages(command)
  monkeypatch.setenv("GLIBC_TUNABLES", "")
  cli.huge_pages(["pytest", "tests"])
  cli.huge_pages(["python3", "-m", "pytest"])
  monkeypatch.setenv("TTT_JAX_HUGE_PAGES", "0")
  cli.huge_pages(command)
  monkeypatch.delenv("TTT_JAX_HUGE_PAGES")
  mode.write_text("always madvise [never]\n")
  cli.huge_pages(command)
  mode.write_text("[always] madvise never\n")
  cli.huge_pages(command)
  mode.write_text("always [madvise] never\n")
  monkeypatch.setattr(cli.platform, "libc_ver", lambda: ("glibc", "2.31"))
  cli.huge_pages(command)
  monkeypatch.setattr(cli.platform, "libc_ver", lambda: ("", ""))
  cli.huge_pages(command)
  assert len(calls) == 1
