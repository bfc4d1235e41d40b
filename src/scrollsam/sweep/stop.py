"""Ctrl-C (SIGINT) and SIGTERM in a sweep: stop cleanly, never leave a trial RUNNING, and say
how to go on (run the same ``scrollsam sweep`` command again), not how to resume one trial.

Inside a trial's training, training's own handler stops after the current step with
``last.pt`` written (:mod:`scrollsam.train.stop`); the sweep marks that trial failed and ends.
Between trials, :class:`StopBetweenTrials` holds the signal: the trial that finished keeps its
result, none starts after it (one Optuna had already begun is marked failed before its run dir
is made), and the sweep ends. A second signal stops at once, as in training.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import optuna

from scrollsam.train.stop import StopSignals, TrainingStopped

log = logging.getLogger(__name__)


class SweepStopped(TrainingStopped):
    """The sweep stopped on a signal; ``str()`` says how to continue it. A TrainingStopped, so
    the CLI prints it and exits 128 + the signal's number."""

    def __init__(self, signum: int, *, out: Path, detail: str = "") -> None:
        super().__init__(signum, step=0, run=out)
        name = signal.Signals(signum).name
        self.args = (f"sweep stopped by {name}{detail}; to continue the sweep run the same "
                     f"scrollsam sweep command again (new trials get new run dirs in {out})",)


class StopBetweenTrials(StopSignals):
    """Context manager: while active (main thread only), a first SIGINT / SIGTERM sets
    ``requested`` (the sweep then stops before its next trial); a second stops at once
    (KeyboardInterrupt; for SIGTERM its kind :class:`~scrollsam.sigterm.Terminated`).
    Training inside a trial installs its own handler and restores this one when it ends. The
    previous handlers come back on exit."""

    NOTICE = "the sweep stops before its next trial"

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each trial: no further trial once a stop was requested."""
        if self.requested is not None:
            study.stop()
