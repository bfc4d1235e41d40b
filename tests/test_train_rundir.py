"""The run dir in one process: resume writes only into the folder named on the command line,
overrides anywhere on the line, train.steps extended (and a smaller value reported), stale temp
files removed on resume, a run killed before its first checkpoint resumed, the lock, progress
output that a log file can hold."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.errors import ConfigError, RunDirError
from scrollsam.train import loop
from scrollsam.train.progress import Progress
from scrollsam.train.resume import check_global_batch
from scrollsam.train.rundir import RunLock, remove_stale_temps
from scrollsam.train.stop import TrainingStopped


def _args(data: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", f"data.root={data}", "data.train=[train/1]",
            "data.valid=[train/2]", "model.type=tiny", "model.image_size=64",
            "train.batch_size=3", "train.steps=2", "train.warmup=1", "train.eval_every=1",
            "train.device=cpu", "log.images=false", "prompts.corrective_rounds=1", *extra]


def _step(run: Path, name: str = "last.pt") -> int:
    return int(torch.load(run / name, weights_only=True)["step"])


def test_resume_of_a_moved_run_writes_only_into_the_folder_named(data, tmp_path, monkeypatch):
    # Before: --resume took the run folder from the config stored in the checkpoint (relative
    # to the current directory) and wrote there, leaving the named folder untouched.
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    assert main(_args(data, "out=runs/rel")) == 0
    moved = tmp_path / "moved"
    shutil.move(start / "runs" / "rel", moved)
    monkeypatch.chdir(elsewhere)
    assert main(["train", f"out={moved}", "--resume", "train.steps=3", "--no-progress"]) == 0
    assert _step(moved) == 3
    assert list(elsewhere.iterdir()) == [] and list((start / "runs").iterdir()) == []
    saved = yaml.safe_load((moved / "config.yaml").read_text())
    assert saved["out"] == "."  # the folder holding the file: no other place to write
    assert saved["data"]["root"] == str(data)  # absolute: resumable from anywhere
    assert torch.load(moved / "last.pt", weights_only=True)["config"]["out"] == "."


def test_a_run_dir_inside_a_fragment_folder_is_refused_naming_out(data, tmp_path, capsys):
    # Before: "cache_dir: must not be inside the fragment folder", after the run dir was made.
    for out in (data / "train" / "1" / "run", data / "train" / "2"):
        before = sorted(p.name for p in out.parent.iterdir())
        assert main(_args(data, f"out={out}")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: out: the run dir must not be inside fragment folder")
        assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing made


def test_training_refuses_validation_without_labelled_ink(data, tmp_path, capsys):
    import cv2
    import numpy as np

    inkless = tmp_path / "inkless"
    shutil.copytree(data / "train" / "2", inkless)
    labels = cv2.imread(str(inkless / "inklabels.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(inkless / "inklabels.png"), np.zeros_like(labels))
    assert main(_args(data, f"data.valid=[{inkless}]", f"out={tmp_path / 'run'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the validation fragments inkless hold no labelled ink")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_overrides_anywhere_and_resume_extends_train_steps(data, tmp_path, caplog):
    run = tmp_path / "run"
    # Before: "unrecognized arguments" for key=value after a flag.
    assert main(["train", f"out={run}", "--no-progress", *_args(data)[2:], "train.steps=1"]) == 0
    assert _step(run) == 1
    assert main(["train", f"out={run}", "--resume", "--no-progress", "train.steps=2"]) == 0
    assert _step(run) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", f"out={run}", "train.steps=1", "train.lr=0.5"]) == 0
    text = caplog.text
    assert "train.steps=1 does nothing: --resume can only extend a run" in text
    assert "ignored: train.lr=0.5" in text
    assert _step(run) == 2
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-4)


def test_unknown_flag_after_overrides_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "out=x", "--bogus", "train.steps=2"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_stale_temp_files_of_the_run_are_removed_on_resume(data, tmp_path):
    run = tmp_path / "run"
    assert main(_args(data, f"out={run}", "train.steps=1")) == 0
    ours = [run / ".last.tmp-0123abcd.pt", run / ".best.tmp-89abcdef.pt",
            run / ".config.tmp-00ff00ff.yaml"]
    (run / "stats").mkdir(exist_ok=True)
    ours.append(run / "stats" / ".1-0123456789abcdef.json.tmp-4242")
    theirs = [run / "notes.tmp-0123abcd.pt", run / ".last.tmp-keep.txt", run / "last.tmp.pt"]
    for p in ours + theirs:
        p.write_bytes(b"x" * 10)
    assert main(["train", f"out={run}", "--resume", "train.steps=2", "--no-progress"]) == 0
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in theirs)  # only scrollsam's own temp names go
    assert remove_stale_temps(run) == []


def test_resume_takes_the_checkpoint_with_the_latest_step(data, tmp_path, caplog):
    # kill -9 after a validation wrote best.pt and before the next last.pt: best.pt is newer
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(data, f"out={one}", "train.steps=1")) == 0
    assert main(_args(data, f"out={two}", "train.steps=2")) == 0
    shutil.copy(two / "last.pt", two / "best.pt")  # step 2, written last
    shutil.copy(one / "last.pt", two / "last.pt")  # step 1
    os.utime(two / "best.pt", ns=(2 * 10**18, 2 * 10**18))
    with caplog.at_level(logging.WARNING):
        assert main(["train", f"out={two}", "--resume", "train.steps=3", "--no-progress"]) == 0
    assert f"resuming from {two / 'best.pt'} (step 2), the newest checkpoint" in caplog.messages
    assert _step(two) == 3


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(data, tmp_path,
                                                                      monkeypatch):
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl-C during the first save

    monkeypatch.setattr(loop, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(None, _args(data, f"out={run}")[2:]), progress=False)
    monkeypatch.undo()
    assert (run / "config.yaml").is_file() and not (run / "last.pt").exists()
    # a fresh start is refused (the folder holds a run); --resume starts it from step 0
    assert main(_args(data, f"out={run}")) == 2
    assert main(["train", f"out={run}", "--resume", "--no-progress"]) == 0
    fresh = tmp_path / "fresh"
    assert main(_args(data, f"out={fresh}")) == 0
    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(fresh / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)


def test_config_yaml_is_written_before_setup_fills_the_run_dir(data, tmp_path, monkeypatch):
    # Before: setup cached statistics in the run dir (seconds to minutes on large fragments)
    # before config.yaml was written; a run killed then (SIGKILL) held only stats/, and both
    # --resume ("no last.pt") and a fresh start ("not empty") were refused.
    run, seen = tmp_path / "run", []
    real = loop.setup

    def spy(cfg, where, **kwargs):
        seen.append(sorted(p.name for p in where.iterdir()))
        return real(cfg, where, **kwargs)

    monkeypatch.setattr(loop, "setup", spy)
    assert main(_args(data, f"out={run}")) == 0
    assert seen == [[".lock", "config.yaml"]]


def test_a_resume_that_fails_in_setup_leaves_config_yaml_as_it_was(data, tmp_path):
    # Review: config.yaml was rewritten before setup on resume too, so a resume that failed
    # (a wrong data.root) left its override in the file the next --resume reads.
    run = tmp_path / "run"
    assert main(_args(data, f"out={run}")) == 0
    for name in ("last.pt", "best.pt"):  # as if stopped before its first save
        (run / name).unlink()
    before = (run / "config.yaml").read_text()
    assert main(["train", f"out={run}", "--resume", f"data.root={tmp_path / 'nope'}",
                 "--no-progress"]) == 2
    assert (run / "config.yaml").read_text() == before


def test_steps_trained_again_after_a_kill_appear_once_in_tensorboard(data, tmp_path):
    # Before: a run killed after logging steps past its last checkpoint logged them again on
    # resume, so each of those steps had two points and the curves doubled back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(_args(data, f"out={run}", "train.eval_every=100", "log.every=1")) == 0  # 1, 2
    at_2 = (run / "last.pt").read_bytes()
    assert main(["train", f"out={run}", "--resume", "train.steps=4", "--no-progress"]) == 0
    (run / "last.pt").write_bytes(at_2)  # as if killed after logging 3, 4, before saving them
    assert main(["train", f"out={run}", "--resume", "train.steps=4", "--no-progress"]) == 0
    assert _step(run) == 4
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_signal_before_the_first_step_saves_a_resumable_step_0(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = loop.setup

    def setup_then_sigterm(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: a flag, the loop saves and stops
        return out

    monkeypatch.setattr(loop, "setup", setup_then_sigterm)
    with pytest.raises(TrainingStopped) as stop:
        loop.train(load_config(None, _args(data, f"out={run}")[2:]), progress=False)
    assert stop.value.exit_code == 143 and stop.value.step == 0
    assert _step(run) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.parametrize("main_process", [True, False])
def test_the_stop_line_is_printed_by_the_main_process_only(monkeypatch, capsys, main_process):
    # Before: under torchrun every process printed "stopped by SIGINT ...".
    from scrollsam import cli

    def stopped(args):
        raise TrainingStopped(signal.SIGINT, step=3, run=Path("runs/x"), main=main_process)

    help_, example, add, _ = cli.COMMANDS["train"]
    monkeypatch.setitem(cli.COMMANDS, "train", (help_, example, add, stopped))
    assert main(["train", "out=runs/x"]) == 130
    err = capsys.readouterr().err
    assert (err == "stopped by SIGINT after step 3; last.pt saved; continue with: scrollsam "
                   "train out=runs/x --resume\n") if main_process else err == ""


@pytest.mark.parametrize("saved_world, world, says", [
    (2, 1, ["(2 processes x train.batch_size 4", "to keep it on 1 process,"]),
    (1, 2, ["(1 process x train.batch_size 4", "to keep it on 2 processes,"]),
])
def test_the_global_batch_error_counts_processes_in_words(saved_world, world, says):
    # Before: "... to keep it on 1 processes" (and "(1 processes x ...").
    saved = load_config(None, ["train.batch_size=4"])
    asked = load_config(None, ["train.batch_size=1"])
    with pytest.raises(ConfigError) as err:
        check_global_batch(asked, world_size=world, saved=saved, saved_world_size=saved_world,
                           run=Path("runs/x"))
    assert all(part in str(err.value) for part in says), str(err.value)
    assert "1 processes" not in str(err.value)


def test_run_lock_names_the_holder_and_is_dropped_on_release(tmp_path):
    first = RunLock.acquire(tmp_path)
    with pytest.raises(RunDirError, match=re.escape(f"in use by pid {os.getpid()} ({tmp_path})")):
        RunLock.acquire(tmp_path)
    first.release()
    RunLock.acquire(tmp_path).release()


def test_progress_in_a_log_file_has_no_carriage_returns(data, tmp_path, capfd, caplog):
    # Before: tqdm drew its bar with "\r" into redirected logs.
    with_progress = [a for a in _args(data, f"out={tmp_path / 'run'}") if a != "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(with_progress) == 0
    assert "\r" not in capfd.readouterr().err
    assert any(re.fullmatch(r"step 2/2: loss \d+\.\d+, [\d.]+ tiles/s, data wait \d+%; "
                            r"\d+s elapsed, 0s left", m) for m in caplog.messages)


def test_log_lines_are_not_glued_to_the_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("scrollsam.train.progress._is_terminal", lambda: True)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        bar = Progress(total=3, initial=0, enabled=True).start()
        bar.step(1, loss=0.5, tiles_per_s=1.0)
        logging.getLogger("scrollsam.train.loop").warning("step 1: valid F0.5 0.5000")
        bar.step(2, loss=0.5, tiles_per_s=1.0)
        bar.close()
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])step 1: valid F0.5 0.5000\n", err), repr(err)


def test_a_run_dir_inside_any_fragment_folder_is_refused(data, tmp_path, capsys):
    # Before: only the run's own fragments were checked; out= inside another fragment (a test
    # fragment, a copy) trained and wrote its run there.
    other = tmp_path / "other"
    shutil.copytree(data / "train" / "2", other)
    for out in (other / "run", other / "surface_volume" / "run"):
        assert main(_args(data, f"out={out}")) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"error: out: the run dir must not be inside a fragment folder: {other} "
                       f"holds surface_volume/ ({out})")
        assert not out.exists()


def test_resume_reports_a_changed_dict_value_as_ignored(caplog):
    """Review: `--resume data.view={depth_shift: 5}` on a run of depth_shift 2 was ignored
    without a word (a dict value has no key of its own among the flat keys compared)."""
    from scrollsam.train.resume import resume_config

    band = ["data.input=slices", "data.strategy=range"]
    saved = load_config(None, [*band, "data.view={depth_shift: 2}"])
    asked = load_config(None, [*band, "data.view={depth_shift: 5}"])
    with caplog.at_level(logging.WARNING):
        cfg = resume_config(saved, asked, given={"data.view"}, step=5)
    assert cfg.data.view == {"depth_shift": 2}  # kept: a view change is another experiment
    assert "ignored: data.view={'depth_shift': 5} (the run has {'depth_shift': 2})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resume_config(saved, saved, given={"data.view"}, step=5)
    assert "ignored" not in caplog.text  # the same value: nothing to say


def test_extending_train_steps_on_resume_warns_of_the_learning_rate_jump(caplog):
    """QA: `--resume train.steps=40` on a 20-step run raised the lr at step 20 from 6.0e-5 to
    6.3e-4 (the cosine stretched over the new total), logged only as `train.steps 20 -> 40`."""
    from scrollsam.train.optim import lr_at
    from scrollsam.train.resume import resume_config

    saved = load_config(None, ["train.steps=20", "train.warmup=5", "train.lr=1e-3"])
    asked = load_config(None, ["train.steps=40", "train.warmup=5", "train.lr=1e-3"])
    with caplog.at_level(logging.WARNING):
        cfg = resume_config(saved, asked, given={"train.steps"}, step=20)
    assert cfg.train.steps == 40
    before, after = lr_at(20, saved), lr_at(20, cfg)
    assert after > 5 * before
    assert (f"--resume: train.steps 20 -> 40: the learning-rate schedule (warm-up, cosine "
            f"decay) now spans 40 steps, so at step 20 the lr goes from {before:.3g} to "
            f"{after:.3g}") in caplog.text


def test_the_resume_report_comes_from_rank_0_alone_and_only_for_a_real_lr_jump(caplog):
    """Reviewer: every torchrun process printed the lr-jump warning (once per process), and it
    warned "from X to X" when the resume step was in the warm-up or at step 0."""
    from scrollsam.train.resume import resume_config

    saved = load_config(None, ["train.steps=20", "train.warmup=5", "train.lr=1e-3"])
    asked = load_config(None, ["train.steps=40", "train.warmup=5", "train.lr=1e-3",
                               "train.clip=3"])
    with caplog.at_level(logging.DEBUG, logger="scrollsam"):
        resume_config(saved, asked, given={"train.steps", "train.clip"}, step=20, say=False)
    assert caplog.records and {r.levelno for r in caplog.records} == {logging.DEBUG}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resume_config(saved, asked, given={"train.steps"}, step=3)  # in the warm-up
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert caplog.messages == ["--resume: train.steps 20 -> 40"]
