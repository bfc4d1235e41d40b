"""The band views: ``slices/range`` (the slices as channels), and those that reduce or rearrange
them, ``slices/project`` and ``slices/mosaic`` (see :mod:`.views` for all views, their
parameters and the normalisation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import StatsCache, sample_windows
from scrollsam.data.views import CLIP, REDUCTIONS, _BandView, _int
from scrollsam.errors import InputError


def aligned_band(view: object, fragment: Fragment) -> str | None:
    """``"slices 20..45 (aligned on its sheet)"``: the band ``view`` reads from ``fragment``
    when it moves per fragment (``align: sheet``), for the log; None for any other view."""
    if not isinstance(view, _BandView) or view.align != "sheet":
        return None
    z0, z1 = view.band(fragment)
    return f"slices {z0}..{z1 - 1} (aligned on its sheet)"


class RangeView(_BandView):
    """Slices z0..z1-1 as C = z1 - z0 channels."""

    name = "slices/range"

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        self.channels = self.z1 - self.z0

    def _compose(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                 size: int, *, scale: float = 1.0) -> np.ndarray:
        return self._band_slices(fragment, z0, z1, y0, x0, size, scale)  # [C, S, S]


class ProjectView(_BandView):
    """Reductions over the band (mean / max / min / std of the standardised slices), one channel
    each, standardised again per channel with statistics sampled once per fragment."""

    name = "slices/project"
    PARAMS = {**_BandView.PARAMS, "reductions": ("mean", "max", "std")}

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        red = self._p["reductions"]
        if isinstance(red, str):
            red = tuple(r.strip() for r in red.split(",") if r.strip())
        if not isinstance(red, Sequence) or not red or any(r not in REDUCTIONS for r in red):
            raise InputError(f"reductions: expected a non-empty list of "
                             f"{', '.join(REDUCTIONS)}, got {red!r}")
        self.reductions = tuple(red)
        self.channels = len(self.reductions)
        self._calibration: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _raw(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
             size: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        vol = self._band_slices(fragment, z0, z1, y0, x0, size, scale)  # [n, S, S]
        fns = {"mean": np.mean, "max": np.max, "min": np.min, "std": np.std}
        out = np.stack([fns[r](vol, axis=0) for r in self.reductions])  # [C, S, S]
        return out.astype(np.float32), fragment.mask_window(y0, y0 + size, x0, x0 + size)

    def _calibrate(self, fragment: Fragment) -> tuple[np.ndarray, np.ndarray]:
        key = str(fragment.path.resolve())
        if key not in self._calibration:
            rng = np.random.default_rng(self.stats.seed)
            samples = []
            for y0, x0 in sample_windows(fragment, fragment.mask(), rng=rng, count=8, size=64):
                raw, inside = self._raw(fragment, *self.band(fragment), y0, x0, 64)
                samples.append(raw[:, inside])  # [C, n]
            allv = np.concatenate(samples, axis=1)  # [C, N]
            mean = allv.mean(axis=1).astype(np.float32)[:, None, None]  # [C, 1, 1]
            std = np.maximum(allv.std(axis=1), 1e-3).astype(np.float32)[:, None, None]
            self._calibration[key] = (mean, std)
        return self._calibration[key]

    def prepare(self, fragment: Fragment) -> None:
        super().prepare(fragment)
        self._calibrate(fragment)

    def _compose(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                 size: int, *, scale: float = 1.0) -> np.ndarray:
        mean, std = self._calibrate(fragment)
        raw, inside = self._raw(fragment, z0, z1, y0, x0, size, scale)
        return (np.clip((raw - mean) / std, -CLIP, CLIP) * inside).astype(np.float32)


class MosaicView(_BandView):
    """3 channels, each a grid x grid pixel mosaic of slices fixed to image coordinates."""

    name = "slices/mosaic"
    PARAMS = {**_BandView.PARAMS, "grid": 2}
    channels = 3

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        self.grid = _int("grid", self._p["grid"], 1)

    def _compose(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                 size: int, *, scale: float = 1.0) -> np.ndarray:
        g = self.grid
        picks = np.round(np.linspace(0, z1 - z0 - 1, 3 * g * g)).astype(int)  # [3*g*g]
        vol = self._band_slices(fragment, z0, z1, y0, x0, size, scale)  # [n, S, S]
        ys = (np.arange(y0, y0 + size) % g)[:, None]  # [S, 1] row phase in image coordinates
        xs = (np.arange(x0, x0 + size) % g)[None, :]  # [1, S]
        phase = ys * g + xs  # [S, S] in 0..g*g-1
        out = np.empty((3, size, size), np.float32)
        for c in range(3):
            which = picks[c * g * g:(c + 1) * g * g][phase]  # [S, S] slice index per pixel
            out[c] = np.take_along_axis(vol, which[None], axis=0)[0]
        return out
