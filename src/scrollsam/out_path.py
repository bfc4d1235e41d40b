"""Output locations checked before any work, and the folders a failed start made, undone.

Every command that writes a folder (train's run dir, synth's OUT, the demo's folder, predict's
``--out``) calls :func:`check_out_folder` first, so a location that cannot work ends with one
``error:`` line before hours of work rather than with a traceback after them:

- a symbolic link to nowhere (the link itself, or one on the way to it), named with its target;
- a symbolic link loop, naming the link;
- a path that runs through a regular file (``afile/sub``), naming the file; a file in place
  of the folder itself;
- where the command replaces or removes the folder (``demo``, ``synth --overwrite``), a link in
  place of the folder: removing what it points to, or the link alone, is not what was asked.

:func:`missing_folders` and :func:`remove_made` undo the parent folders a start created when it
fails (only those, only while empty). :func:`swap_folder` puts a finished folder in place of an
older one (synth, convert).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from scrollsam.errors import InputError


def check_out_folder(path: str | os.PathLike[str], *, name: str, replaced: bool = False) -> None:
    """InputError (``<name>: ... (<path>)``) when the folder ``path`` cannot be written (see the
    module docstring); ``replaced``: the command may replace or remove the folder, so a link
    in its place is refused too. A path that does not exist yet is fine; a permission problem
    is left to the write, which names it."""
    path = Path(path)
    steps = [*reversed(path.parents), path]
    for i, step in enumerate(steps):
        if step == Path("."):
            continue
        try:
            info = os.stat(step)
        except OSError as err:
            _refuse_missing(err, step, path, name=name)
            return  # does not exist (nor anything below it), or not ours to judge
        if stat.S_ISDIR(info.st_mode):
            continue
        if i == len(steps) - 1:
            raise InputError(f"{name}: is a file, not a folder ({path})")
        kind = "a file" if stat.S_ISREG(info.st_mode) else "not a folder"
        raise InputError(f"{name}: {step} is {kind}, so {path} cannot be made in it ({path})")
    if replaced and path.is_symlink():
        raise InputError(f"{name}: is a symbolic link, and the folder it names would be "
                         f"replaced; name the folder itself ({path} -> {os.readlink(path)})")


def _refuse_missing(err: OSError, step: Path, path: Path, *, name: str) -> None:
    """InputError for the failed ``os.stat`` of ``step`` (a prefix of ``path``) when it is a
    dangling link or a link loop; nothing when ``step`` simply does not exist or is
    unreadable."""
    where = "" if step == path else f" on the way to {path}"
    if err.errno == errno.ELOOP:
        raise InputError(f"{name}: symbolic link loop at {step}{where}; name a real folder "
                         f"({path})") from None
    if err.errno == errno.ENOENT and step.is_symlink():
        raise InputError(f"{name}: {step} is a symbolic link to nowhere ({step} -> "
                         f"{os.readlink(step)}){where}; remove it or name another folder "
                         f"({path})") from None


def missing_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """``folder`` and those above it that do not exist yet, innermost first: what a
    ``mkdir(parents=True)`` would create, for :func:`remove_made`."""
    missing = []
    for path in (Path(folder), *Path(folder).parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def remove_made(made: list[Path]) -> None:
    """Remove the folders ``made`` (innermost first, from :func:`missing_folders`) while they
    are empty; one that holds anything (another process's files) stays, and so do those above
    it."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def swap_folder(new: Path, target: Path, aside: Path) -> Path | None:
    """Rename the finished folder ``new`` to ``target``. An existing ``target`` is first renamed
    to ``aside`` and returned, for the caller to delete once the new one is in place (None
    when there was none); if the second rename fails it is renamed back."""
    if not target.exists():
        os.rename(new, target)
        return None
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside
