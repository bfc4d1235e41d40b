"""Band-wise prediction of one fragment, the same for one process and for torchrun's N.

The fragment is cut into bands of ``band_rows`` rows (a multiple of the output chunk height,
:func:`~scrollsam.infer.band_state.default_band_rows`); bands are dealt round-robin to the
processes (:func:`~scrollsam.train.distributed.row_bands`). For each of its bands a process runs
every window of the whole-fragment grid that touches the band, blends them (Hann weights, the
whole grid's weight sums) and writes the band's rows alone (:meth:`Predictor.predict_rows`).
A band's values depend on nothing but the band, so N processes write exactly what one writes,
and there is nothing to merge.

Two outputs (:func:`choose_format`):

- ``zarr``: ``OUT/prob.ome.zarr`` (:mod:`.zarr_out`), written band by band, resumable
  (:mod:`.band_state`), then the pyramid (each process its chunk rows), then, on rank 0, the
  previews, ``metrics.json`` (counts gathered from the band markers) and ``summary.json``.
- ``png``: the float32 map is assembled (in memory for one process; in a scratch ``.npy`` file
  that every rank writes its rows into under torchrun) and rank 0 writes prob.png, mask.png,
  overlay.png and metrics.json as for any small fragment (:mod:`.outputs`).

Under torchrun every step ends with an exchange of statuses (:func:`settle`): an error on any
rank ends every rank with one line naming it, instead of leaving the others waiting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.errors import InputError, ScrollsamError
from scrollsam.infer.band_state import BandScore, BandState
from scrollsam.infer.meter import Meter
from scrollsam.infer.outputs import Rows, Written, write_outputs
from scrollsam.infer.predict import Predictor
from scrollsam.infer.publish import SCRATCH_NAME, Staging
from scrollsam.infer.threshold import candidate_index
from scrollsam.infer.zarr_out import ZarrOutput
from scrollsam.io import atomic_write_text
from scrollsam.metrics import Counts, binarize_prediction, confusion
from scrollsam.train.distributed import (
    World,
    exchange_errors,
    gather_objects,
    mark_echo,
    row_bands,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "png", "zarr")
AUTO_ZARR_PIXELS = 64_000_000  # --format auto: fragments above 64 Mpx get OME-Zarr
T = TypeVar("T")


class RankError(ScrollsamError):
    """Another process of the torchrun job failed; the message names it and its error."""


def choose_format(fmt: str, shape: tuple[int, int]) -> str:
    """``png`` or ``zarr``: as given, or by size for ``auto`` (> AUTO_ZARR_PIXELS: zarr)."""
    if fmt not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "zarr" if shape[0] * shape[1] > AUTO_ZARR_PIXELS else "png"


def settle(step: Callable[[], T], world: World) -> T:
    """Run ``step`` here, then exchange statuses with every process (a collective, so it is
    also a barrier): this process re-raises its own error; the others raise :class:`RankError`
    naming the first failed rank. Alone, it just runs ``step``."""
    error: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as err:  # reported to every rank, then re-raised below
        error = err
    if world.distributed:
        failed = exchange_errors(error, typed=True)
        if error is None and failed:
            rank, what = failed[0]
            raise mark_echo(RankError(f"rank {rank} of {world.size} failed: {what}"), True)
        if error is not None:
            mark_echo(error, failed[0][0] != world.rank)  # the first failed rank reports it
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


@dataclass
class SegmentResult:
    """What one fragment's prediction wrote (rank 0) and measured (this process)."""

    format: str
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class BandJob:
    """One fragment's band-wise prediction: who runs what, where it goes."""

    predictor: Predictor
    frag: Fragment
    dest: Path
    band_rows: int
    world: World
    info: dict[str, Any]
    progress: bool = False

    @property
    def bands(self) -> list[tuple[int, int]]:
        """Every band of the fragment, top to bottom."""
        return row_bands(self.frag.height, band_rows=self.band_rows, world=World())

    @property
    def mine(self) -> list[tuple[int, int]]:
        """This process's bands."""
        return row_bands(self.frag.height, band_rows=self.band_rows, world=self.world)

    def run_bands(self, todo: list[tuple[int, int]],
                  write: Callable[[int, int, np.ndarray], None]) -> dict[str, Any]:
        """Predict the bands ``todo`` in order, hand each to ``write(y0, y1, prob)``; stats."""
        meter = Meter(self.frag, self.progress, bands=todo)
        t0 = time.perf_counter()
        for y0, y1 in todo:
            write(y0, y1, self.predictor.predict_rows(self.frag, y0, y1, meter=meter))
            log.debug("%s: rows %d:%d written", self.frag.id, y0, y1)
        return meter.finish(time.perf_counter() - t0, self.predictor.device)

    def score(self, y0: int, y1: int, prob: np.ndarray) -> tuple[np.ndarray, BandScore | None]:
        """(predicted ink bool [b, W], inside the fragment mask whatever the threshold; the
        band's scores: confusion counts with labels, and the probability histogram inside the
        mask with labels or an adapted threshold; None when neither)."""
        valid = self.frag.mask()[y0:y1] > 0  # (b, W)
        ink, _ = binarize_prediction(prob, threshold=self.predictor.threshold, binary=False)
        ink &= valid
        labels = self.frag.labels()
        if labels is not None:
            return ink, BandScore.of(prob, ink, labels[y0:y1], valid)
        if not self.predictor.rule.adaptive:
            return ink, None
        score = BandScore()
        score.hist.add(prob, None, valid)  # for the fragment's threshold (adapt_mask)
        return ink, score


