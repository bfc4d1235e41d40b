"""Per-fragment pixel statistics: normalisation statistics and per-slice ink contrast.

Statistics are computed inside ``mask.png`` on a bounded random sample: a fixed number of square
windows centred on random mask pixels (or ink pixels), whatever the fragment's size, so they take
the same time on a 256 x 256 test fragment and on an 18 GB real one. Randomness comes only from
the generator passed in.

:class:`StatsCache` keeps them in memory and, when given a folder (the training run dir), as JSON
files under ``<cache_dir>/stats/`` keyed by the fragment's path, size, dtype and file times. It
never writes into a fragment folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scrollsam.data.chance import unrelated_shifts
from scrollsam.data.fragment import Fragment
from scrollsam.errors import FragmentError, InputError
from scrollsam.fs_errors import bounded_name
from scrollsam.io import within

log = logging.getLogger(__name__)

SAMPLE_WINDOWS = 32  # windows per statistic
SAMPLE_SIZE = 64  # window side, pixels: at most 32 * 64 * 64 = 131072 pixels per slice
MAD_TO_STD = 1.4826  # MAD * this = std for normally distributed values
# bump when the way statistics are computed changes (invalidates caches): 3 counts each sampled
# pixel once and reads a 16-bit ir.png at 16 bits. Every process of a run then computes the same
# numbers (torchrun's other ranks never read the cache), and a run from before a change gets its
# statistics recomputed the new way, in the units its inputs now come in
_VERSION = 3


@dataclass(frozen=True)
class FragmentStats:
    """Normalisation statistics of one fragment, in raw pixel units (uint8 or uint16 levels).

    ``slice_mean`` / ``slice_std``: [depth], mean and std of each slice inside the mask.
    ``slice_median`` / ``slice_mad``: [depth], median and MAD * 1.4826 (a std that outliers,
    cracks, air pockets and bright inclusions, barely move) of each slice inside the mask.
    ``ir_mean`` / ``ir_std``: of ir.png inside the mask, None without ir.png.
    """

    fragment: str
    dtype: str
    slice_mean: tuple[float, ...]
    slice_std: tuple[float, ...]
    slice_median: tuple[float, ...]
    slice_mad: tuple[float, ...]
    ir_mean: float | None
    ir_std: float | None
    pixels: int  # sampled pixels per slice

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists, floats, str)."""
        d = asdict(self)
        for key in ("slice_mean", "slice_std", "slice_median", "slice_mad"):
            d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FragmentStats:
        return cls(
            fragment=str(d["fragment"]), dtype=str(d["dtype"]),
            slice_mean=tuple(float(v) for v in d["slice_mean"]),
            slice_std=tuple(float(v) for v in d["slice_std"]),
            slice_median=tuple(float(v) for v in d["slice_median"]),
            slice_mad=tuple(float(v) for v in d["slice_mad"]),
            ir_mean=None if d["ir_mean"] is None else float(d["ir_mean"]),
            ir_std=None if d["ir_std"] is None else float(d["ir_std"]),
            pixels=int(d["pixels"]),
        )


@dataclass(frozen=True)
class SliceContrast:
    """Per-slice ink-versus-background statistics inside the mask, lists of length depth.

    ``contrast[z]`` = (ink mean - background mean) / pooled std: a standardised difference
    (Cohen's d); slices whose |contrast| stands out carry the ink signal. ``chance`` is what
    the same pixels give with the labels moved just past their own pattern's reach (the median,
    over :func:`.chance.unrelated_shifts`, of each shift's largest |contrast| over the slices):
    texture, drift and sampling alone reach it, so a peak near it shows no ink signal.
    """

    ink_mean: tuple[float, ...]
    background_mean: tuple[float, ...]
    contrast: tuple[float, ...]
    ink_pixels: int
    background_pixels: int
    chance: float


