"""Input views: how a window of a fragment becomes the model's float32 input [C, S, S].

Build one with :func:`make_view` (or :func:`view_from_config`)::

    view = make_view("slices", "range", z0=25, z1=41)       # 16 slices -> in_chans=16
    x = view.train_window(fragment, y0, x0, 256, rng=rng)   # [C, 256, 256], random draws
    x = view.eval_window(fragment, y0, x0, 256)             # [C, 256, 256], deterministic
    xs = view.infer_windows(fragment, y0, x0, 256)          # [K, C, 256, 256]: average over K

Views (``channels`` is known at construction, so the model can be built with ``in_chans``):

- ``ir``: ir.png repeated into 3 channels (the toy problem). K = 1.
- ``slices/triplet``: 3 consecutive slices. Training draws the start so that the middle slice is
  ``round(N(centre, std))``, clipped to the band; evaluation uses ``centre``. K = 1.
- ``slices/every``: one slice repeated into 3 channels. Training draws a slice uniformly from the
  band; evaluation uses its middle slice; inference returns every slice of the band (K = z1 - z0)
  and the predictor averages the K predictions.
- ``slices/range``: slices z0..z1-1 as C = z1 - z0 channels (build the model with that in_chans).
- ``slices/project``: projections over the band, one channel per reduction (mean, max, min, std).
- ``slices/mosaic``: a spatially aligned mosaic: each channel tiles ``grid x grid`` slices in a
  repeating ``grid x grid`` pixel pattern (like a Bayer filter), fixed to image coordinates, so
  every pixel shows one slice at its true position and labels stay aligned; 3 channels use
  3 * grid**2 slices spread evenly over the band.

Slice parameters (``make_view`` keywords; in a run config the mapping ``data.view``, e.g.
``data.view={centre: 30, std: 2}``): ``depth`` (slice count the defaults are laid out for, 65 =
Kaggle), ``z0`` / ``z1`` (the band, half-open; default the ink band, slices 25..40 of 65, scaled
for other depths; also ``data.z_start`` / ``data.z_end``), ``norm`` (``mean_std`` or
``median_mad``, below), ``centre`` / ``std`` (triplet draw),
``depth_shift`` (range / project / mosaic: training moves the band by up to +-depth_shift
slices), ``depth_scale`` (range / project / mosaic: training stretches or squeezes the band in
depth by a factor drawn log-uniformly in [1 / (1 + s), 1 + s], as scans of another voxel size or
a thinner / thicker sheet would look; 0 = off), ``profile`` (range / project / mosaic: true
standardises each pixel's band along depth instead, below), ``align`` (range / project /
mosaic: ``sheet`` moves the band, per fragment, so that its middle sits on the papyrus
sheet's density centroid, :func:`.stats.sheet_centre`; ``none`` keeps z0 / z1),
``reductions`` (project), ``grid`` (mosaic). Each view checks its own parameters.

Normalisation: slices are converted exactly to float32 (8-bit and 16-bit alike) and standardised
per slice, ``(v - mean[z]) / std[z]``, or with ``norm: median_mad`` ``(v - median[z]) /
(1.4826 MAD[z])``, which cracks, air pockets and bright inclusions barely move; with
``profile: true`` each pixel's column of band slices instead by its own depth mean and std over
the live slices (a dead one, blank or saturated, :func:`.stats.dead_slices`, is left out and
set to 0), so brightness or texture that scales or offsets a pixel's whole column cancels; ir
with its own mean / std; projections per channel once more. Statistics are per fragment, inside
``mask.png`` (:mod:`.stats`): inside the mask each channel is roughly zero mean / unit std;
values are clipped to [-CLIP, CLIP], and pixels outside the mask (or the image) are exactly 0.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from scrollsam.config import DataConfig
from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import StatsCache, profile_moments, sheet_centre, std_floor
from scrollsam.errors import ConfigError, FragmentError, InputError

log = logging.getLogger(__name__)

CLIP = 5.0  # normalised inputs lie in [-CLIP, CLIP]
REDUCTIONS = ("mean", "max", "min", "std")
STRATEGIES = ("triplet", "every", "range", "project", "mosaic")
NORMS = ("mean_std", "median_mad")  # per-slice standardisation, see the module docstring


class View:
    """Base class: a fragment window -> float32 [C, S, S]. Subclasses set ``channels``."""

    name = "view"
    PARAMS: dict[str, Any] = {}
    channels = 0  # C, set by each view (on the class, or in __init__ when parameters decide)

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        self.stats = stats
        for key in params:
            if key not in self.PARAMS:
                known = ", ".join(self.PARAMS) or "none"
                raise InputError(f"{key}: unknown parameter of view {self.name} (known: {known})")

    @property
    def params(self) -> dict[str, Any]:
        """The resolved parameters (for saving in a run config)."""
        return {k: getattr(self, k) for k in self.PARAMS}

    def prepare(self, fragment: Fragment) -> None:
        """Check that ``fragment`` has what this view needs and compute its statistics."""
        self.check(fragment)
        self.stats.get(fragment)

    def check(self, fragment: Fragment) -> None:
        """FragmentError naming the fragment when it lacks what this view needs."""

    def train_window(self, fragment: Fragment, y0: int, x0: int, size: int, *,
                     rng: np.random.Generator) -> np.ndarray:
        """Training input for the window at (y0, x0): float32 [C, size, size]; draws: ``rng``."""
        return self.eval_window(fragment, y0, x0, size)

    def eval_window(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        """Deterministic input for the window: float32 [C, size, size]."""
        raise NotImplementedError

    def infer_windows(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        """Inputs whose predictions the predictor averages: float32 [K, C, size, size]."""
        return self.eval_window(fragment, y0, x0, size)[None]  # [1, C, S, S]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<view {self.name}({args}) channels={self.channels}>"


class IrView(View):
    """ir.png, standardised, repeated into 3 channels."""

    name = "ir"
    channels = 3

    def check(self, fragment: Fragment) -> None:
        if fragment.ir_path is None:
            raise FragmentError(
                f"fragment {fragment.id} has no ir.png, which view 'ir' needs (data.input=ir); "
                f"x-ray slices: train with data.input=slices (see configs/demo_xray.yaml) "
                f"({fragment.path})")

    def eval_window(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        self.check(fragment)
        st = self.stats.get(fragment)
        ir = fragment.ir_window(y0, y0 + size, x0, x0 + size)  # [S, S] uint8 or uint16
        std = max(float(st.ir_std or 0.0), 1e-3 * np.iinfo(ir.dtype).max)  # 1e-3 of the range
        x = (ir.astype(np.float32) - np.float32(st.ir_mean)) / np.float32(std)
        inside = fragment.mask_window(y0, y0 + size, x0, x0 + size)
        x = np.clip(x, -CLIP, CLIP) * inside  # [S, S]
        return np.repeat(x[None], 3, axis=0).astype(np.float32)  # [3, S, S]


class SlicesView(View):
    """Common part of the slice views: the depth band and per-slice normalisation."""

    PARAMS: dict[str, Any] = {"depth": 65, "z0": None, "z1": None, "norm": "mean_std"}
    min_band = 1

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        p = {**self.PARAMS, **params}
        self.depth = _int("depth", p["depth"], 1)
        z0 = round(self.depth * 25 / 65) if p["z0"] is None else _int("z0", p["z0"], 0)
        z1 = round(self.depth * 41 / 65) if p["z1"] is None else _int("z1", p["z1"], 1)
        if p["z0"] is None and p["z1"] is None and z1 - z0 < self.min_band:
            z0 = max(0, min(z0, self.depth - self.min_band))  # tiny depths: widen the band
            z1 = min(self.depth, z0 + self.min_band)
        if z1 - z0 < self.min_band:
            raise InputError(f"z1: expected z1 >= z0 + {self.min_band} for view {self.name}, "
                             f"got z0={z0}, z1={z1}")
        if "depth" in params and z1 > self.depth:  # else each fragment's depth (check)
            raise InputError(f"z1: expected z1 <= depth ({self.depth}), got {z1}")
        self.z0, self.z1 = z0, z1
        self.norm = p["norm"]
        if self.norm not in NORMS:
            raise InputError(f"norm: expected one of {', '.join(NORMS)}, got {self.norm!r}")
        self._p = p

    def check(self, fragment: Fragment) -> None:
        if fragment.depth < self.z1:
            raise FragmentError(
                f"fragment {fragment.id} has {fragment.depth} slices, view {self.name} needs "
                f"slices {self.z0}..{self.z1 - 1} (training: set data.z_start / data.z_end; a "
                f"trained model's band is fixed) ({fragment.path})"
            )

    def _normalised(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                    size: int, *, profile: bool = False) -> np.ndarray:
        """Slices z0..z1-1 of the window, standardised (per slice, or per pixel along depth
        with ``profile``) and clipped, 0 outside the mask: float32 [z1-z0, S, S]."""
        self.check(fragment)
        st = self.stats.get(fragment)
        floor = np.float32(std_floor(st.slice_std))
        vol = fragment.read(z0, z1, y0, y0 + size, x0, x0 + size).astype(np.float32)  # [n,S,S]
        dead = np.zeros(z1 - z0, bool)  # [n]: profile's dead slices, set to 0 below
        if profile:  # each pixel's own depth mean / std over the live slices: [1, S, S]
            mean, std, dead = profile_moments(vol, st.slice_std[z0:z1])
        else:  # the fragment's per-slice statistics: [n, 1, 1]
            centre, spread = ((st.slice_mean, st.slice_std) if self.norm == "mean_std"
                              else (st.slice_median, st.slice_mad))
            mean = np.asarray(centre[z0:z1], np.float32)[:, None, None]
            std = np.asarray(spread[z0:z1], np.float32)[:, None, None]
        inside = fragment.mask_window(y0, y0 + size, x0, x0 + size)  # [S, S]
        vol -= mean  # in place: vol is this call's own copy
        vol /= np.maximum(std, floor)
        np.clip(vol, -CLIP, CLIP, out=vol)
        vol *= inside
        vol[dead] = 0  # a dead slice (blank, saturated) says nothing
        return vol

    def _shifted_band(self, fragment: Fragment, rng: np.random.Generator, shift: int, *,
                      band: tuple[int, int]) -> tuple[int, int]:
        """``band`` (z0, z1) moved by a uniform draw in [-shift, shift], inside the volume."""
        z0, z1 = band
        lo, hi = max(-shift, -z0), min(shift, fragment.depth - z1)
        d = int(rng.integers(lo, hi + 1)) if hi >= lo else 0
        return z0 + d, z1 + d


class TripletView(SlicesView):
    """Three consecutive slices; the middle one drawn around ``centre`` in training."""

    name = "slices/triplet"
    PARAMS = {**SlicesView.PARAMS, "centre": None, "std": None}
    min_band = 3
    channels = 3

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        p = self._p
        self.centre = (self.z0 + self.z1 - 1) / 2 if p["centre"] is None else _float(
            "centre", p["centre"])
        self.std = (self.z1 - self.z0) / 4 if p["std"] is None else _float("std", p["std"])
        if self.std < 0:
            raise InputError(f"std: expected a number >= 0, got {self.std}")

    def _start(self, middle: float) -> int:
        return int(np.clip(round(middle) - 1, self.z0, self.z1 - 3))

    def train_window(self, fragment: Fragment, y0: int, x0: int, size: int, *,
                     rng: np.random.Generator) -> np.ndarray:
        z = self._start(rng.normal(self.centre, self.std) if self.std > 0 else self.centre)
        return self._normalised(fragment, z, z + 3, y0, x0, size)  # [3, S, S]

    def eval_window(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        z = self._start(self.centre)
        return self._normalised(fragment, z, z + 3, y0, x0, size)  # [3, S, S]


class EveryView(SlicesView):
    """One slice as 3 channels; inference returns every slice of the band (K = z1 - z0)."""

    name = "slices/every"
    channels = 3

    def train_window(self, fragment: Fragment, y0: int, x0: int, size: int, *,
                     rng: np.random.Generator) -> np.ndarray:
        z = int(rng.integers(self.z0, self.z1))
        return np.repeat(self._normalised(fragment, z, z + 1, y0, x0, size), 3, axis=0)

    def eval_window(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        z = (self.z0 + self.z1 - 1) // 2
        return np.repeat(self._normalised(fragment, z, z + 1, y0, x0, size), 3, axis=0)

    def infer_windows(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        vol = self._normalised(fragment, self.z0, self.z1, y0, x0, size)  # [K, S, S]
        return np.repeat(vol[:, None], 3, axis=1)  # [K, 3, S, S]


class _BandView(SlicesView):
    """A view of the whole band that training may shift in depth by up to ``depth_shift``."""

    PARAMS = {**SlicesView.PARAMS, "depth_shift": 2, "align": "none", "depth_scale": 0.0,
              "profile": False}

    def __init__(self, stats: StatsCache, **params: Any) -> None:
        super().__init__(stats, **params)
        self.depth_shift = _int("depth_shift", self._p["depth_shift"], 0)
        self.align = self._p["align"]
        if self.align not in ("none", "sheet"):
            raise InputError(f"align: expected none or sheet, got {self.align!r}")
        self.depth_scale = _float("depth_scale", self._p["depth_scale"])
        if not 0.0 <= self.depth_scale <= 1.0:
            raise InputError(f"depth_scale: expected a number in [0, 1], got {self.depth_scale}")
        if not isinstance(self._p["profile"], bool | np.bool_):
            raise InputError(f"profile: expected true or false, got {self._p['profile']!r}")
        self.profile = bool(self._p["profile"])

    def check(self, fragment: Fragment) -> None:
        """With ``align=sheet`` the band moves into each volume: it needs z1 - z0 slices, not
        slices z0..z1-1 (a 30-slice volume takes the 26 slices of 20..45)."""
        if self.align == "none":
            super().check(fragment)
        elif fragment.depth < self.z1 - self.z0:
            raise FragmentError(
                f"fragment {fragment.id} has {fragment.depth} slices, view {self.name} with "
                f"align: sheet needs {self.z1 - self.z0} (the band's width) ({fragment.path})")

    def band(self, fragment: Fragment) -> tuple[int, int]:
        """The fragment's band (z0, z1): as set, or centred on its sheet with ``align=sheet``
        (kept inside the volume)."""
        if self.align == "none":
            return self.z0, self.z1
        st = self.stats.get(fragment)
        centre = sheet_centre(st.slice_mean, st.slice_std)
        move = round(centre - (self.z0 + self.z1 - 1) / 2)
        move = int(np.clip(move, -self.z0, fragment.depth - self.z1))
        return self.z0 + move, self.z1 + move

    def train_window(self, fragment: Fragment, y0: int, x0: int, size: int, *,
                     rng: np.random.Generator) -> np.ndarray:
        self.check(fragment)
        z0, z1 = self._shifted_band(fragment, rng, self.depth_shift, band=self.band(fragment))
        scale = 1.0
        if self.depth_scale > 0:  # log-uniform in [1 / (1 + s), 1 + s]
            scale = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.depth_scale)))
        return self._compose(fragment, z0, z1, y0, x0, size, scale=scale)

    def eval_window(self, fragment: Fragment, y0: int, x0: int, size: int) -> np.ndarray:
        self.check(fragment)
        return self._compose(fragment, *self.band(fragment), y0, x0, size)

    def _compose(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                 size: int, *, scale: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def _band_slices(self, fragment: Fragment, z0: int, z1: int, y0: int, x0: int,
                     size: int, scale: float = 1.0) -> np.ndarray:
        """The band's n = z1 - z0 normalised slices, float32 [n, S, S]; with ``scale`` != 1
        resampled in depth about the band's middle (linear interpolation, positions kept
        inside the volume): slice k sits at ``mid + (k - (n - 1) / 2) * scale``, so scale > 1
        shows a thinner sheet and thinner ink, as a coarser scan would (training only)."""
        if scale == 1.0:
            return self._normalised(fragment, z0, z1, y0, x0, size, profile=self.profile)
        n = z1 - z0
        pos = (z0 + z1 - 1) / 2 + (np.arange(n) - (n - 1) / 2) * scale  # [n] fractional z
        pos = np.clip(pos, 0, fragment.depth - 1)
        lo, hi = int(np.floor(pos[0])), min(int(np.ceil(pos[-1])) + 1, fragment.depth)
        vol = self._normalised(fragment, lo, hi, y0, x0, size, profile=self.profile)
        at = pos - lo  # [n] positions in vol
        i0 = np.minimum(np.floor(at).astype(int), hi - lo - 1)  # [n]
        i1 = np.minimum(i0 + 1, hi - lo - 1)
        w = (at - i0).astype(np.float32)[:, None, None]  # [n, 1, 1]
        return (vol[i0] * (1 - w) + vol[i1] * w).astype(np.float32)  # [n, S, S]


def _views() -> dict[str, type[View]]:
    from scrollsam.data.band_views import MosaicView, ProjectView, RangeView  # on _BandView

    return {"ir": IrView, "slices/triplet": TripletView, "slices/every": EveryView,
            "slices/range": RangeView, "slices/project": ProjectView, "slices/mosaic": MosaicView}


def make_view(input: str, strategy: str | None = None, *,
              cache_dir: str | os.PathLike[str] | None = None, stats: StatsCache | None = None,
              **params: Any) -> View:
    """Build a view: ``input`` "ir" (no strategy) or "slices" with a strategy (default
    "triplet"); ``params`` as listed in the module docstring, checked (InputError naming the
    parameter). Statistics come from ``stats`` or a new :class:`StatsCache` on ``cache_dir``
    (the run dir; None keeps them in memory)."""
    if input == "ir":
        if strategy not in (None, "", "ir"):
            raise InputError(f"strategy: view 'ir' takes no strategy, got {strategy!r}")
        key = "ir"
    elif input == "slices":
        strategy = strategy or "triplet"
        if strategy not in STRATEGIES:
            raise InputError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
        key = f"slices/{strategy}"
    else:
        raise InputError(f"input: expected 'ir' or 'slices', got {input!r}")
    return _views()[key](stats if stats is not None else StatsCache(cache_dir), **params)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise InputError(f"{name}: expected a number, got {value!r}")
    if not np.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def view_from_config(data: DataConfig, *, cache_dir: str | os.PathLike[str] | None) -> View:
    """The view a run's ``data`` config names: the same for training and prediction.

    ``data.view`` holds the view's parameters (module docstring), checked here by the view;
    ``data.z_start`` / ``data.z_end`` set the band's ``z0`` / ``z1`` (None: the default ink
    band). A bad parameter is a ConfigError naming the key.
    """
    band = {k: v for k, v in (("z0", data.z_start), ("z1", data.z_end))
            if v is not None and data.input == "slices"}
    keys = "data.view" + (" / data.z_start / data.z_end" if band else "")
    if set(band) & set(data.view):
        raise ConfigError(f"{keys}: set the band once, with data.z_start / data.z_end or with "
                          f"data.view.z0 / z1, got both")
    strategy = data.strategy if data.input == "slices" else None
    try:
        return make_view(data.input, strategy, cache_dir=cache_dir, **band, **data.view)
    except InputError as err:  # name the config keys, not make_view's parameters
        text = str(err)
        if band:
            text = re.sub(r"\bz0\b", "data.z_start", re.sub(r"\bz1\b", "data.z_end", text))
        raise ConfigError(text if text.startswith("data.") else f"{keys}: {text}") from None