def predict_zarr(job: BandJob, *, chunk: int, dtype: str, settings: dict[str, Any],
                 restart: bool = False) -> SegmentResult:
    """Predict ``job`` into ``DEST/prob.ome.zarr``, skipping bands a killed run finished."""
    out, state, world, frag = ZarrOutput(job.dest), BandState(job.dest), job.world, job.frag

    adaptive = job.predictor.rule.adaptive

    def start() -> None:  # rank 0: settings checked, store created (or kept to resume)
        if not world.main:
            return
        job.dest.mkdir(parents=True, exist_ok=True)
        resume = state.start(settings, restart=restart)
        if resume and (not out.exists or adaptive and not out.has_rounding):
            # markers of a store that is gone, or of a version that kept no rounding (and
            # no histograms without labels) for the adapted mask: start over
            resume = state.start(settings, restart=True)
        if not resume:
            out.remove()
            out.create(shape=(frag.height, frag.width), chunk=chunk, dtype=dtype, name=frag.id,
                       threshold=job.predictor.threshold, rounding=adaptive)

    settle(start, world)
    todo = [b for b in job.mine if not state.done(*b)]
    skipped = len(job.mine) - len(todo)
    if skipped:
        log.info("%s: %d of this process's %d bands already written; skipped", frag.id,
                 skipped, len(job.mine))

    def write(y0: int, y1: int, prob: np.ndarray) -> None:
        ink, score = job.score(y0, y1, prob)
        out.write_band(y0, prob, ink)
        state.mark_done(y0, y1, score)  # after the chunks: the band is done

    stats = settle(lambda: job.run_bands(todo, write), world)
    stats.update(bands=len(job.mine), bands_skipped=skipped)
    adapted: dict[str, Any] = {}  # rank 0's: the fragment's threshold and the mask's counts

    def adapt() -> None:  # rank 0: the whole fragment's threshold, then the mask rewritten
        if world.main:
            adapted.update(adapt_mask(job, out, state))

    if adaptive:
        settle(adapt, world)
    for level in range(1, out.levels()):
        settle(lambda lv=level: out.build_level(lv, world), world)
    result = SegmentResult("zarr", stats=stats)
    ranks = gather_objects(stats)
    stats.update(bands=sum(r["bands"] for r in ranks),  # the job's, for its output line
                 bands_skipped=sum(r["bands_skipped"] for r in ranks))

    def finish() -> None:  # rank 0: previews, metrics, summary
        if not world.main:
            return
        result.files["zarr"] = out.path
        result.files.update(out.write_previews(job.dest))
        if frag.labels() is not None:
            total = state.total(job.bands)
            if adapted.get("counts") is not None:  # the mask was rewritten
                total = BandScore(adapted["counts"], total.hist)
            threshold = adapted.get("threshold", job.predictor.threshold)
            result.metrics = total.metrics(threshold, {**job.info, **job.predictor.rule.describe()})
            path = job.dest / "metrics.json"
            atomic_write_text(path, json.dumps(result.metrics, indent=2) + "\n")
            result.files["metrics"] = path
        summary = {**job.info, **job.predictor.rule.describe(),
                   "threshold": adapted.get("threshold", job.predictor.threshold),
                   "format": "zarr", "shape": [frag.height, frag.width],
                   "levels": out.levels(), "chunk": chunk, "dtype": dtype,
                   "band_rows": job.band_rows, "processes": world.size, "ranks": ranks,
                   "files": {k: p.name for k, p in result.files.items()}}
        path = job.dest / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        result.files["summary"] = path

    settle(finish, world)
    return result


