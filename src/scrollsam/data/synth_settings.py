"""Generator settings of synthetic fragments, and the ranges ``--vary`` draws them from.

A model trained on one generator learns its constants: the depth of the papyrus sheet, how far
above it the ink sits, how strong and how noisy the signal is, how wide the strokes are. Real
scrolls differ from each other in exactly these ways, so ``scrollsam synth --vary LEVEL`` draws
every setting per fragment from a range that widens with the level:

* level 0: the fixed defaults below (the generator of earlier versions);
* level 1: moderate variety, what ``scrollsam demo`` trains on;
* level 2: wide variety, including the slice count.

Depth-like settings are in slices of a 65-slice volume and scale with the fragment's depth.
Settings given explicitly (``--setting ink_offset=3``) override the draw, so fragments can be
made *outside* the training ranges to test how a model transfers (``make bench-learn``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from scrollsam.errors import InputError


@dataclass(frozen=True)
class SynthSettings:
    """One fragment's generator settings (slice units are of a 65-slice volume)."""

    surface: float = 0.0  # sheet centre relative to the middle slice, slices
    drift: float = 3.0  # amplitude of the sheet's drift in depth across the fragment, slices
    sheet: float = 11.5  # half thickness of the papyrus sheet, slices
    ink_offset: float = 0.0  # depth of the ink signal relative to the sheet centre, slices
    ink_sigma: float = 3.0  # depth spread of the ink signal, slices
    ink_contrast: float = 0.1  # peak density increase of ink, fraction of papyrus density
    # how much ink strength varies across the fragment: the contrast is multiplied by a smooth
    # field in [exp(-v), exp(v)] (real ink is denser in some strokes and letters than others)
    ink_variation: float = 0.0
    noise: float = 0.04  # voxel noise std, fraction of the papyrus - air density span
    fibre: float = 0.12  # fibre texture amplitude, fraction of papyrus density
    stroke: float = 1.0  # stroke width, multiple of the default (letter height / 7)
    letter: float = 1.0  # letter height, multiple of the default (fragment side / 18)
    depth: int = 65  # slice count


# (low, high) per setting and level; settings absent from a level keep their default.
VARY_RANGES: dict[int, dict[str, tuple[float, float]]] = {
    0: {},
    1: {
        "surface": (-4.0, 4.0), "drift": (1.0, 5.0), "sheet": (8.0, 14.0),
        "ink_offset": (-1.5, 1.5), "ink_sigma": (2.0, 4.0), "ink_contrast": (0.06, 0.16),
        "noise": (0.03, 0.06), "fibre": (0.06, 0.18), "stroke": (0.7, 1.5), "letter": (0.8, 1.25),
        "ink_variation": (0.0, 0.7),
    },
    2: {
        "surface": (-8.0, 8.0), "drift": (0.5, 7.0), "sheet": (6.0, 16.0),
        "ink_offset": (-3.0, 3.0), "ink_sigma": (1.5, 5.0), "ink_contrast": (0.04, 0.25),
        "noise": (0.02, 0.08), "fibre": (0.03, 0.25), "stroke": (0.6, 2.0), "letter": (0.7, 1.5),
        "depth": (48, 80), "ink_variation": (0.0, 1.0),
    },
}
LEVELS = tuple(VARY_RANGES)
_INT_SETTINGS = {"depth"}
_FIELDS = {f.name for f in dataclasses.fields(SynthSettings)}


def draw_settings(
    level: int, rng: np.random.Generator, *, base: SynthSettings | None = None,
    fixed: dict[str, Any] | None = None,
) -> SynthSettings:
    """Settings for one fragment: ``base`` (default: the defaults), each setting of ``level``'s
    ranges drawn uniformly from ``rng``, then ``fixed`` values on top (they are not drawn)."""
    if level not in VARY_RANGES:
        raise InputError(f"--vary: expected one of {', '.join(map(str, LEVELS))}, got {level!r}")
    fixed = dict(fixed or {})
    values = dataclasses.asdict(base or SynthSettings())
    for name, (low, high) in VARY_RANGES[level].items():
        draw = rng.uniform(low, high)  # drawn even when fixed: the stream stays the same
        if name not in fixed:
            values[name] = int(round(draw)) if name in _INT_SETTINGS else float(draw)
    values.update(fixed)
    return check_settings(SynthSettings(**values))


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["ink_offset=3", "depth=60"]`` -> ``{"ink_offset": 3.0, "depth": 60}``."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in _FIELDS:
            raise InputError(f"--setting: expected NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(_FIELDS))}, got {item!r}")
        try:
            out[name] = int(raw) if name in _INT_SETTINGS else float(raw)
        except ValueError as err:
            raise InputError(f"--setting {name}: expected a number, got {raw!r}") from err
    return out


def check_settings(s: SynthSettings) -> SynthSettings:
    """InputError naming the setting when a value cannot make a fragment."""
    limits = {"drift": (0.0, 30.0), "ink_variation": (0.0, 3.0), "sheet": (1.0, 30.0),
              "ink_sigma": (0.3, 20.0),
              "ink_contrast": (0.0, 1.0), "noise": (0.0, 1.0), "fibre": (0.0, 1.0),
              "stroke": (0.2, 5.0), "letter": (0.2, 5.0), "surface": (-30.0, 30.0),
              "ink_offset": (-30.0, 30.0)}
    for name, (low, high) in limits.items():
        value = getattr(s, name)
        if not low <= value <= high:
            raise InputError(f"{name}: expected a number in [{low}, {high}], got {value}")
    if s.depth < 1:
        raise InputError(f"depth: expected an integer >= 1, got {s.depth}")
    return s
