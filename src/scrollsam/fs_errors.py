"""OSErrors in words, for reads and for failures whose operation is unknown.

Writers have :func:`scrollsam.io.write_failure` (``no space left on device while writing ...``);
this module words the rest, and never says "writing" for what may have been a read:

- :func:`read_failure`: why a file could not be read (``permission denied``, ``it is a link to a
  missing file, /data/05.tif``); readers put it into ``cannot read TIFF: <why> (<file>)``.
- :func:`name_too_long`: a name over the file system's limit (Errno 36, ENAMETOOLONG), with the
  number of bytes and the limit.
- :func:`os_error_line`: the one ``error:`` line the CLI prints for an OSError that no reader or
  writer turned into words, or None for one that is not the user's to fix (a bug keeps its
  traceback).
- :func:`bounded_name`: a hidden temp name built from a target's name that fits the 255-byte
  limit, whatever the target's length.

Nothing here raises: a check that meets an error (a folder without search permission, a name
too long to stat) counts as "no".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["NAME_MAX", "bounded_name", "name_too_long", "os_error_line", "read_failure"]

NAME_MAX = 255  # bytes in one name: ext4, xfs, btrfs, tmpfs, APFS, NTFS (in UTF-16 units)
PATH_MAX = 4096  # bytes in a whole path handed to the kernel (Linux)

# errno -> the words a line uses for it where the error's own text would be unclear
_WORDS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file",
    errno.EISDIR: "it is a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ELOOP: "too many levels of links (a link that leads back to itself?)",
    errno.EIO: "input/output error (a failing disk or network mount?)",
}
_NEUTRAL = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG})  # lines, not tracebacks


def _bytes(name: str | os.PathLike[str]) -> int:
    return len(os.fsencode(name))


def name_too_long(path: str | os.PathLike[str]) -> str:
    """``name too long: 300 bytes, at most 255`` for the longest name in ``path`` (or ``path
    too long: ...`` when every name fits but the whole path does not)."""
    longest = max((_bytes(part) for part in Path(path).parts), default=0)
    if longest > NAME_MAX:
        return f"name too long: {longest} bytes, at most {NAME_MAX}"
    return f"path too long: {_bytes(path)} bytes, at most {PATH_MAX}"


def read_failure(err: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """Why reading ``path`` (default: the file ``err`` names) failed, in a few words without the
    path: ``permission denied``, ``it is a link to a missing file, ../x/05.tif``, ``name too
    long: 300 bytes, at most 255``; else the system's own words (``err.strerror``)."""
    name = err.filename if err.filename is not None else path
    for link in (path, err.filename):  # a reader may have resolved the link before opening
        if err.errno == errno.ENOENT and link is not None and os.path.islink(link):
            try:
                return f"it is a link to a missing file, {os.fsdecode(os.readlink(link))}"
            except OSError:
                pass
    if err.errno == errno.ENAMETOOLONG and name is not None:
        return name_too_long(os.fsdecode(name))
    if err.errno in _WORDS:
        return _WORDS[err.errno]
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def os_error_line(err: OSError, out: str | os.PathLike[str] | None = None) -> str | None:
    """The line (after ``error: ``) for an OSError that reached the CLI unworded, or None when
    it is no refused write, permission or over-long name (a bug: keep the traceback).

    A refused write names what was written (:func:`scrollsam.io.refused_write`); a missing
    permission counts as one only for a path inside the command's output ``out``, as the
    operation is unknown and reading is never called writing: elsewhere the line is neutral,
    ``permission denied (data/1/surface_volume)``."""
    from scrollsam.io import refused_write  # io imports this module

    line = refused_write(err, out)
    if line is not None or err.errno not in _NEUTRAL:
        return line
    name = err.filename if err.filename is not None else out
    if name is None:
        return None
    name = os.fsdecode(name)
    return f"{read_failure(err, name)} ({name})"


def bounded_name(stem: str, tail: str, *, hidden: bool = True) -> str:
    """``.{stem}{tail}`` (a hidden name next to a target; ``{stem}{tail}`` when not ``hidden``)
    with ``stem`` cut, whole characters from its end, so that the name fits :data:`NAME_MAX`
    bytes; unchanged where it fits. A ``tail`` too long to fit is cut too (an absurd suffix,
    not a real format's)."""
    dot = "." if hidden else ""
    room = NAME_MAX - len(dot) - _bytes(tail)
    if room < 0:
        stem, tail, room = stem + tail, "", NAME_MAX - len(dot)  # the start names the target
    while _bytes(stem) > room:
        stem = stem[:-1]
    return f"{dot}{stem}{tail}"
