"""A long run's own record: RUN/train.log with times (appended by each resume, also when a
terminal shows the bar), the speed of the recent steps rather than an average since the start,
elapsed and remaining time on the plain step lines. QA: none of these existed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from scrollsam.cli import main
from scrollsam.train import progress
from scrollsam.train.progress import Speed, duration

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) "


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", f"out={run}", f"data.root={data}", "data.train=[train/1]",
            "data.valid=[train/2]", "model.type=tiny", "model.image_size=64",
            "train.batch_size=3", "train.steps=2", "train.warmup=1", "train.eval_every=1",
            "train.device=cpu", "log.images=false", "prompts.corrective_rounds=1", *extra]


@pytest.mark.parametrize("terminal", [False, True, None])  # None: --no-progress
def test_the_run_keeps_a_timed_log_that_each_resume_appends_to(data, tmp_path, monkeypatch,
                                                               caplog, terminal):
    caplog.set_level(logging.INFO)  # as the CLI's own logging configuration
    monkeypatch.setattr(progress, "_is_terminal", lambda: bool(terminal))
    run = tmp_path / "run"
    quiet = ["--no-progress"] if terminal is None else []  # the SLURM script's, sweep trials'
    assert main([*_args(data, run), *quiet]) == 0
    assert main([*_args(data, run, "--resume", "train.steps=3"), *quiet]) == 0
    text = (run / "train.log").read_text()
    records = [line for line in text.splitlines() if re.search("step|F0.5|finished", line)]
    assert len(records) >= 8 and all(re.match(STAMP, line) for line in records)
    steps = re.findall(r"step (\d)/(\d): loss [\d.]+, [\d.]+ tiles/s, data wait \d+%; \S+ "
                       r"elapsed(?:, \S+ left)?\n", text)  # left: from a call's second line
    assert re.search(r"step 2/2: .*elapsed, 0s left", text)
    assert steps == [("1", "2"), ("2", "2"), ("3", "3")]  # the bar's steps too, on a terminal
    assert len(re.findall(r"step \d: valid F0.5", text)) == 3 and text.count("run finished") == 2
    # the resume's report comes before the run dir is open: kept and written first (reviewer)
    assert re.search(STAMP + r"--resume: train.steps 2 -> 3: the learning-rate schedule", text)
    assert not logging.getLogger("scrollsam").handlers  # nothing left attached


def test_a_log_file_that_cannot_be_written_warns_once_and_training_goes_on(data, tmp_path,
                                                                           capsys, caplog):
    caplog.set_level(logging.INFO)
    run2 = tmp_path / "run2"
    assert main(_args(data, run2)) == 0
    (run2 / "train.log").unlink()
    (run2 / "train.log").mkdir()
    assert main(_args(data, run2, "--resume", "train.steps=3")) == 0
    err = capsys.readouterr().err
    assert err.count("warning: could not write the run's log") == 1
    assert "Traceback" not in err and "Logging error" not in err


def test_speed_counts_the_steps_since_the_last_reading_and_restart(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    speed = Speed()
    speed.add(20)
    now[0] += 2.0
    assert speed.rate() == 10.0
    speed.add(10)
    now[0] += 60.0  # a long validation...
    speed.restart()  # ...left out
    speed.add(30)
    now[0] += 1.0
    assert speed.rate() == 30.0


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0s"), (42, "42s"), (845, "14m05s"), (11220, "3h07m"), (187200, "2d04h")])
def test_durations_read_at_a_glance(seconds, text):
    assert duration(seconds) == text


def test_how_a_run_ended_is_the_last_line_of_its_log(data, tmp_path, monkeypatch, caplog):
    # Reviewer: the error or stop that ended a run (what a batch job's log needs most) was
    # printed by the CLI after the log file had closed.
    from scrollsam.train import loop

    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    assert main(_args(data, run)) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "prompted_forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main([*_args(data, run, "train.steps=3"), "--resume", "--debug"])
    last = (run / "train.log").read_text().splitlines()[-1]
    assert re.fullmatch(STAMP.replace("(INFO|WARNING)", "ERROR") + "failed: RuntimeError: boom",
                        last), last
