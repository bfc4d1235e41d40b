"""Pixel metrics of the ink-detection competition: F0.5, precision, recall, dice (F1), IoU.

Everything is built on confusion counts (:class:`Counts`: tp, fp, fn, tn inside the valid
mask), which add up: a whole fragment is scored tile by tile, and several fragments pooled (all
their pixels counted together).

Conventions:
- Arrays are numpy arrays or torch tensors (moved to the CPU) of one shape, any rank.
- Binary inputs: bool; integers: nonzero = true; floats: > 0.5 = true (so 0/1 float targets
  and 0/255 label images both work). ``valid`` (the fragment mask) limits every count.
- Probabilities are compared with a threshold as ``prob >= threshold`` at 1/65535 resolution:
  every probability is first quantised to a 16-bit level (exact for 8- and 16-bit images).
  :func:`binarize_prediction` and the threshold search use the same rule, so a threshold found
  by :func:`search_threshold` reproduces its counts exactly.
- Degenerate ratios never give NaN: a 0/0 score is 1.0 when prediction and truth agree
  completely (fp == fn == 0, e.g. no ink and none predicted), else 0.0. So every score is 1.0
  exactly for a perfect prediction, and "no predicted positives" on a tile with ink scores
  precision = recall = F = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from scrollsam.errors import InputError

if TYPE_CHECKING:  # torch is accepted but not imported: `scrollsam evaluate` starts fast
    import torch

    ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Counts",
    "ProbabilityHistogram",
    "ThresholdSearch",
    "binarize_prediction",
    "confusion",
    "expected_threshold",
    "score",
    "search_threshold",
]

LEVELS = 65536  # probabilities are quantised to 16-bit levels 0..65535
DEFAULT_THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)  # 0.01 ... 0.99
_CHUNK = 1 << 22  # pixels per chunk when histogramming (bounds temporary memory)


def _ratio(num: int, den: int, *, perfect: bool) -> float:
    if den == 0:
        return 1.0 if perfect else 0.0
    return num / den


@dataclass(frozen=True)
class Counts:
    """Pixel confusion counts inside the valid mask; ``a + b`` pools two sets of pixels."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                      self.tn + other.tn)

    @property
    def pixels(self) -> int:
        """Number of valid pixels counted."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def _perfect(self) -> bool:
        return self.fp == 0 and self.fn == 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp, perfect=self._perfect)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn, perfect=self._perfect)

    def f_beta(self, beta: float = 0.5) -> float:
        """(1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp); beta < 1 weighs precision more."""
        b2 = beta * beta
        num = (1 + b2) * self.tp
        den = num + b2 * self.fn + self.fp
        return 1.0 if den == 0 else num / den  # den == 0 only when tp = fp = fn = 0

    @property
    def dice(self) -> float:
        """F1 = 2 tp / (2 tp + fp + fn)."""
        return self.f_beta(1.0)

    @property
    def iou(self) -> float:
        """tp / (tp + fp + fn)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, perfect=self._perfect)

    def scores(self, *, beta: float = 0.5) -> dict[str, float]:
        """``{"f0.5", "precision", "recall", "dice", "iou"}`` (the first key follows beta)."""
        return {f"f{beta:g}": self.f_beta(beta), "precision": self.precision,
                "recall": self.recall, "dice": self.dice, "iou": self.iou}

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def _numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):  # a torch.Tensor
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:  # bf16 / fp16: no numpy twin
            x = x.float()
        return x.numpy()
    raise InputError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def as_bool(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        return x
    if x.dtype.kind == "f":
        return x > 0.5
    return x != 0


def _check_shapes(**arrays: np.ndarray | None) -> None:
    named = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = named[0]
    for name, arr in named[1:]:
        if arr.shape != first.shape:
            raise InputError(
                f"{name}: expected shape {tuple(first.shape)} (that of {first_name}), "
                f"got {tuple(arr.shape)}"
            )


def confusion(pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None) -> Counts:
    """Counts of a binary prediction against the truth, over pixels where ``valid`` is true.

    pred, target, valid: one shape, any rank (e.g. ``[H, W]`` or ``[P, 1, S, S]``).
    """
    p, t = as_bool(_numpy(pred, "pred")), as_bool(_numpy(target, "target"))
    v = None if valid is None else as_bool(_numpy(valid, "valid"))
    _check_shapes(pred=p, target=t, valid=v)
    if v is not None:
        p, t = p & v, t & v
        total = int(np.count_nonzero(v))
    else:
        total = p.size
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return Counts(tp, fp, fn, total - tp - fp - fn)


def score(
    pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None, *, beta: float = 0.5
) -> dict[str, float]:
    """:meth:`Counts.scores` of :func:`confusion`, plus the counts."""
    counts = confusion(pred, target, valid)
    return {**counts.scores(beta=beta), **counts.as_dict()}


# --- probabilities, thresholds ------------------------------------------------------------------


def check_threshold(threshold: float, *, name: str = "threshold") -> None:
    """InputError naming ``name`` (the caller's key or flag) unless ``threshold`` is a number
    in [0, 1]."""
    ok = isinstance(threshold, (int, float, np.number)) and not isinstance(threshold, bool)
    if not (ok and 0.0 <= float(threshold) <= 1.0):  # also rejects NaN
        shown = f"{float(threshold):g}" if ok else repr(threshold)
        raise InputError(f"{name}: expected a number in [0, 1], got {shown}")


def _threshold_level(threshold: float) -> int:
    """The smallest 16-bit level counted as positive at ``threshold`` (prob >= threshold)."""
    return int(math.ceil(threshold * (LEVELS - 1) - 1e-6))


def levels(prob: np.ndarray) -> np.ndarray:
    """Probabilities (float in [0, 1], uint8 /255, or uint16 /65535) as the uint16 levels every
    threshold here compares (also infer.threshold's candidate ranks)."""
    if prob.dtype == np.uint8:
        return prob.astype(np.uint16) * np.uint16(257)  # 255 * 257 = 65535, exact
    if prob.dtype == np.uint16:
        return prob
    if prob.dtype == bool:
        return prob.astype(np.uint16) * np.uint16(LEVELS - 1)
    if prob.dtype.kind in "iu":
        return np.clip(prob, 0, LEVELS - 1).astype(np.uint16)
    scaled = np.clip(prob.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(LEVELS - 1)
    return np.rint(scaled).astype(np.uint16)


def binarize_prediction(
    image: np.ndarray, *, threshold: float = 0.5, binary: bool | None = None
) -> tuple[np.ndarray, bool]:
    """A predicted image ``[H, W]`` (any shape) as a bool ink mask; returns (mask, was_binary).

    binary: None detects the kind: bool images, integers holding only {0, 1} or {0, full
        scale} (255 for 8-bit, 65535 for 16-bit), and floats holding only {0, 1} are binary and
        used as is (nonzero = ink); anything else is a probability image (8-bit /255, 16-bit
        /65535, float in [0, 1]) thresholded as ``prob >= threshold``. False always
        thresholds (use it for pieces of a probability map, where an all-{0, 1} 8-bit piece
        would otherwise read as binary); True always takes nonzero as ink.
    Raises InputError for negative values, floats above 1 or NaN, and integers above 65535.
    """
    check_threshold(threshold)
    img = np.asarray(image)
    if img.dtype == bool:
        return img, True
    if img.dtype.kind in "iu":
        lo, hi = int(img.min(initial=0)), int(img.max(initial=0))
        if lo < 0 or hi > LEVELS - 1:
            raise InputError(f"pred: expected 8- or 16-bit values, got range [{lo}, {hi}]")
        full = 255 if img.dtype == np.uint8 else LEVELS - 1
        if binary is None:
            binary = hi <= 1 or (hi == full and bool(np.all((img == 0) | (img == full))))
        if binary:
            return img != 0, True
        if img.dtype != np.uint8:
            img = img.astype(np.uint16)
        return levels(img) >= _threshold_level(threshold), False
    if img.dtype.kind == "f":
        nan = bool(np.isnan(img).any())
        lo, hi = float(np.nanmin(img, initial=0.0)), float(np.nanmax(img, initial=0.0))
        if nan or lo < 0.0 or hi > 1.0:
            raise InputError(f"pred: expected probabilities in [0, 1], got range [{lo}, {hi}]"
                             + (" with NaN" if nan else ""))
        if binary is None:
            binary = bool(np.all((img == 0) | (img == 1)))
        if binary:
            return img != 0, True
        return levels(img) >= _threshold_level(threshold), False
    raise InputError(f"pred: expected a bool, integer or float image, got dtype {img.dtype}")


class ProbabilityHistogram:
    """Streaming histogram of predicted probabilities, split by truth, for threshold search.

    Holds two counts per 16-bit level (ink pixels, background pixels) inside the valid mask:
    1 MB whatever the number of pixels, additive over tiles and fragments (``a + b``), and
    enough to give exact confusion counts at any threshold (:meth:`counts_at`).
    """

    def __init__(self) -> None:
        self.ink = np.zeros(LEVELS, dtype=np.int64)
        self.background = np.zeros(LEVELS, dtype=np.int64)

    def add(self, prob: ArrayLike, target: ArrayLike | None,
            valid: ArrayLike | None = None) -> None:
        """Count probabilities ``prob`` (float in [0, 1], or uint8/uint16 images) against the
        binary ``target``; same shape, any rank; pixels outside ``valid`` are skipped.
        ``target`` None: no truth (every pixel counted as background), for statistics of the
        probabilities alone (:func:`expected_threshold`)."""
        p = _numpy(prob, "prob")
        t = None if target is None else as_bool(_numpy(target, "target"))
        v = None if valid is None else as_bool(_numpy(valid, "valid"))
        _check_shapes(prob=p, target=t, valid=v)
        p = p.reshape(-1)  # (n,)
        t = None if t is None else t.reshape(-1)
        v = None if v is None else v.reshape(-1)
        for start in range(0, p.size, _CHUNK):
            stop = start + _CHUNK
            if p.dtype.kind == "f" and np.isnan(p[start:stop]).any():
                raise InputError("prob: expected probabilities in [0, 1], got NaN")
            index = levels(p[start:stop]).astype(np.int64) * 2  # 2 * level + ink
            if t is not None:
                index += t[start:stop]
            if v is not None:
                index = index[v[start:stop]]
            h = np.bincount(index, minlength=2 * LEVELS)  # (2 * LEVELS,)
            self.background += h[0::2]
            self.ink += h[1::2]

    def __add__(self, other: ProbabilityHistogram) -> ProbabilityHistogram:
        out = ProbabilityHistogram()
        out.ink, out.background = self.ink + other.ink, self.background + other.background
        return out

    def counts_at(self, thresholds: Sequence[float] | np.ndarray) -> list[Counts]:
        """Confusion counts when ``prob >= t`` is predicted as ink, for each threshold t."""
        ink_ge = np.concatenate([np.cumsum(self.ink[::-1])[::-1], [0]])  # pixels at level >= k
        bg_ge = np.concatenate([np.cumsum(self.background[::-1])[::-1], [0]])
        n_ink, n_bg = int(ink_ge[0]), int(bg_ge[0])
        out = []
        for t in thresholds:
            check_threshold(float(t))
            k = _threshold_level(float(t))
            tp, fp = int(ink_ge[k]), int(bg_ge[k])
            out.append(Counts(tp, fp, n_ink - tp, n_bg - fp))
        return out

@dataclass(frozen=True)
class ThresholdSearch:
    """Result of :func:`search_threshold`: the best threshold, its score and pooled counts,
    and the whole curve (``thresholds`` and ``scores``, one entry each)."""

    threshold: float
    score: float
    counts: Counts
    thresholds: np.ndarray
    scores: np.ndarray


def search_threshold(
    histograms: ProbabilityHistogram | Sequence[ProbabilityHistogram],
    *,
    thresholds: Sequence[float] | np.ndarray | None = None,
    beta: float = 0.5,
) -> ThresholdSearch:
    """The threshold maximising F-beta (F0.5) over validation predictions, all fragments'
    pixels counted together (each histogram is one fragment).

    Candidates: ``thresholds`` (default :data:`DEFAULT_THRESHOLDS`). Ties go to the lowest
    threshold. Cost: O(levels) per candidate.
    """
    pooled, cand = _pooled(histograms), _candidates(thresholds)
    pooled_counts = pooled.counts_at(cand)
    scores = np.array([c.f_beta(beta) for c in pooled_counts])
    best = int(np.argmax(scores))
    return ThresholdSearch(float(cand[best]), float(scores[best]), pooled_counts[best], cand,
                           scores)


def expected_threshold(
    histograms: ProbabilityHistogram | Sequence[ProbabilityHistogram],
    *,
    thresholds: Sequence[float] | np.ndarray | None = None,
    beta: float = 0.5,
) -> float:
    """The threshold maximising the F-beta that the probabilities themselves expect, labels
    unused: reading each pixel's probability p as its chance of being ink, thresholding at t
    expects TP = sum of p over p >= t, FP = sum of (1 - p) there and FN = sum of p below t,
    and t is chosen to maximise (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP) (the plug-in
    rule of F-measure optimisation). It needs no truth, so it can be computed on any
    fragment; where the model is less sure of the ink than on its validation data (fainter or
    unfamiliar ink), it moves down with the probabilities. Candidates and ties as in
    :func:`search_threshold`; both histogram counts (ink and background) are pooled.
    """
    pooled, cand = _pooled(histograms), _candidates(thresholds)
    count = (pooled.ink + pooled.background).astype(np.float64)  # pixels per level (LEVELS,)
    p = np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1)
    ink_ge = np.concatenate([np.cumsum((count * p)[::-1])[::-1], [0.0]])  # sum p, level >= k
    n_ge = np.concatenate([np.cumsum(count[::-1])[::-1], [0.0]])  # pixels at level >= k
    for t in cand:
        check_threshold(float(t))
    k = np.array([_threshold_level(float(t)) for t in cand])  # (candidates,)
    tp = ink_ge[k]
    fp, fn = n_ge[k] - tp, ink_ge[0] - tp
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    expected = np.divide((1 + b2) * tp, den, out=np.zeros_like(tp), where=den > 0)
    return float(cand[int(np.argmax(expected))])


def _pooled(histograms: ProbabilityHistogram | Sequence[ProbabilityHistogram]
            ) -> ProbabilityHistogram:
    """One histogram, or the sum of several (all their pixels counted together)."""
    hists = [histograms] if isinstance(histograms, ProbabilityHistogram) else list(histograms)
    if not hists:
        raise InputError("histograms: expected at least one ProbabilityHistogram, got none")
    return sum(hists[1:], hists[0])


def _candidates(thresholds: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Candidate thresholds (default :data:`DEFAULT_THRESHOLDS`), sorted and unique, so ties
    resolve to the lowest."""
    cand = np.unique(np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, float))
    if cand.size == 0:
        raise InputError("thresholds: expected at least one candidate, got none")
    return cand
