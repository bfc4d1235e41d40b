"""A bound on the slice files one process keeps open.

A slice reader keeps its TIFF open between reads (a memory map, or tifffile's file handle for a
compressed slice): re-opening costs more than the read of a small window. With every slice of
every fragment open, a run over 16 fragments of 65 slices passed 1024 open files, a common
per-process limit (``ulimit -n``), and failed with "too many open files" in the middle of
training. :data:`OPEN_FILES` keeps the most recently read readers open, at most
:func:`default_limit` of them, and closes the least recently read one beyond that; it re-opens
on its next read.

Readers register here on each read (:meth:`OpenFiles.touch`) and close through
:meth:`OpenFiles.forget`. Eviction closes a reader under that reader's own lock, so a read in
another thread (prediction reads windows in a prefetch thread) never loses its file mid-read.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict
from typing import Protocol

MOST = 1024  # open slice files at most, whatever the limit allows
LEAST = 16  # ... and at least, however low the limit


class Releasable(Protocol):
    """A reader whose open file can be let go (a later read re-opens it)."""

    def release(self) -> None: ...


def default_limit() -> int:
    """A quarter of the process's open-file limit (the rest for everything else: sockets,
    DataLoader pipes, checkpoints, zarr chunks), within [LEAST, MOST]."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MOST
    return max(LEAST, min(MOST, soft // 4))


class OpenFiles:
    """The readers with an open file, least recently read first; at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[int, Releasable] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def touch(self, reader: Releasable) -> None:
        """``reader`` is about to read: mark it most recent and close the least recent readers
        beyond the limit (never ``reader`` itself)."""
        with self._lock:
            self._open[id(reader)] = reader
            self._open.move_to_end(id(reader))
            while len(self._open) > max(self.limit, 1):
                _, oldest = self._open.popitem(last=False)
                oldest.release()

    def forget(self, reader: Releasable) -> None:
        """``reader`` closed its file itself."""
        with self._lock:
            self._open.pop(id(reader), None)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it


OPEN_FILES = OpenFiles(default_limit())
os.register_at_fork(after_in_child=OPEN_FILES._after_fork)
