"""Training progress for people: a tqdm bar on a terminal, plain log lines in a log file.

On a terminal the bar redraws itself with carriage returns, and log records (validation
scores, warnings) are routed through ``tqdm.write`` so each stays on its own line instead of
being glued to the bar. When stderr is not a terminal (a redirected log, a batch job) there is
no bar: on each log step (``log.every``) one plain line
``step 40/300: loss 0.4123, 25.1 tiles/s`` is logged instead, so a log file holds no ``\\r``
noise.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("scrollsam.train.loop")


class Progress:
    """Reports steps ``initial + 1 .. total`` between :meth:`start` and :meth:`close`;
    ``enabled`` False: silent."""

    def __init__(self, *, total: int, initial: int, enabled: bool) -> None:
        self.total = total
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

    def step(self, step: int, *, loss: float | None, tiles_per_s: float) -> None:
        """Report that step ``step`` (1-based) finished with ``loss`` (None: not read on this
        step, which is not a log step; the bar keeps the last loss shown)."""
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tiles_s=f"{tiles_per_s:.1f}",
                                     refresh=False)
            self.bar.update(1)
        elif self.lines and loss is not None:
            log.info("step %d/%d: loss %.4f, %.1f tiles/s", step, self.total, loss, tiles_per_s)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False
