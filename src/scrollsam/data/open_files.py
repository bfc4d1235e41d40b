"""A bound on the slice files one process keeps open, and none shared with a forked child.

A slice reader keeps its TIFF open between reads (a memory map, or tifffile's file handle for a
compressed or tiled slice): re-opening costs more than the read of a small window. With every
slice of every fragment open, a run over 16 fragments of 65 slices passed 1024 open files, a
common per-process limit (``ulimit -n``), and failed with "too many open files" in the middle of
training. :data:`OPEN_FILES` keeps the most recently read readers open, at most
:func:`default_limit` of them (plus, for an instant, one per other thread reading), and closes
the least recently read one beyond that; it re-opens on its next read. It holds readers weakly:
a reader whose fragment is gone closes with it, as before.

A forked child (a DataLoader worker) inherited the parent's open readers, and with them one file
offset per compressed slice shared by every worker: their seek + read pairs interleaved and
returned other windows' pixels, silently (a reviewer's stress test: 12 of 6000 windows). In a
child every registered reader lets its file go at once and re-opens its own.

Readers register here on each read (:meth:`OpenFiles.touch`) and close through
:meth:`OpenFiles.forget`. Eviction closes a reader under that reader's own lock, so a read in
another thread (prediction reads windows in a prefetch thread) never loses its file mid-read.
"""

from __future__ import annotations

import os
import resource
import threading
import weakref
from collections import OrderedDict
from typing import Protocol

MOST = 1024  # open slice files at most, whatever the limit allows
LEAST = 16  # ... and at least, however low the limit


class Releasable(Protocol):
    """A reader whose open file can be let go (a later read re-opens it)."""

    def release(self) -> None: ...

    def after_fork(self) -> None: ...


def default_limit() -> int:
    """A quarter of the process's open-file limit (the rest for everything else: sockets,
    DataLoader pipes, checkpoints, zarr chunks), within [LEAST, MOST]."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MOST
    return max(LEAST, min(MOST, soft // 4))


class OpenFiles:
    """The readers with an open file, least recently read first; at most ``limit`` alive."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[int, weakref.ref[Releasable]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(1 for ref in self._open.values() if ref() is not None)

    def touch(self, reader: Releasable) -> None:
        """``reader`` is about to read: mark it most recent and close the least recent readers
        beyond the limit (never ``reader`` itself)."""
        with self._lock:
            key = id(reader)  # unique while reader lives; a dead one's entry is replaced
            ref = self._open.get(key)
            if ref is None or ref() is not reader:
                self._open[key] = weakref.ref(reader)
            self._open.move_to_end(key)
            while len(self._open) > max(self.limit, 1):
                _, oldest = self._open.popitem(last=False)
                old = oldest()
                if old is not None:  # gone: its file closed with it
                    old.release()

    def forget(self, reader: Releasable) -> None:
        """``reader`` closed its file itself."""
        with self._lock:
            ref = self._open.get(id(reader))
            if ref is not None and ref() is reader:
                del self._open[id(reader)]

    def after_fork(self) -> None:
        """In a forked child: a new lock (a parent thread may have held it), and every reader
        inherited open lets its file go, so no file offset is shared with the parent or the
        other children."""
        self._lock = threading.Lock()
        for ref in self._open.values():
            reader = ref()
            if reader is not None:
                reader.after_fork()
        self._open.clear()


OPEN_FILES = OpenFiles(default_limit())
os.register_at_fork(after_in_child=OPEN_FILES.after_fork)
