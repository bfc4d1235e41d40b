"""One prediction at a time per output folder.

Two `scrollsam predict` calls into one ``--out`` (a job array with one output name, a rerun
started while the first still runs) each wrote their own files into it, and both ended well: a
``prob.png`` of one fragment beside the ``mask.png``, ``overlay.png`` and ``metrics.json`` of
another. ``OUT/.scrollsam-predict.lock`` (a name of scrollsam's own: ``--out`` may be any
folder) is locked as a training run dir is (:class:`~scrollsam.train.rundir.
RunLock`: ``flock``, dropped by the OS when the process dies), by the process that writes the
shared files (rank 0 under torchrun), from after the checks until the end; a second call gets
``error: --out is in use by pid N (OUT)``. A prediction of several fragments also locks each
``OUT/<id>`` (another prediction's ``--out`` perhaps) while it writes it. The lock file goes
when the prediction ends, and so do the folders the lock created while they are empty.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from scrollsam.out_path import missing_folders, remove_made
from scrollsam.train.rundir import RunLock

LOCK_NAME = ".scrollsam-predict.lock"


class OutLock:
    """The lock of an output folder; see the module's docstring."""

    def __init__(self, lock: RunLock, made: list[Path]) -> None:
        self.lock: RunLock | None = lock
        self.made = made

    @classmethod
    def take(cls, out: Path) -> OutLock:
        """Make ``out`` (and the folders above it) where missing and lock it; RunDirError
        naming the holder when another process holds it."""
        made = missing_folders(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            return cls(RunLock.acquire(out, what="--out", name=LOCK_NAME), made)
        except BaseException:
            remove_made(made)
            raise

    def release(self) -> None:
        """Remove the lock file (while still holding it: a process waiting on the old file
        then finds it gone and makes its own), unlock, and remove the folders :meth:`take`
        made that are still empty."""
        if self.lock is None:
            return
        with contextlib.suppress(OSError):
            self.lock.path.unlink()
        self.lock.release()
        self.lock = None
        remove_made(self.made)
