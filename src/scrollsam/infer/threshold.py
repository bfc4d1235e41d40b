"""Which threshold turns a fragment's probabilities into ink: the validation's, adapted.

Training chooses the threshold that maximises F0.5 on the validation fragments. On a fragment
unlike them (another scroll, another scan: fainter ink, ink at another depth, more texture)
the model is less sure of the ink and its probabilities move down as a whole, so that fixed
threshold cuts away most of the ink it still ranks above the papyrus. Measured on the
out-of-range fragments of ``make bench-learn`` (x-ray demo models of four training seeds): the
validation threshold 0.53-0.61 scored F0.5 0.474 on average where each fragment's own best
threshold (0.30-0.55) scored 0.546.

The rule here needs no labels. :func:`~scrollsam.metrics.expected_threshold` reads the
probabilities as chances of ink and gives the threshold that maximises the F0.5 they expect; it
moves with them. Training stores that value for its best validation (``reference``) next to
the validation threshold (``value``); for a fragment the rule keeps their offset::

    threshold = value + expected_threshold(fragment probabilities) - reference

clipped to [0.01, 0.99]. On the validation tiles' own probabilities it gives back ``value``;
a whole-fragment prediction blends overlapping windows (and ``--tta`` averages 8 of them), which
moves the probabilities a little, so on a validation fragment predicted whole it is close to
``value``, not always equal. The same four models scored 0.537 with it on the out-of-range
fragments and 0.859 on the held-back fragment (0.859 with the fixed threshold); five newly
trained ones 0.539 +- 0.018 (0.481 +- 0.025 at the validation threshold,
``benchmarks/learn.py --seeds 0,1,2,3,4``). A fragment with no probability above 0 keeps
``value``. Checkpoints written before the reference existed, a given number
(``--threshold 0.4``) and ``--threshold saved`` use a fixed threshold.

An adapted threshold is one of :data:`CANDIDATES`, so a mask at it can be made later from
:func:`candidate_ranks` of the probabilities (how many candidates each one reaches, exactly as
:func:`~scrollsam.metrics.binarize_prediction` decides), one byte a pixel: the OME-Zarr output
keeps what rounding the stored values loses of it, and rewrites its mask at the fragment's
threshold with no difference from PNG mode (:mod:`.segment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from scrollsam.errors import InputError
from scrollsam.metrics import (
    DEFAULT_THRESHOLDS,
    LEVELS,
    ProbabilityHistogram,
    binarize_prediction,
    check_threshold,
    expected_threshold,
    levels,
)

LOWEST, HIGHEST = 0.01, 0.99  # the adapted threshold stays inside the candidates' range
CANDIDATES = DEFAULT_THRESHOLDS  # 0.01 ... 0.99: every threshold an adapted rule can give
CHOICES = ("auto", "saved")  # besides a number: see ThresholdRule.choose


def threshold_choice(value: float | str | None) -> float | str | None:
    """``--threshold`` checked: None, ``auto``, ``saved``, or a number in [0, 1] (also as text);
    InputError naming the flag otherwise."""
    if value is None or value in CHOICES:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:  # also NaN
        raise InputError(f"--threshold: expected {', '.join(CHOICES)} or a number in [0, 1], "
                         f"got {value!r}")
    return number


@dataclass(frozen=True)
class ThresholdRule:
    """``value``: the threshold (the validation's, or a given one). ``reference``: the
    expected-F0.5 threshold of the validation probabilities; None = ``value`` for every
    fragment."""

    value: float
    reference: float | None = None

    def __post_init__(self) -> None:
        check_threshold(self.value)
        if self.reference is not None:
            check_threshold(self.reference)

    @property
    def adaptive(self) -> bool:
        return self.reference is not None

    @classmethod
    def choose(cls, choice: float | str | None, *, saved: float,
               reference: float | None) -> ThresholdRule:
        """The rule for ``--threshold``: None / ``"auto"`` = the checkpoint's threshold adapted
        to each fragment (fixed when the checkpoint has no ``reference``); ``"saved"`` = the
        checkpoint's threshold as it is; a number = that threshold, fixed."""
        if choice is None or choice == "auto":
            return cls(saved, reference)
        if choice == "saved":
            return cls(saved)
        return cls(float(threshold_choice(choice)))  # type: ignore[arg-type]

    def for_histogram(self, hist: ProbabilityHistogram) -> float:
        """The threshold for a fragment whose probabilities (inside its mask) ``hist`` counts."""
        if self.reference is None or not (hist.ink[1:].any() or hist.background[1:].any()):
            return self.value  # fixed, or nothing to adapt to (all 0: an empty mask)
        moved = self.value + expected_threshold(hist) - self.reference
        return round(float(np.clip(moved, LOWEST, HIGHEST)), 2)

    def for_fragment(self, prob: np.ndarray, valid: np.ndarray | None) -> float:
        """The threshold for probabilities ``prob`` float [H, W] (or uint8 / uint16 levels)
        inside ``valid`` bool [H, W] (None: every pixel)."""
        if self.reference is None:
            return self.value
        hist = ProbabilityHistogram()
        hist.add(prob, None, valid)
        return self.for_histogram(hist)

    def describe(self) -> dict[str, Any]:
        """What metrics.json / summary.json record about the rule."""
        if self.reference is None:
            return {"threshold_rule": "fixed"}
        return {"threshold_rule": "adapted", "validation_threshold": self.value,
                "validation_expected_threshold": self.reference}


@cache
def _rank_of_level() -> np.ndarray:
    """uint8 [LEVELS]: how many of :data:`CANDIDATES` each 16-bit level reaches, by
    :func:`~scrollsam.metrics.binarize_prediction` itself (levels are what it compares)."""
    every = np.arange(LEVELS, dtype=np.uint16)  # (LEVELS,): every 16-bit level
    ranks = np.zeros(LEVELS, np.uint8)
    for t in CANDIDATES:
        ranks += binarize_prediction(every, threshold=float(t), binary=False)[0]
    return ranks


def candidate_ranks(values: np.ndarray) -> np.ndarray:
    """uint8 [..] (the shape of ``values``): how many of :data:`CANDIDATES` each value reaches
    (``p >= t``, the rule of :mod:`scrollsam.metrics`, 16-bit levels). values: probabilities
    (float in [0, 1]) or 8-bit levels (uint8, p = value / 255). ``p >= CANDIDATES[k - 1]``
    exactly where the rank is at least k (:func:`candidate_index`)."""
    if values.dtype != np.uint8 and values.dtype.kind != "f":
        raise InputError(f"values: expected float probabilities or uint8, got {values.dtype}")
    return _rank_of_level()[levels(values)]  # metrics' own 16-bit levels


def candidate_index(threshold: float) -> int:
    """k such that ``p >= threshold`` exactly where :func:`candidate_ranks` of p is at least k;
    ValueError when ``threshold`` is none of :data:`CANDIDATES`."""
    every = np.arange(LEVELS, dtype=np.uint16)  # (LEVELS,): every 16-bit level
    ink = binarize_prediction(every, threshold=threshold, binary=False)[0]  # (LEVELS,)
    k = int(_rank_of_level()[int(np.argmax(ink))]) if ink.any() else len(CANDIDATES) + 1
    if not 1 <= k <= len(CANDIDATES) or not np.array_equal(ink, _rank_of_level() >= k):
        raise ValueError(f"threshold {threshold} is not one of the candidates 0.01 ... 0.99")
    return k
