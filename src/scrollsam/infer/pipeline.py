"""`scrollsam predict` as one library call: fragments in, pictures, scores and a submission out.

:func:`predict_to_folder` checks everything it can before the first tile is predicted (the run
folder, the checkpoint, every fragment against the run's input view, the clicks file, an
existing submission file), so a mistake costs seconds, not an hour of inference. Then, per
fragment, it predicts (prompt-free, or around clicks), writes the files of :mod:`.outputs` into
``OUT`` (``OUT/<id>/`` when several fragments are given) and, at the end, the Kaggle CSV with
the fragments' folder names as ids, decoded from the written ``mask.png`` files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.errors import InputError
from scrollsam.infer.outputs import Rows, write_outputs
from scrollsam.infer.points import load_clicks, predict_clicks
from scrollsam.infer.predict import Predictor
from scrollsam.io import read_image
from scrollsam.rle import write_submission

log = logging.getLogger(__name__)


@dataclass
class FragmentResult:
    """What was written for one fragment."""

    fragment: str
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def predict_to_folder(
    run: str | os.PathLike[str] | None,
    fragments: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    threshold: float | None = None,
    tile: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    tta: bool = False,
    device: str = "auto",
    submission: str | os.PathLike[str] | None = None,
    force: bool = False,
    points: str | os.PathLike[str] | None = None,
    save_tif: bool = False,
    progress: bool = False,
    precision: str = "auto",
) -> list[FragmentResult]:
    """Predict every fragment folder with the run and write its outputs under ``out``
    (``run`` None: ``checkpoint`` is a checkpoint file, used alone).

    threshold: None = the one saved with the checkpoint. submission: Kaggle CSV path; an
    existing file is replaced only with ``force``. points: clicks file (see :mod:`.points`).
    precision: ``auto`` (the run's ``train.amp``), ``bf16`` or ``fp32``.
    """
    if not fragments:
        raise InputError("--fragment: expected at least one fragment folder, got none")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold: expected auto or a number in [0, 1], got {threshold}")
    for flag, value, least in (("--tile", tile, 16), ("--stride", stride, 1),
                               ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag}: expected an integer >= {least} (leave it out for the "
                             f"default), got {value}")
    if submission is not None:
        _check_submission(Path(submission), force=force)
    frags = [Fragment(p) for p in fragments]
    ids = [f.id for f in frags]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InputError(f"--fragment: expected distinct folder names (they are the output "
                         f"folders and submission ids), got {', '.join(twice)} twice")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: expected a folder, got a file ({out})")
    predictor = Predictor.from_run(run, checkpoint=checkpoint, device=device,
                                   threshold=threshold, tile=tile, stride=stride,
                                   batch_size=batch_size, tta=tta, stats_dir=out,
                                   precision=precision)
    for frag in frags:
        predictor.open(frag)  # an ir run on a fragment without ir.png fails here, not later
        _warn_if_larger(frag, predictor.tile)
    clicks = load_clicks(points, ids) if points is not None else None
    if clicks is not None and tta:
        log.warning("--tta applies to prompt-free prediction; ignored around clicks")

    results = []
    for frag in frags:
        dest = out if len(frags) == 1 else out / frag.id
        info: dict[str, Any] = {
            "fragment": frag.id, "run": str(run), "checkpoint": checkpoint,
            "tile": predictor.tile, "stride": predictor.stride, "tta": predictor.tta,
            "mode": "prompt-free" if clicks is None else "points",
            "compute_dtype": "bf16" if predictor.amp else "fp32",
        }
        if clicks is None:
            pred = predictor.predict_fragment(frag, progress=progress)
            valid = frag.mask()
        else:
            if not clicks.get(frag.id):
                log.warning("%s: no clicks for it in %s; its outputs are empty", frag.id, points)
            pred, valid = predict_clicks(predictor, frag, clicks.get(frag.id, []))
        written = write_outputs(dest, pred.prob, threshold=pred.threshold, valid=valid,
                                labels=frag.labels(), background=background_rows(frag,
                                predictor), save_tif=save_tif, info=info)
        results.append(FragmentResult(frag.id, dest, written.files, written.metrics, pred.stats))
        log.info("%s: wrote %s", frag.id, ", ".join(p.name for p in written.files.values()))
        del pred
        frag.close()

    if submission is not None:
        rows = ((r.fragment, read_image(r.files["mask"])) for r in results)
        count = write_submission(submission, rows, overwrite=force)
        log.info("wrote %s (%d fragments)", submission, count)
    return results


def _warn_if_larger(frag: Fragment, tile: int) -> None:
    """Warn when a window is larger than the fragment (an empty mask fails in ``open``)."""
    if tile > min(frag.height, frag.width):
        log.warning("%s: the window (--tile, default the model input size) of %d px is larger "
                    "than the fragment (%d x %d px): most of each window is padding the model "
                    "never saw, so expect poor results; use --tile %d or less",
                    frag.id, tile, frag.height, frag.width, min(frag.height, frag.width))


def _check_submission(path: Path, *, force: bool) -> None:
    if path.exists() and not force:
        raise InputError(f"--submission: {path} exists; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise InputError(f"--submission: expected a CSV file path, got a folder ({path})")
    if not path.parent.is_dir():
        raise InputError(f"--submission: folder {path.parent} does not exist")


def background_rows(frag: Fragment, predictor: Predictor) -> Rows:
    """Rows of the overlay's picture: ir.png when present, else the slice in the middle of the
    view's depth band (the middle of the volume for views without one)."""
    ir = frag.ir()
    if ir is not None:
        return lambda y0, y1: ir[y0:y1]
    view = predictor.view
    z0, z1 = getattr(view, "z0", 0), getattr(view, "z1", frag.depth)
    z = int(np.clip((z0 + z1 - 1) // 2, 0, frag.depth - 1))
    return lambda y0, y1: frag.read(z, z + 1, y0, y1, 0, frag.width)[0]
