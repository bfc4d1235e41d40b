"""Stops and locks with real processes: SIGINT / SIGTERM sent to a training subprocess leave a
resumable last.pt whose resume equals the uninterrupted run; a second Ctrl-C stops at once and
the run still resumes; a second process on a locked run dir exits 2 and the first is unharmed.

The child is the real CLI (``scrollsam.cli.main``) with one test hook: at a chosen forward call
it touches ``ready`` and waits until the test touches ``go``, so a signal always lands in the
middle of a known step, however loaded the machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scrollsam.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = r"""
import sys, time, pathlib
import scrollsam.train.loop as loop

ready, go, pause_at = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
real, calls = loop.prompted_forward, [0]

def paused(*args, **kwargs):
    if calls[0] == pause_at:
        ready.touch()
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    calls[0] += 1
    return real(*args, **kwargs)

loop.prompted_forward = paused
from scrollsam.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", f"out={run}", f"data.root={data}", "data.train=[train/1]",
            "data.valid=[train/2]", "model.type=tiny", "model.image_size=64",
            "train.batch_size=3", "train.steps=4", "train.warmup=1", "train.eval_every=2",
            "train.save_every=100", "train.device=cpu", "log.every=1", "log.images=false",
            "prompts.corrective_rounds=1", *extra]


class Child:
    """A training subprocess that pauses in its forward call number ``pause_at``."""

    def __init__(self, tmp: Path, args: list[str], *, pause_at: int) -> None:
        self.ready, self.go = tmp / "ready", tmp / "go"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.ready), str(self.go), str(pause_at), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_paused(self) -> None:
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate()
                pytest.fail(f"child never reached the pause (rc {self.proc.returncode}):\n{err}")
            time.sleep(0.05)

    def finish(self) -> tuple[int, str]:
        self.go.touch()
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights of the uninterrupted 4-step run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(_args(data, run)) == 0
    return torch.load(run / "last.pt", weights_only=True)["model"]


def _assert_same_weights(run: Path, straight: dict[str, torch.Tensor]) -> None:
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    for k, v in straight.items():
        torch.testing.assert_close(ckpt["model"][k], v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_last_pt_and_resumes_exactly(data, tmp_path, straight,
                                                                     sig):
    # Before: Ctrl-C / SIGTERM lost every step since the last save (here: all of them, no save
    # yet), so --resume found nothing and a fresh start met "run dir exists".
    run = tmp_path / "run"
    child = Child(tmp_path, _args(data, run), pause_at=1)  # in step 2 of 4, before any save
    child.wait_paused()
    child.proc.send_signal(sig)
    rc, err = child.finish()
    assert rc == 128 + sig, err
    name = signal.Signals(sig).name
    hint = f"stopped by {name} after step 2; last.pt saved; continue with: scrollsam train " \
           f"out={run} --resume"
    assert err.strip().splitlines()[-1] == hint
    assert "Traceback" not in err
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    assert main(["train", f"out={run}", "--resume", "--no-progress"]) == 0
    _assert_same_weights(run, straight)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_stops_at_once_says_what_is_kept_and_the_run_still_resumes(
        data, tmp_path, straight, sig):
    # Before: the last line was only "interrupted" (kept or removed run dir not said), and a
    # second SIGTERM ended with exit 143 and no line at all.
    run = tmp_path / "run"
    child = Child(tmp_path, _args(data, run), pause_at=1)
    child.wait_paused()
    child.proc.send_signal(sig)
    time.sleep(0.5)  # the first one is handled (a flag), the second one stops
    child.proc.send_signal(sig)
    started = time.monotonic()
    _, err = child.proc.communicate(timeout=120)  # without touching go: it must not wait
    assert child.proc.returncode == 128 + sig, err
    assert time.monotonic() - started < 60
    word = "interrupted" if sig == signal.SIGINT else "terminated"
    assert err.strip().splitlines()[-1] == (
        f"{word}: stopped at once: no checkpoint was written yet, so --resume starts from "
        f"step 0; continue with: scrollsam train out={run} --resume")
    assert "Traceback" not in err
    assert not (run / "last.pt").exists()  # it did not finish the step
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []
    # stopped before its first save: --resume starts the saved config from step 0
    assert main(["train", f"out={run}", "--resume", "--no-progress"]) == 0
    _assert_same_weights(run, straight)


def test_second_process_on_a_locked_run_dir_exits_2_and_the_first_is_unharmed(data, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    child = Child(tmp_path, _args(data, run, "train.save_every=1"), pause_at=2)
    child.wait_paused()  # in step 3: config.yaml and last.pt of step 2 are written
    config_before = (run / "config.yaml").read_text()
    stale = run / ".last.tmp-0badc0de.pt"  # as if the child were writing it right now
    stale.write_bytes(b"being written")
    for extra in ([], ["--resume"]):
        capsys.readouterr()
        assert main([*_args(data, run), *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"error: run dir is in use by pid {child.proc.pid} ({run})\n"
    assert stale.exists()  # a locked run's temp files are not touched
    stale.unlink()
    rc, err = child.finish()
    assert rc == 0, err
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    assert (run / "config.yaml").read_text() == config_before


@pytest.mark.parametrize(("sig", "again"), [(signal.SIGINT, "Ctrl-C again"),
                                            (signal.SIGTERM, "SIGTERM again")])
def test_the_first_signal_says_how_to_stop_at_once_with_that_signal(sig, again, caplog):
    # Before: a SIGTERM from a job scheduler was told "Ctrl-C again to stop at once".
    from scrollsam.train.stop import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while stop.requested is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stop.requested == sig
    (line,) = [r.getMessage() for r in caplog.records if "stopping after this step" in
               r.getMessage()]
    assert f"({again} to stop at once)" in line


def test_stopped_at_once_names_what_the_run_dir_keeps(tmp_path):
    from scrollsam.train.stop import stopped_at_once

    run = tmp_path / "my run"
    assert stopped_at_once(run, undone=True, created=True) == (
        f"stopped at once before the first step finished; the new run dir was removed ({run})")
    assert stopped_at_once(run, undone=None, created=True) == (  # reviewer: said "--resume"
        "stopped at once before the first step finished; what the new run wrote could not all "
        f"be removed: remove it before starting the run again ({run})")
    run.mkdir()  # an empty folder given as out=: it stays, emptied (--resume would fail)
    assert stopped_at_once(run, undone=True, created=False) == (
        f"stopped at once before the first step finished; what the new run wrote was removed "
        f"({run})")
    (run / "last.pt").write_bytes(b"")
    (run / "best.pt").write_bytes(b"")
    assert stopped_at_once(run, undone=False, created=False) == (
        "stopped at once: the steps since its last checkpoint are lost (last.pt and best.pt "
        f"kept); continue with: scrollsam train out='{run}' --resume")


def test_a_second_signal_before_the_first_step_of_a_new_run_in_an_empty_folder_says_so(
        data, tmp_path):
    # Reviewer: the message said "--resume starts from step 0" though the folder had been
    # emptied, so that --resume failed ("nothing to resume").
    run = tmp_path / "given"
    run.mkdir()
    child = Child(tmp_path, _args(data, run), pause_at=0)  # in step 1: none finished
    child.wait_paused()
    child.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    child.proc.send_signal(signal.SIGINT)
    _, err = child.proc.communicate(timeout=120)
    assert child.proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: stopped at once before the first step finished; what the new run wrote "
        f"was removed ({run})")
    assert run.is_dir() and list(run.iterdir()) == []
