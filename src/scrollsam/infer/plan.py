"""Everything `scrollsam predict` checks and opens before the first tile (:func:`plan_prediction`):
the options, the fragments, the output locations (links, files on the way, write permission,
inputs, earlier predictions: :mod:`.out_safety`, :mod:`.replaced`), the submission file, the run
and its checkpoint, each fragment against the run's input view, the clicks file. A mistake
costs seconds, not an hour of inference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scrollsam.data.fragment import Fragment, check_distinct_ids
from scrollsam.device import resolve_device
from scrollsam.errors import InputError
from scrollsam.infer.band_state import check_band_rows, default_band_rows
from scrollsam.infer.out_safety import check_clear_of_inputs, check_writable, output_folders
from scrollsam.infer.points import load_clicks
from scrollsam.infer.predict import MAX_TILE, MIN_TILE, Predictor
from scrollsam.infer.replaced import check_replaceable, earlier_files, will_write
from scrollsam.infer.segment import FORMATS, choose_format
from scrollsam.infer.threshold import threshold_choice
from scrollsam.infer.zarr_out import VALUE_TYPES
from scrollsam.out_path import check_out_folder, missing_folders, remove_made
from scrollsam.precision import PRECISIONS
from scrollsam.rle import is_submission_id
from scrollsam.train.distributed import World, process_device

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What :func:`plan_prediction` checked and opened: the run, the fragments, the output
    folder, the model, the clicks, the rows per band."""

    run: str | os.PathLike[str] | None
    frags: list[Fragment]
    out: Path
    predictor: Predictor
    clicks: dict[str, Any] | None
    band_rows: int
    earlier: list[set[str]]  # per fragment: :func:`.replaced.earlier_files` of its folder
    # OUT/stats and the folders above it that did not exist before the checks (innermost
    # first): the statistics go there when the run folder is read-only or absent
    new_folders: list[Path]

    def discard_new_folders(self) -> None:
        """After a failed prediction: :func:`discard_new_folders` (rank 0)."""
        discard_new_folders(self.new_folders, self.predictor.view.stats.written)


def discard_new_folders(new_folders: list[Path], cached: list[Path]) -> None:
    """Remove the statistics files a failed prediction cached (``cached``: the stats cache's
    files) in a ``OUT/stats`` it made (``new_folders``, innermost first), then the new folders
    while they are empty (a new OUT keeps what a finished fragment wrote). Call it in the
    process that writes (rank 0)."""
    if not new_folders:
        return
    stats = new_folders[0].resolve()
    for path in cached:
        if path.parent == stats:  # the cache's own paths are resolved
            path.unlink(missing_ok=True)
    remove_made(new_folders)