def sample_windows(
    fragment: Fragment, where: np.ndarray, *, rng: np.random.Generator,
    count: int = SAMPLE_WINDOWS, size: int = SAMPLE_SIZE,
) -> list[tuple[int, int]]:
    """Top-left corners (y0, x0) of up to ``count`` windows of ``size`` centred on random True
    pixels of ``where`` (bool [H, W]), kept inside the image where it is large enough. Windows
    may overlap: :class:`_Fresh` keeps each pixel to one of them."""
    centres = _random_pixels(where, count, rng)
    h, w = where.shape
    out = []
    for cy, cx in centres:
        y0 = int(np.clip(cy - size // 2, 0, max(0, h - size)))
        x0 = int(np.clip(cx - size // 2, 0, max(0, w - size)))
        out.append((y0, x0))
    return out


class _Fresh:
    """The pixels of sampled windows not sampled before, so that each pixel counts once in a
    statistic however the windows overlap (pixels in the middle of a small fragment would
    otherwise weigh several times, and the sample's size be overstated)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.seen = np.zeros(shape, dtype=bool)  # [H, W]

    def take(self, inside: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """``inside`` (bool [S, S], the window at (y0, x0), y0, x0 >= 0; it may reach past the
        image) less the pixels taken before; they are taken now."""
        s = inside.shape[0]
        seen = self.seen[y0:y0 + s, x0:x0 + s]  # clipped at the image's far edges
        out = inside.copy()
        out[:seen.shape[0], :seen.shape[1]] &= ~seen
        seen[...] = True
        return out


def compute_stats(
    fragment: Fragment, *, rng: np.random.Generator,
    windows: int = SAMPLE_WINDOWS, size: int = SAMPLE_SIZE,
) -> FragmentStats:
    """Mean / std and median / MAD of every slice (and mean / std of ir.png) inside the mask,
    from a bounded sample."""
    mask = fragment.mask()
    if not mask.any():
        raise FragmentError(f"mask is empty: no pixel inside the fragment ({fragment.mask_path})")
    picks = sample_windows(fragment, mask, rng=rng, count=windows, size=size)
    values, ir_values = [], []
    fresh = _Fresh(mask.shape)
    for y0, x0 in picks:
        inside = fresh.take(fragment.mask_window(y0, y0 + size, x0, x0 + size), y0, x0)
        vol = fragment.read(0, fragment.depth, y0, y0 + size, x0, x0 + size)  # [D, S, S]
        values.append(vol[:, inside])  # [D, n]
        ir = fragment.ir_window(y0, y0 + size, x0, x0 + size)
        if ir is not None:
            ir_values.append(ir[inside])
    sample = np.concatenate(values, axis=1)  # [D, N]
    mean, std, median, mad = [], [], [], []
    for row in sample:
        row = row.astype(np.float64)
        mean.append(float(row.mean()))
        std.append(float(row.std()))
        median.append(float(np.median(row)))
        mad.append(float(MAD_TO_STD * np.median(np.abs(row - median[-1]))))
    ir_mean = ir_std = None
    if ir_values:
        ir_all = np.concatenate(ir_values).astype(np.float64)
        ir_mean, ir_std = float(ir_all.mean()), float(ir_all.std())
    return FragmentStats(
        fragment=fragment.id, dtype=fragment.dtype.name, slice_mean=tuple(mean),
        slice_std=tuple(std), slice_median=tuple(median), slice_mad=tuple(mad), ir_mean=ir_mean,
        ir_std=ir_std, pixels=int(sample.shape[1]),
    )


def slice_contrast(
    fragment: Fragment, *, rng: np.random.Generator,
    windows: int = SAMPLE_WINDOWS, size: int = SAMPLE_SIZE,
) -> SliceContrast | None:
    """Ink-versus-background statistics of every slice; None without labels or without ink.

    Half the windows are centred on ink pixels, half on random mask pixels, so sparse ink is
    still sampled.
    """
    labels = fragment.labels()
    if labels is None:
        return None
    mask = fragment.mask()
    ink_map = labels & mask
    if not ink_map.any():
        return None
    picks = sample_windows(fragment, ink_map, rng=rng, count=(windows + 1) // 2, size=size)
    picks += sample_windows(fragment, mask, rng=rng, count=windows // 2, size=size)
    h, w = mask.shape
    shifts = unrelated_shifts(labels, mask)
    values, truth, moved = [], [], [[] for _ in shifts]
    fresh = _Fresh(mask.shape)
    for y0, x0 in picks:
        inside = fresh.take(fragment.mask_window(y0, y0 + size, x0, x0 + size), y0, x0)
        ink = fragment.labels_window(y0, y0 + size, x0, x0 + size)
        vol = fragment.read(0, fragment.depth, y0, y0 + size, x0, x0 + size)  # [D, S, S]
        values.append(vol[:, inside])  # [D, n]
        truth.append(ink[inside])  # [n]
        rows, cols = np.arange(y0, y0 + size), np.arange(x0, x0 + size)
        for out, (dy, dx) in zip(moved, shifts, strict=True):
            out.append(labels[np.ix_((rows + dy) % h, (cols + dx) % w)][inside])
    sample = np.concatenate(values, axis=1).astype(np.float64)  # [D, N]
    ink = np.concatenate(truth)  # [N]
    if ink.all():
        return None
    ink_mean, bg_mean, contrast = _contrast(sample, ink)
    chances = [np.abs(_contrast(sample, np.concatenate(m))[2]).max() for m in moved]
    return SliceContrast(
        ink_mean=tuple(ink_mean.tolist()), background_mean=tuple(bg_mean.tolist()),
        contrast=tuple(contrast.tolist()), ink_pixels=int(ink.sum()),
        background_pixels=int((~ink).sum()), chance=float(np.median(chances)),
    )


def _contrast(sample: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ink mean, background mean and their difference in pooled std, per slice ([D] each), of
    ``sample`` (float64 [D, N]) split by ``ink`` (bool [N]); 0 where either side is empty."""
    if ink.all() or not ink.any():
        zero = np.zeros(sample.shape[0])
        return zero, zero, zero
    a, b = sample[:, ink], sample[:, ~ink]
    ink_mean, bg_mean = a.mean(axis=1), b.mean(axis=1)  # [D]
    pooled = np.sqrt((a.var(axis=1) + b.var(axis=1)) / 2)  # [D]
    return ink_mean, bg_mean, (ink_mean - bg_mean) / np.maximum(pooled, 1e-9)


class StatsCache:
    """Normalisation statistics per fragment: memory, then ``<cache_dir>/stats/*.json``, then
    computed (with ``np.random.default_rng(seed)``, so every process computes the same numbers).

    ``cache_dir`` is the caller's folder (the training run dir) or None for memory only.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.seed = seed
        self._memory: dict[tuple, FragmentStats] = {}
        self.written: list[Path] = []  # the cache files this one wrote, in order

    def get(self, fragment: Fragment) -> FragmentStats:
        """Statistics of ``fragment``, computing and storing them the first time."""
        mem_key = (str(fragment.path), fragment.shape, fragment.dtype.name)
        if mem_key in self._memory:  # per-window calls: no file system access
            return self._memory[mem_key]
        key = _cache_key(fragment, self.seed)
        stats = self._load(fragment, key)
        if stats is None:
            stats = compute_stats(fragment, rng=np.random.default_rng(self.seed))
            self._save(fragment, key, stats)
        self._memory[mem_key] = stats
        return stats

    def _file(self, fragment: Fragment, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        folder = self.cache_dir.resolve()
        if within(folder, fragment.path.resolve()):
            raise InputError(
                f"cache_dir: must not be inside the fragment folder, got {self.cache_dir}"
            )
        return folder / "stats" / bounded_name(fragment.id, f"-{key[:16]}.json", hidden=False)

    def _load(self, fragment: Fragment, key: str) -> FragmentStats | None:
        path = self._file(fragment, key)
        if path is None or not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            if d.get("key") != key:
                return None
            return FragmentStats.from_dict(d["stats"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable stats cache %s: %s", path, err)
            return None

    def _save(self, fragment: Fragment, key: str, stats: FragmentStats) -> None:
        path = self._file(fragment, key)
        if path is None:
            return
        tmp = path.with_name(bounded_name(path.stem, f".json.tmp-{os.getpid()}"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": key, "stats": stats.to_dict()}, indent=1))
            tmp.replace(path)
        except OSError as err:  # a cache: a full or read-only disk costs time, not the run
            tmp.unlink(missing_ok=True)
            log.warning("could not cache statistics in %s (%s); they are computed again next "
                        "time", path.parent, err.strerror or err)
            return
        self.written.append(path)
        log.debug("wrote stats cache %s", path)


def _cache_key(fragment: Fragment, seed: int) -> str:
    """Digest of what the statistics depend on: files (size, mtime), shape, dtype, method."""
    files = [*fragment.volume_files, fragment.mask_path, fragment.ir_path]
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p]
    blob = json.dumps([_VERSION, seed, SAMPLE_WINDOWS, SAMPLE_SIZE, fragment.shape,
                       fragment.dtype.name, stamp])
    return hashlib.sha1(blob.encode()).hexdigest()


def _random_pixels(
    where: np.ndarray, count: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Up to ``count`` random (y, x) with ``where[y, x]``; rejection sampling, so a huge map is
    never turned into a list of coordinates unless it is nearly empty."""
    h, w = where.shape
    found: list[tuple[int, int]] = []
    for _ in range(32):
        ys = rng.integers(0, h, 8 * count + 64)
        xs = rng.integers(0, w, 8 * count + 64)
        keep = where[ys, xs]
        found.extend(zip(ys[keep].tolist(), xs[keep].tolist(), strict=True))
        if len(found) >= count:
            return found[:count]
    idx = np.flatnonzero(where)  # sparse map: few coordinates
    if idx.size == 0:
        return found
    picks = rng.choice(idx, size=count - len(found))
    return found + [(int(i // w), int(i % w)) for i in picks]


def dead_slices(slice_std: Sequence[float]) -> np.ndarray:
    """bool [depth]: the slices that hold one value inside the mask (std about 0: a blank,
    missing or saturated slice a scanner or a conversion left). They carry no signal and would
    outweigh every real slice in a depth profile or a density centroid."""
    std = np.asarray(slice_std, np.float64)  # [depth]
    return std <= 1e-6 * max(float(std.max(initial=0.0)), 1e-12)


def std_floor(slice_std: Sequence[float]) -> float:
    """The smallest std a view divides by: 1e-3 of the fragment's median slice std, so that
    flat columns are not blown up. Relative to the data, not to its dtype: a uint16 volume
    holding 8-bit values (std about 20) was divided by at least 65.5 (1e-3 of 65535), which
    squashed its input to a third."""
    return max(1e-3 * float(np.median(np.asarray(slice_std, np.float64))), 1e-6)


def profile_moments(vol: np.ndarray, slice_std: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's mean and std along depth over the live slices of ``vol`` float32
    [n, S, S] (``slice_std``: the n slices' std in the fragment, :func:`dead_slices`):
    (mean [1, S, S], std [1, S, S], dead bool [n]). All dead: over every slice."""
    dead = dead_slices(slice_std)
    live = vol[~dead] if (~dead).any() else vol
    return live.mean(axis=0, keepdims=True), live.std(axis=0, keepdims=True), dead


def sheet_centre(slice_mean: Sequence[float], slice_std: Sequence[float] | None = None
                 ) -> float:
    """Depth (slice index, fractional) of the papyrus sheet: the centroid of the slices' mean
    density above the emptiest slice. Density is what the sheet adds to empty space, so the
    centroid follows the sheet wherever the scan put it; ``(depth - 1) / 2`` when the profile
    is flat. With ``slice_std``, dead slices (:func:`dead_slices`: a blank or saturated one)
    take no part: a blank last slice had made every air slice count as sheet."""
    m = np.asarray(slice_mean, np.float64)  # [depth]
    live = np.ones(len(m), bool) if slice_std is None else ~dead_slices(slice_std)
    if not live.any():
        return (len(m) - 1) / 2
    w = np.where(live, m - m[live].min(), 0.0)
    if w.sum() <= 0:
        return (len(m) - 1) / 2
    return float((w * np.arange(len(m))).sum() / w.sum())
