"""Training progress for people: a tqdm bar on a terminal, plain log lines in a log file.

On a terminal the bar redraws itself with carriage returns, and log records (validation
scores, warnings) are routed through ``tqdm.write`` so each stays on its own line instead of
being glued to the bar. When stderr is not a terminal (a redirected log, a batch job) there is
no bar: on each log step (``log.every``) one plain line
``step 40/300: loss 0.4123, 25.1 tiles/s, data wait 12%; 2m10s elapsed, 14m05s left``
is logged instead, so a log file holds no ``\\r`` noise.

On a terminal, or with progress off (``--no-progress``), the step lines go to the run's own
log file alone (:mod:`.run_log`).

The speed shown (:class:`Speed`) is that of the training steps since the last log line;
validation, pictures and checkpoints are left out, so a slowdown shows at once (an average
since the start hid it for hours).

"data wait" (:class:`DataWait`) is the share of the time since the last log step that the loop
spent waiting for its next batch (averaged over the processes under torchrun): the loading
itself with ``data.workers=0``, or workers that fall behind. On a GPU the host waits while the
device may still work through queued kernels, so it bounds the device's idle time from above;
:meth:`DataWait.hint` suggests more workers once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scrollsam.train.run_log import RUN_LOGS, to_run_logs

log = logging.getLogger("scrollsam.train.loop")
T = TypeVar("T")
HINT_SHARE = 0.25  # a data wait above this on a GPU gets the one-time hint


class Progress:
    """Reports steps ``initial + 1 .. total`` between :meth:`start` and :meth:`close`;
    ``enabled`` False: silent."""

    def __init__(self, *, total: int, initial: int, enabled: bool) -> None:
        self.total = total
        self.started = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (step, time) of the first step line
        self.terminal = enabled and _is_terminal()
        self.lines = enabled and not self.terminal
        self.bar: tqdm | None = None
        self._stack = contextlib.ExitStack()
        if self.terminal:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def start(self) -> Progress:
        """Route log records through the bar (on a terminal); returns self. Pair with close."""
        if self.bar is not None:
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def close(self) -> None:
        """Stop routing log records and close the bar."""
        self._stack.close()
        if self.bar is not None:
            self.bar.close()

    def step(self, step: int, *, loss: float | None, tiles_per_s: float,
             data_wait: float | None = None) -> None:
        """Report that step ``step`` (1-based) finished with ``loss`` (None: not read on this
        step, which is not a log step; the bar keeps the last loss shown) and, on log steps,
        the ``data_wait`` share (:class:`DataWait`)."""
        wait = "" if data_wait is None else f"{data_wait:.0%}"
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tiles_s=f"{tiles_per_s:.1f}",
                                     data_wait=wait, refresh=False)
            self.bar.update(1)
        if loss is None or not (self.lines or RUN_LOGS):
            return
        now = time.perf_counter()
        first_step, first_time = self._first = self._first or (step, now)
        eta = ""  # from the steps since the first line: start-up (compile, workers) left out
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)  # validations included
            eta = f", {duration(per_step * (self.total - step))} left"
        line = (f"step {step}/{self.total}: loss {loss:.4f}, {tiles_per_s:.1f} tiles/s"
                f"{f', data wait {wait}' if wait else ''}; {duration(now - self.started)} "
                f"elapsed{eta}")
        if self.lines:
            log.info(line)
        else:  # the bar shows it (or --no-progress: nothing); the run's log file gets it
            to_run_logs(logging.INFO, line)


def duration(seconds: float) -> str:
    """``42s``, ``14m05s``, ``3h07m``, ``2d04h``: a span to read at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Speed:
    """Tiles per second over the training steps since the last :meth:`rate` or
    :meth:`restart` (call that after validation, pictures and checkpoints)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._tiles, self._since = 0, time.perf_counter()

    def add(self, tiles: int) -> None:
        self._tiles += tiles

    def rate(self) -> float:
        """Tiles per second since the last reading or restart; starts the next interval."""
        now = time.perf_counter()
        rate = self._tiles / max(now - self._since, 1e-9)
        self._tiles, self._since = 0, now
        return rate


class DataWait(Generic[T]):
    """``batches`` as an iterator that times its ``next``: :meth:`share` is the part of the
    wall time since the previous call (or since it was made) spent waiting for a batch;
    :meth:`hint` the one-time advice for a run on ``device`` with ``workers`` loader processes.
    """

    def __init__(self, batches: Iterable[T], *, workers: int, device: str) -> None:
        self._batches = iter(batches)
        self.workers, self.device = workers, device
        self._waited, self._last = 0.0, 0.0
        self._since = time.perf_counter()
        self._hinted, self._intervals = False, 0

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self._waited += time.perf_counter() - start

    def share(self) -> float:
        """The share of waiting in [0, 1] since the last call; starts the next interval."""
        now = time.perf_counter()
        self._last = min(self._waited / max(now - self._since, 1e-9), 1.0)
        self._waited, self._since = 0.0, now
        self._intervals += 1
        return self._last

    def hint(self) -> str | None:
        """Once per run: advice when, on a GPU, the interval the last :meth:`share` measured
        waited more than :data:`HINT_SHARE`. Not after the first interval, which includes
        starting the workers (on a resumed run too)."""
        if (self._hinted or self.device != "cuda" or self._intervals < 2
                or self._last <= HINT_SHARE):
            return None
        self._hinted = True
        return (f"training waited for data {self._last:.0%} of the time since the last log "
                f"line, with data.workers={self.workers} on {_cores()} CPU cores: the GPU may "
                f"have idled meanwhile; raise data.workers (each worker loads tiles on one "
                f"core)")


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False