def plan_prediction(run: str | os.PathLike[str] | None,
                    fragments: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                    world: World, checkpoint: str, threshold: float | str | None,
                    tile: int | None, stride: int | None, batch_size: int | None, tta: bool,
                    device: str, submission: str | os.PathLike[str] | None, force: bool,
                    points: str | os.PathLike[str] | None, precision: str, fmt: str,
                    dtype: str, chunk: int, band_rows: int | None, restart: bool,
                    save_tif: bool) -> Plan:
    """Every check before the first tile: the options, the fragments, the output locations
    (and an OME-Zarr prediction in one that gets PNG files), the run and its checkpoint, each
    fragment against the run's input view, the clicks file."""
    if not fragments:
        raise InputError("--fragment: expected at least one fragment folder, got none")
    threshold = threshold_choice(threshold)
    for flag, value, least in (("--tile", tile, MIN_TILE), ("--stride", stride, 1),
                               ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag}: expected an integer >= {least} (leave it out for the "
                             f"default), got {value}")
    if tile is not None and tile > MAX_TILE:
        raise InputError(f"--tile: expected an integer <= {MAX_TILE} (a window is read whole "
                         f"and resized to the model input), got {tile}")
    for flag, value, allowed in (("--format", fmt, FORMATS), ("--dtype", dtype, VALUE_TYPES),
                                 ("--precision", precision, PRECISIONS)):
        if value not in allowed:
            raise InputError(f"{flag}: expected one of {', '.join(allowed)}, got {value!r}")
    check_band_rows(chunk if band_rows is None else band_rows, chunk)
    if points is not None and (fmt == "zarr" or world.distributed):
        raise InputError("--points: prediction around clicks writes PNG files in one process "
                         "(not with --format zarr, not under torchrun)")
    frags = [Fragment(p) for p in fragments]
    check_distinct_ids(frags, [str(p) for p in fragments], setting="--fragment",
                       why="they name the output folders and submission ids")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: expected a folder, got a file ({out})")
    dests = output_folders(frags, out)
    for dest in dests:  # links to nowhere, loops, a file on the way
        check_out_folder(dest, name="--out")
    check_clear_of_inputs(frags, out, None if submission is None else Path(submission))
    earlier = []  # per fragment: the files an earlier prediction wrote into its folder
    for frag, dest in zip(frags, dests, strict=True):
        kind = "png" if points is not None else choose_format(fmt, (frag.height, frag.width))
        earlier.append(earlier_files(dest))
        check_replaceable(dest, will_write(kind, labels=frag.labels_path is not None,
                                           save_tif=save_tif), earlier[-1], restart=restart)
    check_writable(out, flag="--out")
    if submission is not None:
        _check_submission(Path(submission), force=force)
        _check_submission_ids(frags)
        if world.main:  # the one that writes it
            check_writable(Path(submission), flag="--submission")
    dev = process_device(resolve_device(device, setting="--device"), world)
    if points is not None and threshold in (None, "auto"):
        threshold = "saved"  # a few prompted tiles are no fragment's probabilities to adapt to
    predictor = Predictor.from_run(run, checkpoint=checkpoint, device=dev,
                                   threshold=threshold, tile=tile, stride=stride,
                                   batch_size=batch_size, tta=tta, stats_dir=out,
                                   precision=precision)
    new_folders = missing_folders(out / "stats")  # the statistics may go there (read-only run)
    try:
        for frag in frags:
            predictor.open(frag)  # an ir run on a fragment without ir.png fails here, not later
            _warn_if_larger(frag, predictor.tile)
        clicks = load_clicks(points, [f.id for f in frags]) if points is not None else None
    except BaseException:
        if world.main:
            discard_new_folders(new_folders, predictor.view.stats.written)
        raise
    if clicks is not None and tta:
        log.warning("--tta applies to prompt-free prediction; ignored around clicks")
    rows = default_band_rows(predictor.tile, chunk) if band_rows is None else band_rows
    return Plan(run, frags, out, predictor, clicks, rows, earlier, new_folders)


def _warn_if_larger(frag: Fragment, tile: int) -> None:
    """Warn when a window is larger than the fragment (an empty mask fails in ``open``). The
    grid then has one window along that axis, at 0, zero-padded past the fragment's border; the
    advice names only tiles ``predict`` accepts (at least MIN_TILE)."""
    side = min(frag.height, frag.width)
    if tile <= side:
        return
    if side >= MIN_TILE:
        advice = f"; use --tile {side} or less"
    else:
        advice = (f"; the fragment is smaller than the smallest window (--tile {MIN_TILE})"
                  + (f", and --tile {MIN_TILE} pads it least" if tile > MIN_TILE else ""))
    log.warning("%s: the window (--tile, default the model input size) of %d px is larger than "
                "the fragment (%d x %d px): most of each window is zero padding the model never "
                "saw, so expect poor results%s", frag.id, tile, frag.height, frag.width, advice)


def _check_submission(path: Path, *, force: bool) -> None:
    if os.path.lexists(path) and not force:  # a link to nothing too (write_submission's rule)
        link = " (a link)" if path.is_symlink() else ""
        raise InputError(f"--submission: {path} exists{link}; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise InputError(f"--submission: expected a CSV file path, got a folder ({path})")
    if not path.parent.is_dir():
        raise InputError(f"--submission: folder {path.parent} does not exist")


def _check_submission_ids(frags: Sequence[Fragment]) -> None:
    """The fragments' folder names are the submission's Ids: refuse one the CSV cannot hold
    before any prediction work."""
    for frag in frags:
        if not is_submission_id(frag.id):
            raise InputError(f"--submission: expected fragment folder names usable as Ids "
                             f"(no commas, quotes or spaces), got {frag.id!r} ({frag.path})")
