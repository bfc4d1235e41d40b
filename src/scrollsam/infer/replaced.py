"""A prediction written into a folder that holds an earlier one: nothing of the old one is left
to be read as the new one's, and nothing that is not a prediction's is touched.

PNG mode writes ``prob.png``, ``mask.png``, ``overlay.png`` and, depending on the call,
``prob.tif`` (``--save-tif``) and ``metrics.json`` (when the fragment has labels); OME-Zarr mode
writes ``prob.ome.zarr``, two previews, ``summary.json`` and ``metrics.json``. Over an earlier
prediction each overwrites its own files, so the earlier call's other files stayed: another
fragment's ``metrics.json`` beside the PNGs of one without labels read as their score, a
``prob.tif`` of another model beside the new ``mask.png``.

Which files are a prediction's: each prediction records the names it wrote in
``DEST/.prediction.json`` (:data:`RECORD`) once it is written. A folder without that record
holds an earlier prediction when it holds ``prob.png`` or ``prob.ome.zarr``, the first thing
each mode writes (a prediction made before the record, or one killed while writing): then the
names that mode writes are that prediction's (PNG: the three PNGs, ``prob.tif``,
``metrics.json``; OME-Zarr: the previews, ``summary.json``, ``metrics.json``).
:func:`earlier_files` reads this before any work; a file the new prediction would write over
that is not an earlier prediction's (a hand-made ``mask.png``, the user's own
``summary.json``) is refused then (:func:`check_replaceable`). After the new prediction is
written whole, :func:`remove_leftovers` removes the earlier prediction's files it did not
write again and records its own; a failed prediction leaves the old one as it was.

An OME-Zarr prediction (``prob.ome.zarr`` and its state folder ``.predict``) can be hours of
resumable work, so a PNG prediction into its folder is refused unless ``--restart``, which
discards it once the PNG files are written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from scrollsam.errors import InputError
from scrollsam.infer.band_state import STATE_NAME
from scrollsam.infer.publish import Staging
from scrollsam.infer.zarr_out import ZARR_NAME
from scrollsam.io import atomic_write_text

log = logging.getLogger(__name__)

# Every file a prediction of either mode writes into its folder (the OME-Zarr store and its
# state folder apart: see the module's docstring)
PREDICTION_FILES = ("prob.png", "mask.png", "overlay.png", "prob.tif", "metrics.json",
                    "prob_preview.png", "mask_preview.png", "summary.json")
PNG_FILES = ("prob.png", "mask.png", "overlay.png")  # what every PNG prediction writes
ZARR_FILES = ("prob_preview.png", "mask_preview.png", "summary.json")  # every OME-Zarr one
RECORD = ".prediction.json"  # the names the prediction in a folder wrote


def will_write(kind: str, *, labels: bool, save_tif: bool) -> set[str]:
    """The names of :data:`PREDICTION_FILES` a prediction of ``kind`` (``png`` | ``zarr``)
    writes: with ``labels`` also metrics.json; PNG mode with ``save_tif`` also prob.tif."""
    names = set(PNG_FILES if kind == "png" else ZARR_FILES)
    if labels:
        names.add("metrics.json")
    if kind == "png" and save_tif:
        names.add("prob.tif")
    return names


def earlier_files(dest: Path) -> set[str]:
    """The names in ``dest`` of :data:`PREDICTION_FILES` that an earlier prediction wrote (see
    the module's docstring); empty when it holds none."""
    record = dest / RECORD
    try:
        names = set(json.loads(record.read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        names = None  # no record (or not one we can read): an older prediction, or none
    if names is None:  # the names the mode whose first file is there writes
        names = set()
        if (dest / "prob.png").is_file():
            names |= {*PNG_FILES, "prob.tif", "metrics.json"}
        if (dest / ZARR_NAME).is_dir():
            names |= {*ZARR_FILES, "metrics.json"}
    return {n for n in names & set(PREDICTION_FILES) if _is_file(dest / n)}


def check_replaceable(dest: Path, writes: set[str], earlier: set[str], *, restart: bool) -> None:
    """InputError, before any work, when the prediction would write over a file in ``dest``
    that no earlier prediction wrote (``writes``: its names, ``earlier``: from
    :func:`earlier_files`), write PNG files beside an OME-Zarr prediction, or write an OME-Zarr
    prediction over a store whose settings are not known (its ``.predict`` folder gone: copied
    without hidden folders, cleaned up by hand), without ``restart``."""
    theirs = sorted(n for n in writes - earlier if (dest / n).exists() or (dest / n).is_symlink())
    if theirs:
        raise InputError(f"--out: {dest} holds {', '.join(theirs)}, not written by a scrollsam "
                         f"prediction, which this one would replace; choose another --out")
    if "prob.png" in writes and not restart and (dest / ZARR_NAME).exists():
        raise InputError(f"--out: {dest} holds an OME-Zarr prediction ({ZARR_NAME}) and this "
                         f"one writes PNG files; pass --format zarr to continue it, --restart "
                         f"to discard it, or choose another --out")
    if ("summary.json" in writes and not restart and (dest / ZARR_NAME).exists()
            and not (dest / STATE_NAME / "settings.json").is_file()):
        raise InputError(f"--out: {dest} holds an OME-Zarr store ({ZARR_NAME}) whose settings "
                         f"are unknown ({STATE_NAME}/settings.json is missing); pass --restart "
                         f"to discard it, or choose another --out")


def remove_leftovers(dest: Path, written: Iterable[Path], earlier: set[str], *, fragment: str,
                     staging: Staging, restart: bool = False) -> list[str]:
    """Remove from ``dest`` the earlier prediction's files (``earlier``) that this one did not
    write again (``written``), and with ``restart`` in PNG mode the OME-Zarr store and its
    state folder; record this prediction's names (:data:`RECORD`). The staged files (written
    under ``staging``'s hidden names), the record and the removals go in place together
    (:meth:`.publish.Staging.publish`). Logs and returns the names removed. Call it
    once the new prediction is written whole."""
    kept = {Path(p).name for p in written}
    stale = [dest / n for n in sorted(earlier - kept) if _is_file(dest / n)]
    record = json.dumps({"fragment": fragment,
                         "files": sorted(kept & set(PREDICTION_FILES))}) + "\n"
    atomic_write_text(staging.path(dest / RECORD), record)
    staging.publish(remove=stale)
    removed = [p.name for p in stale]
    if restart and ZARR_NAME not in kept:  # the state first: a store left alone is refused
        for name in (STATE_NAME, ZARR_NAME):
            path = dest / name
            if _is_file(path):
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


def _is_file(path: Path) -> bool:
    """A file or a link (never a folder: a folder bearing an output's name is not ours)."""
    return path.is_symlink() or path.is_file()
