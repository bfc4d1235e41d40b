"""What a band-wise prediction keeps on disk so a killed run resumes: settings and band markers.

``OUT/.predict/`` (beside ``prob.ome.zarr``) holds

- ``settings.json``: everything the values depend on (fragment, checkpoint file, tile, stride,
  batch size, TTA, precision, device type, threshold, chunk and band size, stored type). A rerun
  into the same folder with other settings is refused (or, with ``restart``, starts over):
  bands of two settings are never mixed.
- ``band-<y0>-<y1>.npz``: written (atomically) after the band's chunks, so a band is done
  exactly when its marker exists. Chunk presence cannot tell: Zarr does not store chunks that
  are all 0, and a killed write may leave some chunks of a band and not others. The marker
  carries the band's confusion counts and probability histogram when the fragment has labels,
  so the metrics of a resumed run equal those of an uninterrupted one without rereading.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scrollsam.errors import InputError
from scrollsam.evaluate import Evaluation
from scrollsam.io import atomic_write_bytes, atomic_write_text
from scrollsam.metrics import Counts, ProbabilityHistogram, confusion, search_threshold

STATE_NAME = ".predict"


def default_band_rows(tile: int, chunk: int, *, tiles: int = 4) -> int:
    """The smallest multiple of ``chunk`` that is at least ``tiles`` windows tall: each band
    recomputes about one row of windows shared with the band above (stride tile / 2), so
    4 tiles cost at most 1 / 8 more windows and 16 tiles 1 / 32."""
    return chunk * max(1, -(-tiles * tile // chunk))


def check_band_rows(band_rows: int, chunk: int) -> None:
    if chunk < 16:
        raise InputError(f"--chunk: expected an integer >= 16, got {chunk}")
    if band_rows < chunk or band_rows % chunk:
        raise InputError(f"--band-rows: expected a positive multiple of the chunk height "
                         f"(--chunk {chunk}), got {band_rows}")


@dataclass
class BandScore:
    """Confusion counts and probability histogram of one band (inside the fragment mask)."""

    counts: Counts = field(default_factory=Counts)
    hist: ProbabilityHistogram = field(default_factory=ProbabilityHistogram)

    @classmethod
    def of(cls, prob: np.ndarray, ink: np.ndarray, labels: np.ndarray,
           valid: np.ndarray | None) -> BandScore:
        """Scores of probabilities float32 [b, W], predicted ink bool [b, W], truth and valid
        (fragment mask, None = everywhere) bool [b, W]."""
        score = cls(confusion(ink, labels, valid))
        score.hist.add(prob, labels, valid)
        return score

    def __add__(self, other: BandScore) -> BandScore:
        return BandScore(self.counts + other.counts, self.hist + other.hist)

    def metrics(self, threshold: float, info: dict[str, Any]) -> dict[str, Any]:
        """metrics.json: the scores at ``threshold``, the best threshold on these pixels and
        its F0.5, then ``info`` (PNG and OME-Zarr outputs alike)."""
        best = search_threshold(self.hist)
        return {**Evaluation(self.counts, float(threshold)).to_dict(),
                "best_threshold_here": best.threshold, "best_f0.5_here": best.score, **info}

    def to_bytes(self) -> bytes:
        levels = np.flatnonzero(self.hist.ink | self.hist.background)  # sparse: few levels used
        buf = io.BytesIO()
        np.savez(buf, counts=np.array([self.counts.tp, self.counts.fp, self.counts.fn,
                                       self.counts.tn], np.int64),
                 levels=levels, ink=self.hist.ink[levels], background=self.hist.background[levels])
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> BandScore:
        with np.load(path) as z:
            score = cls(Counts(*(int(v) for v in z["counts"])))
            score.hist.ink[z["levels"]] = z["ink"]
            score.hist.background[z["levels"]] = z["background"]
        return score


class BandState:
    """``OUT/.predict/``: the settings of the prediction in ``OUT`` and its finished bands."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / STATE_NAME

    def settings(self) -> dict[str, Any] | None:
        f = self.path / "settings.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def start(self, settings: dict[str, Any], *, restart: bool, out_flag: str = "--out") -> bool:
        """Make ``settings`` this folder's (one process). True when the folder holds a
        prediction with these settings to resume; InputError when it holds one with other
        settings, unless ``restart`` (then it is discarded: the caller removes the output)."""
        old = self.settings()
        if old is not None and old != settings and not restart:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}"
                             for k in sorted(set(old) | set(settings))
                             if old.get(k) != settings.get(k))
            raise InputError(f"{out_flag}: {self.path.parent} holds a prediction made with other "
                             f"settings ({diff}); pass --restart to discard it, or choose "
                             f"another {out_flag}")
        resume = old == settings and not restart
        if not resume:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            atomic_write_text(self.path / "settings.json", json.dumps(settings, indent=1) + "\n")
        return resume

    def marker(self, y0: int, y1: int) -> Path:
        return self.path / f"band-{y0:08d}-{y1:08d}.npz"

    def done(self, y0: int, y1: int) -> bool:
        return self.marker(y0, y1).is_file()

    def mark_done(self, y0: int, y1: int, score: BandScore | None) -> None:
        atomic_write_bytes(self.marker(y0, y1), (score or BandScore()).to_bytes())

    def total(self, bands: list[tuple[int, int]]) -> BandScore:
        """The scores of ``bands`` added up (every band must be done)."""
        total = BandScore()
        for y0, y1 in bands:
            total = total + BandScore.from_file(self.marker(y0, y1))
        return total
