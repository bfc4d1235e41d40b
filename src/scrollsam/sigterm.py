"""SIGTERM taken as Ctrl-C by every command that has no stop handler of its own.

A batch scheduler (SLURM, Kubernetes, ``timeout``) ends a job with SIGTERM. Python's default
for it kills the process on the spot: no ``finally`` runs, so a command lost its cleanup (a
half-written ``.tmp-*`` folder stayed) and ended silently with exit code 143. While
:func:`sigterm_as_interrupt` is active, SIGTERM raises :class:`Terminated`, a
:class:`KeyboardInterrupt`, so every cleanup written for Ctrl-C runs for it too; the CLI then
prints ``terminated`` and exits 143. Training and sweeps install their own handlers (stop after
the current step, :mod:`scrollsam.train.stop`) while they run and put this one back after.
:func:`deferred_signals` holds Ctrl-C and SIGTERM back for a few renames that must not be cut
in half (a prediction's files, a converted copy).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_TERMINATED = 128 + signal.SIGTERM  # as a shell reports a command ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind as for Ctrl-C. ``str()`` may say what was left (the CLI prints
    ``terminated: <that>``)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread. Changes nothing
    outside the main thread (no handler can be installed there) or where SIGTERM already has a
    handler or is ignored (a caller's choice, e.g. ``nohup``-like launchers); the handler that
    was there comes back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                     ) -> Iterator[None]:
    """Hold back ``signums`` for the block: their Python handlers (which run in the main
    thread only) are replaced by ones that note the signal, and each noted one is raised again
    once the old handlers are back. Outside the main thread it does nothing (signals cannot be
    handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {s: h for s in signums  # None: set outside Python, which cannot restore it
                if (h := signal.getsignal(s)) is not None}
    for s in previous:
        signal.signal(s, lambda number, frame: noted.append(number))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for number in noted:
            signal.raise_signal(number)
