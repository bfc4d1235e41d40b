"""`scrollsam predict` as one library call: fragments in, pictures, scores and a submission out.

:func:`predict_to_folder` checks everything it can before the first tile is predicted
(:mod:`.plan`), so a mistake costs seconds, not an hour of inference, and locks ``OUT``
(:mod:`.out_lock`). Then, per fragment, it predicts (prompt-free, or around clicks), writes the
files of :mod:`.outputs` into ``OUT`` (``OUT/<id>/`` when several fragments are given), put in
place together with the removal of an earlier prediction's other files (:mod:`.publish`,
:mod:`.replaced`) and, at the end,
the Kaggle CSV with the fragments' folder names as ids, decoded from the written ``mask.png``
files (or streamed from the OME-Zarr masks, band by band).

Each fragment is predicted band by band (:mod:`.segment`), into PNG files or, for large
fragments, an OME-Zarr map (``fmt``). Under torchrun (``WORLD_SIZE`` set) the process group is
joined here, every rank predicts its own bands, and rank 0 alone writes the shared files.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from scrollsam.data.band_views import aligned_band
from scrollsam.data.fragment import Fragment
from scrollsam.errors import InputError
from scrollsam.infer.out_lock import OutLock
from scrollsam.infer.out_safety import output_folders
from scrollsam.infer.outputs import Rows, write_outputs
from scrollsam.infer.plan import Plan, plan_prediction
from scrollsam.infer.points import predict_clicks
from scrollsam.infer.predict import Predictor
from scrollsam.infer.publish import Staging, remove_stale_temps
from scrollsam.infer.replaced import (
    earlier_files,
    remove_leftovers,
)
from scrollsam.infer.segment import (
    BandJob,
    choose_format,
    predict_png,
    predict_zarr,
    settle,
)
from scrollsam.infer.zarr_out import DEFAULT_CHUNK, ZarrOutput
from scrollsam.io import read_image
from scrollsam.rle import write_submission
from scrollsam.train.distributed import (
    World,
    join_process_group,
    peer_lost,
    shutdown_distributed,
    world_from_env,
)
from scrollsam.train.ranks import agree_before_start

log = logging.getLogger(__name__)

@dataclass
class FragmentResult:
    """What was written for one fragment."""

    fragment: str
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    format: str = "png"

    def mask_rows(self) -> np.ndarray | Iterator[np.ndarray]:
        """The written mask: the whole mask.png, or the OME-Zarr mask in row bands."""
        if self.format == "zarr":
            return ZarrOutput(self.out_dir).mask_rows()
        return read_image(self.files["mask"])


def predict_to_folder(
    run: str | os.PathLike[str] | None,
    fragments: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    threshold: float | str | None = None,
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
    fmt: str = "auto",
    dtype: str = "uint8",
    chunk: int = DEFAULT_CHUNK,
    band_rows: int | None = None,
    restart: bool = False,
    timeout_min: float = 60.0,
) -> list[FragmentResult]:
    """Predict every fragment folder with the run and write its outputs under ``out``
    (``run`` None: ``checkpoint`` is a checkpoint file, used alone).

    threshold: None / ``auto`` = the one saved with the checkpoint, adapted to each fragment
    (:mod:`.threshold`); ``saved`` = that one as it is; a number. submission: Kaggle CSV path; an
    existing file is replaced only with ``force``. points: clicks file (see :mod:`.points`);
    around clicks None / ``auto`` is ``saved`` (a few prompted tiles have nothing to adapt to).
    precision: ``auto`` (the run's ``train.amp``), ``bf16`` or ``fp32``.
    fmt: ``png``, ``zarr`` (OME-Zarr, :mod:`.zarr_out`) or ``auto`` (zarr above
    :data:`.segment.AUTO_ZARR_PIXELS`); dtype: the OME-Zarr values, uint8 or float16.
    chunk: OME-Zarr chunk side; band_rows: rows per band, a multiple of ``chunk`` (default
    :func:`.band_state.default_band_rows`). restart: discard an OME-Zarr prediction with other
    settings in the output folder instead of refusing. timeout_min: under torchrun, how long a
    process waits for the others at an exchange before the job ends with an error.
    """
    if not timeout_min > 0:  # the processes need it to meet: printed by one of them
        raise agree_before_start(InputError(f"--timeout: expected a positive number of "
                                            f"minutes, got {timeout_min}"))
    world = world_from_env()
    joined = world.distributed and not (dist.is_available() and dist.is_initialized())
    world = join_process_group(timeout=datetime.timedelta(minutes=timeout_min))
    try:  # under torchrun a mistake found here is printed once, by the first process finding it
        plan = settle(lambda: plan_prediction(
            run, fragments, out, world=world, checkpoint=checkpoint, threshold=threshold,
            tile=tile, stride=stride, batch_size=batch_size, tta=tta, device=device,
            submission=submission, force=force, points=points, precision=precision, fmt=fmt,
            dtype=dtype, chunk=chunk, band_rows=band_rows, restart=restart, save_tif=save_tif),
            world)
        try:
            return _predict_locked(plan, world=world, submission=submission, force=force,
                                   points=points, save_tif=save_tif, progress=progress,
                                   fmt=fmt, dtype=dtype, chunk=chunk, restart=restart)
        except BaseException:
            if world.main:  # a new OUT that holds only the statistics goes with the failure
                plan.discard_new_folders()
            raise
    except RuntimeError as err:
        lost = peer_lost(err, PREDICT_AGAIN) if world.distributed else None
        if lost is None:
            raise
        raise lost from err  # gloo's traceback in each process still running, before
    finally:
        if joined:
            shutdown_distributed()


def _predict_locked(plan: Plan, *, world: World, **options: Any) -> list[FragmentResult]:
    """:func:`_predict_all` holding the lock of ``--out`` (rank 0 holds it for every process),
    and each fragment's folder's while it is written (:func:`_enter`)."""
    held: list[OutLock] = []  # released below even when the exchange after taking fails
    try:
        settle(lambda: held.append(OutLock.take(plan.out)) if world.main else None, world)
        return _predict_all(plan, world=world, **options)
    finally:
        for lock in held:
            lock.release()


PREDICT_AGAIN = ("run the same command again (an OME-Zarr prediction continues from its "
                 "finished bands)")


def _predict_all(plan: Plan, *, world: World, submission: str | os.PathLike[str] | None,
                 force: bool, points: str | os.PathLike[str] | None, save_tif: bool,
                 progress: bool, fmt: str, dtype: str, chunk: int,
                 restart: bool) -> list[FragmentResult]:
    dests = output_folders(plan.frags, plan.out)
    results = []
    for i, (frag, dest) in enumerate(zip(plan.frags, dests, strict=True)):
        staging = Staging()  # the files go in place together (.publish)
        held: list[OutLock] = []
        try:
            settle(partial(_enter, plan, i, dest, world, held), world)
            results.append(_predict_one(plan, frag, dest, plan.earlier[i], staging,
                                        world=world, points=points, save_tif=save_tif,
                                        progress=progress, fmt=fmt, dtype=dtype, chunk=chunk,
                                        restart=restart))
        except BaseException:
            staging.discard()
            raise
        finally:
            for lock in held:
                lock.release()
            frag.close()

    if submission is not None:
        def write() -> None:
            if world.main:
                count = write_submission(submission, ((r.fragment, r.mask_rows())
                                                      for r in results), overwrite=force,
                                         flag="--submission")
                log.info("wrote %s (%d %s)", submission, count,
                         "fragment" if count == 1 else "fragments")
        settle(write, world)
    return results


def _predict_one(plan: Plan, frag: Fragment, dest: Path, earlier: set[str], staging: Staging,
                 *, world: World, points: str | os.PathLike[str] | None, save_tif: bool,
                 progress: bool, fmt: str, dtype: str, chunk: int,
                 restart: bool) -> FragmentResult:
    """One fragment's prediction into ``dest``, its files put in place together with the
    earlier prediction's removals (``staging``)."""
    predictor, clicks, rows, run = plan.predictor, plan.clicks, plan.band_rows, plan.run
    info: dict[str, Any] = {
        "fragment": frag.id, "run": _run_of(run, predictor.source),
        "checkpoint": None if predictor.source is None else str(predictor.source),
        "tile": predictor.tile, "stride": predictor.stride, "tta": predictor.tta,
        "mode": "prompt-free" if clicks is None else "points",
        "compute_dtype": "bf16" if predictor.amp else "fp32",
    }
    if clicks is not None:  # prompted maps cover a few tiles: the run's threshold as is
        info.update(predictor.rule.describe())
        result = _predict_clicks(predictor, frag, clicks, dest, info=info, points=points,
                                 save_tif=save_tif, staging=staging)
        _tidy(world, dest, result.files, earlier, frag.id, restart, staging)
        return result
    job = BandJob(predictor, frag, dest, rows, world, info, progress and world.main)
    kind = choose_format(fmt, (frag.height, frag.width))
    if kind == "zarr":
        if save_tif and world.main:
            log.warning("%s: --save-tif writes prob.tif in PNG mode only; the OME-Zarr map "
                        "holds float16 probabilities with --dtype float16", frag.id)
        settings = _settings(predictor, frag, chunk=chunk, band_rows=rows, dtype=dtype)
        done = predict_zarr(job, chunk=chunk, dtype=dtype, settings=settings,
                            restart=restart)
    else:
        done = predict_png(job, background=background_rows(frag, predictor),
                           save_tif=save_tif, staging=staging)
    settle(partial(_tidy, world, dest, done.files, earlier, frag.id, restart, staging),
           world)
    if world.main:
        band = aligned_band(predictor.view, frag)
        log.info("%s: wrote %s%s", frag.id, ", ".join(p.name for p in done.files.values()),
                 f"; {band}" if band else "")
    return FragmentResult(frag.id, dest, done.files, done.metrics, done.stats, kind)


def _enter(plan: Plan, i: int, dest: Path, world: World, held: list[OutLock]) -> None:
    """Rank 0, before fragment ``i`` is predicted into ``dest``: lock ``dest`` when it is a
    folder of its own in ``--out`` (into ``held``; a prediction whose ``--out`` it is is then
    refused, and so is this one while that one runs: one lock at a time, so a thousand
    fragments hold two open files, not a thousand), read again what earlier predictions wrote
    there (one may have finished since the checks), and remove what killed ones left."""
    if not world.main:
        return
    if dest != plan.out:
        held.append(OutLock.take(dest))
    plan.earlier[i] = earlier_files(dest)
    if removed := remove_stale_temps(dest):
        log.info("removed %s, left in %s by a prediction that was killed", ", ".join(removed),
                 dest)


def _tidy(world: World, dest: Path, files: dict[str, Path], earlier: set[str], fragment: str,
          restart: bool, staging: Staging) -> None:
    """Rank 0: put this prediction's staged ``files`` in place and remove the earlier
    prediction's other files from ``dest`` (:func:`.replaced.remove_leftovers`)."""
    if world.main:
        remove_leftovers(dest, files.values(), earlier, fragment=fragment, restart=restart,
                         staging=staging)


def _run_of(run: str | os.PathLike[str] | None, source: Path | None) -> str | None:
    """The run folder metrics.json names: ``run`` when the checkpoint file loaded (``source``)
    lies in it, else None (``--checkpoint PATH`` alone, or another run's checkpoint file)."""
    if run is None or source is None or source.resolve().parent != Path(run).resolve():
        return None
    return str(run)


def _predict_clicks(predictor: Predictor, frag: Fragment, clicks: dict[str, Any], dest: Path,
                    *, info: dict[str, Any], points: Any, save_tif: bool,
                    staging: Staging) -> FragmentResult:
    """Prediction around clicks (one process, PNG files)."""
    if not clicks.get(frag.id):
        log.warning("%s: no clicks for it in %s; its outputs are empty", frag.id, points)
    pred, valid = predict_clicks(predictor, frag, clicks.get(frag.id, []))
    written = write_outputs(dest, pred.prob, threshold=pred.threshold, valid=valid,
                            labels=frag.labels(), background=background_rows(frag, predictor),
                            save_tif=save_tif, info=info, staging=staging)
    return FragmentResult(frag.id, dest, written.files, written.metrics, pred.stats)


def _settings(predictor: Predictor, frag: Fragment, **extra: Any) -> dict[str, Any]:
    """What an OME-Zarr prediction's values depend on (stored with it; a resume must match)."""
    src = predictor.source
    ckpt = (None if src is None else
            {"path": str(src.resolve()), "bytes": src.stat().st_size,
             "mtime_ns": src.stat().st_mtime_ns})
    return {"fragment": str(frag.path.resolve()), "shape": [frag.height, frag.width],
            "checkpoint": ckpt, "tile": predictor.tile, "stride": predictor.stride,
            "batch_size": predictor.batch_size, "tta": predictor.tta,
            "compute_dtype": "bf16" if predictor.amp else "fp32",
            "device": predictor.device.type, "threshold": predictor.threshold,
            **({} if predictor.rule.reference is None  # (older stores resume as before)
               else {"threshold_reference": predictor.rule.reference}), **extra}


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
