"""Clean stops: Ctrl-C (SIGINT) and a job scheduler's SIGTERM end training after the current step.

The first signal only sets a flag: the loop finishes the step it is in, writes ``last.pt``
(atomically, like every checkpoint), and raises :class:`TrainingStopped`, which the CLI turns
into one line saying how to resume and the exit code a shell expects from the signal (130 for
SIGINT, 143 for SIGTERM). A second signal stops at once (KeyboardInterrupt for SIGINT,
:class:`~scrollsam.sigterm.Terminated`, one, for SIGTERM); a checkpoint being written then is
abandoned and the previous one stays, and the CLI says what the run dir keeps
(:func:`stopped_at_once`). SLURM and other schedulers send SIGTERM some time before they kill a
job, which is what lets a preempted run continue with ``--resume``.

Under torchrun a Ctrl-C reaches each training process twice: from the terminal, and from
torchrun, which passes the signal it got on to its workers (and kills them 30 s later). So a
repeat within ``same_within`` seconds is the same request (the loop passes a few seconds under
torchrun, 0 alone), and every process stops after the same step (:mod:`.ranks`).

DataLoader worker processes get the terminal's Ctrl-C too; :func:`ignore_stop_signals` (their
``worker_init_fn``) keeps them alive so the last step can finish.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from scrollsam.shell import shell_word
from scrollsam.sigterm import Terminated

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing ``last.pt``; ``str()`` says how to resume.
    ``main``: raised in the process that speaks for the run (torchrun's rank 0, or alone);
    the CLI prints the line there only, not once per process."""

    def __init__(self, signum: int, *, step: int, run: Path, main: bool = True) -> None:
        self.signum = signum
        self.step = step
        self.run = run
        self.main = main
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; last.pt saved; continue with: "
                         f"scrollsam train out={shell_word(run)} --resume")


def stopped_at_once(run: Path, *, undone: bool | None, created: bool) -> str:
    """What a second signal (training stopped at once) left in the run dir ``run``, and how to
    go on: the CLI prints ``interrupted: <this>``. ``undone``: a new run stopped before its
    first step finished, whose files were removed (with the folder where it ``created`` it);
    None: they could not all be removed."""
    if undone is None:
        return (f"stopped at once before the first step finished; what the new run wrote could "
                f"not all be removed: remove it before starting the run again ({run})")
    if undone:
        gone = "the new run dir was removed" if created else "what the new run wrote was removed"
        return f"stopped at once before the first step finished; {gone} ({run})"
    saved = [name for name in ("last.pt", "best.pt") if (run / name).is_file()]
    kept = (f"the steps since its last checkpoint are lost ({' and '.join(saved)} kept)" if saved
            else "no checkpoint was written yet, so --resume starts from step 0")
    return (f"stopped at once: {kept}; continue with: scrollsam train out={shell_word(run)} "
            f"--resume")


class StopSignals:
    """Context manager: while active, SIGINT / SIGTERM request a stop instead of killing.

    ``requested`` is the first signal's number (None until one arrives). Outside the main
    thread signal handlers cannot be installed; then nothing changes and ``requested`` stays
    None. The previous handlers come back on exit. A signal within ``same_within`` seconds of
    the first is taken as a copy of it, not as the second one that stops at once.

    Nested in another StopSignals (training inside a sweep's trial), the two count signals
    together: a stop the outer one already took is this one's first signal, and this one's
    first is also the outer one's, so a second Ctrl-C after training stopped on the first
    stops at once instead of being taken as a new first one.
    """

    # what the first signal's warning says happens next
    NOTICE = "stopping after this step and saving last.pt"

    def __init__(self, *, same_within: float = 0.0) -> None:
        self.requested: int | None = None
        self.same_within = same_within
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}
        self._outer: StopSignals | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            outer = getattr(self._previous[signal.SIGINT], "__self__", None)
            self._outer = outer if isinstance(outer, StopSignals) else None
            if self._outer is not None and self._outer.requested is not None:
                self.requested, self._first_at = self._outer.requested, self._outer._first_at
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._outer = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second signal: stop now
            if time.monotonic() - self._first_at < self.same_within:
                return  # the launcher passing the same Ctrl-C on
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        self.requested = signum
        self._first_at = time.monotonic()
        if self._outer is not None and self._outer.requested is None:
            self._outer.requested, self._outer._first_at = signum, self._first_at
        again = "Ctrl-C again" if signum == signal.SIGINT else "SIGTERM again"
        log.warning("%s: %s (%s to stop at once)", signal.Signals(signum).name, self.NOTICE,
                    again)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM, so a Ctrl-C in the
    terminal (sent to every process of the job) leaves them to the main process, which stops
    them after the last step."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
