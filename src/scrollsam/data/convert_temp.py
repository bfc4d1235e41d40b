"""The temporary folder `scrollsam convert` writes a copy into: its name, its removal after a
failure or an interrupt, and the removal of ones that killed converts left.

The copy of OUT is written into ``.OUT.tmp-PID-HEX`` next to OUT (:func:`temp_path`, shortened
to fit 255 bytes as :func:`~scrollsam.fs_errors.bounded_name` does) and renamed to OUT once
complete. Removing it needs care with Zarr: zarr (v3) writes chunks as tasks on its own event
loop thread, and a Ctrl-C only stops the main thread's wait for them, so a write still in flight
could re-create a chunk (``surface_volume.zarr/2/1/0/0``) after the folder was removed, leaving
it behind. :func:`remove_temp` lets those tasks end first (:func:`scrollsam.zarr_tasks.settle`).
A SIGKILL leaves the folder whatever happens; the next convert into the same OUT removes it
(:func:`remove_stale_temps`): only names of this pattern for that OUT, only of a process that no
longer runs. ``--overwrite`` renames the old OUT aside to ``.OUT.old-PID-HEX``
(:func:`aside_path`) before the new copy takes its name and deletes it after; one a stopped or
killed convert left is removed by the next convert too, but only while OUT itself exists (else
it is the only copy).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from scrollsam import zarr_tasks
from scrollsam.fs_errors import bounded_name

log = logging.getLogger(__name__)

_TAIL = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A new hidden name next to ``target`` for this process, ``.NAME.KIND-PID-HEX``: ``tmp``
    for the copy being written, ``old`` for the copy it replaces (:func:`aside_path`)."""
    return target.parent / bounded_name(target.name,
                                        f".{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def aside_path(target: Path) -> Path:
    """A new name next to ``target`` for the copy it replaces: ``.NAME.old-PID-HEX``."""
    return temp_path(target, "old")


def remove_temp(tmp: Path) -> None:
    """Remove ``tmp`` after zarr's pending writes into it ended; once more if one still
    re-created part of it. Never raises for a folder that cannot be removed (best effort)."""
    zarr_tasks.settle()
    for _ in range(2):
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(tmp):
            return
        zarr_tasks.settle()
    log.warning("could not delete the temporary folder %s; delete it by hand", tmp)


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary folders of copies into ``target`` and the replaced copies set
    aside, left by convert processes no longer running (stopped or killed); the folders
    removed. A folder counts only when its whole name is the one :func:`temp_path` or
    :func:`aside_path` gives ``target`` for its pid, it is a real folder (not a link), no
    process of that pid exists, and, for a replaced copy, ``target`` is a folder."""
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # no parent yet, or not readable: nothing of ours can be there
        return []
    for entry in entries:
        match = _TAIL.search(entry.name)
        if match is None or not entry.name.startswith("."):
            continue
        pid, tail = int(match["pid"]), match[0]
        if (entry.name != bounded_name(target.name, tail) or pid == os.getpid()
                or _alive(pid) or entry.is_symlink() or not entry.is_dir()):
            continue
        if match["kind"] == "old" and (target.is_symlink() or not target.is_dir()):
            continue  # killed between its renames: the old copy is the only one
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.info("removed %s, left by a convert that was killed (pid %d)", entry, pid)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists; anything else: assume it does
        return True
    return True