def adapt_mask(job: BandJob, out: ZarrOutput, state: BandState) -> dict[str, Any]:
    """The adaptive threshold (:mod:`.threshold`) of a fragment streamed into ``out``, from the
    histograms of its exact probabilities in the band markers (the threshold PNG mode
    computes); when it is not the run's threshold, which the bands' mask was written at, the
    level-0 mask is rewritten at it from the exact ranks (:meth:`ZarrOutput.ranks`): the mask
    PNG mode writes. Returns ``threshold`` and ``counts`` (the rewritten mask's confusion
    counts; None without labels or without a rewrite). A killed rewrite is redone whole by the
    next run."""
    frag = job.frag
    threshold = job.predictor.rule.for_histogram(state.total(job.bands).hist)
    if threshold == job.predictor.threshold:
        log.info("%s: threshold %.2f (the run's, also adapted to the fragment)", frag.id,
                 threshold)
        return {"threshold": threshold, "counts": None}
    k = candidate_index(threshold)  # an adapted threshold is a candidate
    mask, labels = frag.mask(), frag.labels()
    counts = None if labels is None else Counts()
    for y0, y1 in job.bands:
        valid = mask[y0:y1] > 0  # (b, W)
        ink = (out.ranks(y0, y1) >= k) & valid  # p >= threshold inside the fragment
        out.mask(0)[y0:y1] = ink.astype(np.uint8)
        if labels is not None:
            counts = counts + confusion(ink, labels[y0:y1], valid)
    attrs = dict(out.root.attrs["scrollsam"])
    out.root.attrs["scrollsam"] = {**attrs, "threshold": float(threshold)}
    log.info("%s: threshold %.2f (the run's %.2f, adapted to the fragment)", frag.id,
             threshold, job.predictor.threshold)
    return {"threshold": threshold, "counts": counts}


def predict_png(job: BandJob, *, background: Rows | None, save_tif: bool,
                staging: Staging | None = None) -> SegmentResult:
    """Predict ``job`` band by band into one float32 map, then (rank 0) the PNG outputs (with
    ``staging``: under its hidden names, for the caller to publish)."""
    world, frag = job.world, job.frag
    shape = (frag.height, frag.width)
    scratch = job.dest / SCRATCH_NAME
    if not world.distributed:
        prob = np.zeros(shape, np.float32)  # (H, W)
    else:
        def create() -> None:
            if world.main:
                job.dest.mkdir(parents=True, exist_ok=True)
                np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                          shape=shape).flush()
        settle(create, world)
        prob = np.lib.format.open_memmap(scratch, mode="r+")

    def write(y0: int, y1: int, rows: np.ndarray) -> None:
        prob[y0:y1] = rows

    stats = settle(lambda: job.run_bands(job.mine, write), world)
    stats.update(bands=len(job.mine), bands_skipped=0)
    if isinstance(prob, np.memmap):
        prob.flush()
    result = SegmentResult("png", stats=stats)
    ranks = gather_objects(stats)

    def finish() -> None:
        if not world.main:
            return
        info = {**job.info, **({"processes": world.size, "ranks": ranks}
                               if world.distributed else {})}
        threshold = job.predictor.threshold_for(prob, frag)
        info.update(job.predictor.rule.describe())
        if job.predictor.rule.adaptive:
            log.info("%s: threshold %.2f (the run's %.2f, adapted to the fragment)", frag.id,
                     threshold, job.predictor.threshold)
        written: Written = write_outputs(job.dest, prob, threshold=threshold,
                                         valid=frag.mask(), labels=frag.labels(),
                                         background=background, save_tif=save_tif, info=info,
                                         staging=staging)
        result.files, result.metrics = written.files, written.metrics

    try:
        settle(finish, world)
    finally:
        if world.main and scratch.exists():
            scratch.unlink()  # its pages stay mapped until `prob` goes
    return result
