"""A prediction written into a folder that holds an earlier one: nothing of the old one is left
to be read as the new one's.

PNG mode writes ``prob.png``, ``mask.png``, ``overlay.png`` and, depending on the call,
``prob.tif`` (``--save-tif``) and ``metrics.json`` (when the fragment has labels); OME-Zarr mode
writes ``prob.ome.zarr``, two previews, ``summary.json`` and ``metrics.json``. Over an earlier
prediction each overwrites its own files, so the earlier call's other files stayed: another
fragment's ``metrics.json`` beside the PNGs of one without labels read as their score, a
``prob.tif`` of another model beside the new ``mask.png``. After the new prediction is written
(whole), :func:`remove_leftovers` removes those files; a failed prediction leaves the old one
as it was.

An OME-Zarr prediction (``prob.ome.zarr`` and its state folder ``.predict``) can be hours of
resumable work, so a PNG prediction into its folder is refused before any work
(:func:`check_no_zarr_under_png`) unless ``--restart``, which discards it once the PNG files
are written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from scrollsam.errors import InputError
from scrollsam.infer.band_state import STATE_NAME
from scrollsam.infer.zarr_out import ZARR_NAME

log = logging.getLogger(__name__)

# Every file a prediction of either mode writes into its folder (the OME-Zarr store and its
# state folder apart: see the module's docstring)
PREDICTION_FILES = ("prob.png", "mask.png", "overlay.png", "prob.tif", "metrics.json",
                    "prob_preview.png", "mask_preview.png", "summary.json")


def check_no_zarr_under_png(dest: Path, *, restart: bool) -> None:
    """InputError when a PNG prediction is to be written into ``dest`` while it holds an
    OME-Zarr prediction, unless ``restart``."""
    if restart or not (dest / ZARR_NAME).exists():
        return
    raise InputError(f"--out: {dest} holds an OME-Zarr prediction ({ZARR_NAME}) and this one "
                     f"writes PNG files; pass --format zarr to continue it, --restart to discard "
                     f"it, or choose another --out")


def remove_leftovers(dest: Path, written: Iterable[Path], *, fragment: str,
                     restart: bool = False) -> list[str]:
    """Remove from ``dest`` the files of :data:`PREDICTION_FILES` that this prediction did not
    write (``written``), and with ``restart`` in PNG mode the OME-Zarr store and its state
    folder; log and return their names. Call it after the new prediction is written whole."""
    kept = {Path(p).name for p in written}
    removed = []
    for name in PREDICTION_FILES:  # files (or links) only: a folder of that name is not ours
        path = dest / name
        if name not in kept and (path.is_symlink() or path.is_file()):
            path.unlink()
            removed.append(name)
    if restart and ZARR_NAME not in kept:
        for name in (ZARR_NAME, STATE_NAME):
            path = dest / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(name)
    if removed:
        log.info("%s: removed %s of the earlier prediction in %s", fragment,
                 ", ".join(removed), dest)
    return removed
