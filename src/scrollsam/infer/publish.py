"""A prediction's files put in place together: never half an old set and half a new one.

PNG mode writes ``prob.png``, ``mask.png``, ``overlay.png`` (and ``prob.tif``,
``metrics.json``) one after another, seconds apart on a large fragment. Written in place, a
Ctrl-C between two of them left the new ``prob.png`` beside the old ``mask.png`` and
``metrics.json`` of another model, or, in a new folder, a ``prob.png`` and ``mask.png`` that
looked like a finished prediction. :class:`Staging` hands out hidden names beside the final
ones (``.prob.staged-1a2b3c4d.png``); once every file is written, :meth:`Staging.publish`
renames them into place and removes the earlier prediction's other files with Ctrl-C and
SIGTERM held back (:func:`~scrollsam.sigterm.deferred_signals`: a signal that comes then takes
effect right after). An error or interrupt before that removes the staged files and leaves the
old set as it was. Only SIGKILL inside the renames (microseconds) can still split a set.

:func:`remove_stale_temps` removes what a killed prediction's writers left (staged and temp
files of prediction outputs, the scratch map of a torchrun PNG prediction); call it only while
holding the output folder's lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from scrollsam.fs_errors import bounded_name
from scrollsam.sigterm import deferred_signals

SCRATCH_NAME = ".predict-prob.npy"  # a torchrun PNG prediction's shared probability map


class Staging:
    """Hidden names for a prediction's files, put in place by :meth:`publish`."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}  # final path -> staged path

    def path(self, final: Path) -> Path:
        """Where to write the file that is to become ``final``: a hidden name beside it."""
        final = Path(final)
        tail = f".staged-{secrets.token_hex(4)}{final.suffix}"
        staged = final.with_name(bounded_name(final.stem, tail))
        self.staged[final] = staged
        return staged

    def unstaged(self, text: str) -> str:
        """``text`` (an error message) with each staged name replaced by its final name."""
        for final, staged in self.staged.items():
            text = text.replace(staged.name, final.name)
        return text

    def publish(self, remove: Iterable[Path] = ()) -> None:
        """Rename every staged file onto its final name and remove the files ``remove``, with
        Ctrl-C and SIGTERM held back until all is done."""
        with deferred_signals():
            for final, staged in self.staged.items():
                os.replace(staged, final)
            for path in remove:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.staged.clear()

    def discard(self) -> None:
        """Remove the staged files not yet published (after an error or an interrupt)."""
        for staged in self.staged.values():
            with contextlib.suppress(OSError):
                staged.unlink()
        self.staged.clear()


_OUTPUT_STEMS = ("prob", "mask", "overlay", "prob_preview", "mask_preview", "metrics",
                 "summary", ".prediction")
_STALE = re.compile(r"^\.{1,3}(" + "|".join(re.escape(s.lstrip(".")) for s in _OUTPUT_STEMS)
                    + r")\.(tmp|staged)-[0-9a-f]{8}(\.tmp-[0-9a-f]{8})?\.(png|tif|json)$")


def remove_stale_temps(dest: Path) -> list[str]:
    """Remove from ``dest`` the staged and temp files of prediction outputs and the torchrun
    scratch map that a killed prediction left; the names removed. Hold ``dest``'s lock."""
    if not dest.is_dir():
        return []
    removed = []
    for path in dest.iterdir():
        if (_STALE.match(path.name) or path.name == SCRATCH_NAME) and (
                path.is_file() or path.is_symlink()):
            path.unlink()
            removed.append(path.name)
    return sorted(removed)
