"""The run's own log: ``RUN/train.log``, every message of each training call in the run dir (a
resume appends), each line with its date and time, and how the call ended.

A long run's output otherwise lives only where the terminal or the batch job put it: lost with
each resume's terminal unless redirected, and without times, so a log could not say when a
validation ran or how long a resume took. :class:`RunLog` keeps the records of a training call
from its start (the resume's report comes before the run dir is open) and writes them ahead of
the rest once :meth:`RunLog.into` names the run dir; the call's end (an error, a stop) is its
last line. Only the process that writes the run dir (rank 0) keeps it. Records are those
scrollsam's loggers pass (the CLI's: INFO and above; a Python caller's logging configuration
decides). A file that cannot be written (a full disk, the folder gone) stops the file, not the
run: one warning on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from scrollsam.errors import ScrollsamError

LOG_NAME = "train.log"
FORMAT = "%(asctime)s %(levelname)s %(message)s"
RUN_LOGS: list[logging.Handler] = []  # the run log files open now (Progress writes to them)
_LOGGER = logging.getLogger("scrollsam")


class _RunLogHandler(logging.FileHandler):
    """A FileHandler that gives up quietly (one line on stderr) when its file fails."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"warning: could not write the run's log ({err}); training goes on without "
                  f"it ({self.baseFilename})", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            super().emit(record)  # opens the file on the first record: that may fail too
        except OSError:
            self.handleError(record)


class _Early(logging.Handler):
    """Keeps the records of a training call until its run dir is known."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """``with RunLog(enabled=rank_0) as log_file:`` around a training call, then
    ``with log_file.into(run):`` around the training itself."""

    def __init__(self, *, enabled: bool) -> None:
        self.early = _Early() if enabled else None

    def __enter__(self) -> RunLog:
        if self.early is not None:
            _LOGGER.addHandler(self.early)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.early is not None:
            _LOGGER.removeHandler(self.early)

    @contextlib.contextmanager
    def into(self, run: Path) -> Iterator[None]:
        """Append the call's records so far, then every record while active, to
        ``run / LOG_NAME``; an exception that ends the block is the file's last line."""
        if self.early is None:
            yield
            return
        handler = _RunLogHandler(run / LOG_NAME, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.setLevel(logging.INFO)
        _LOGGER.removeHandler(self.early)
        for record in self.early.records:
            handler.handle(record)
        self.early.records.clear()
        _LOGGER.addHandler(handler)
        RUN_LOGS.append(handler)
        try:
            yield
        except BaseException as err:
            to_run_logs(*ending(err))
            raise
        finally:
            RUN_LOGS.remove(handler)
            _LOGGER.removeHandler(handler)
            handler.close()


def to_run_logs(level: int, line: str) -> None:
    """Write ``line`` to the run log files open now, and nowhere else (the terminal shows it
    another way: the bar, or the CLI's own last line)."""
    record = _LOGGER.makeRecord(_LOGGER.name, level, __file__, 0, line, None, None)
    for handler in RUN_LOGS:
        handler.handle(record)


def ending(err: BaseException) -> tuple[int, str]:
    """The log level and line for an exception that ended training: a stop says how to go on
    (its own text), an error what it was."""
    from scrollsam.train.stop import TrainingStopped

    if isinstance(err, TrainingStopped):
        return logging.WARNING, str(err)
    if isinstance(err, KeyboardInterrupt):
        return logging.WARNING, f"interrupted{f': {err}' if str(err) else ''}"
    if isinstance(err, ScrollsamError):
        return logging.ERROR, f"error: {err}"
    return logging.ERROR, f"failed: {type(err).__name__}: {err}"
