"""A second Ctrl-C in a sweep stops at once, also when the first one was taken by the trial's
training (or training began just after the sweep took it). Real signals sent to this process;
the handlers under test are installed by the code itself."""

from __future__ import annotations

import os
import signal
import time

import pytest

from scrollsam.sweep.stop import StopBetweenTrials
from scrollsam.train.stop import StopSignals


def _wait(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_second_ctrl_c_after_training_took_the_first_stops_the_sweep_at_once(caplog):
    # Before: training's handler took the first Ctrl-C; once training had stopped, the sweep's
    # own handler (which never saw it) took the second as a first one and printed "the sweep
    # stops before its next trial (Ctrl-C again to stop at once)" again.
    with StopBetweenTrials() as sweep:
        with StopSignals() as training:
            os.kill(os.getpid(), signal.SIGINT)
            _wait(lambda: training.requested is not None)
        assert sweep.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait(lambda: False, 1.0)
    notices = [r.getMessage() for r in caplog.records if "again to stop at once" in
               r.getMessage()]
    assert len(notices) == 1, notices


def test_training_begun_after_the_sweeps_first_ctrl_c_stops_at_the_second():
    # A Ctrl-C the sweep took just before a trial's training began is training's first too.
    with StopBetweenTrials() as sweep:
        os.kill(os.getpid(), signal.SIGINT)
        _wait(lambda: sweep.requested is not None)
        with StopSignals() as training:
            assert training.requested == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait(lambda: False, 1.0)
