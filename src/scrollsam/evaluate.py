"""Scoring whole files, as ``scrollsam evaluate`` and ``scrollsam predict`` do.

A predicted image (a binary mask, or probabilities as 8-bit /255, 16-bit /65535 or float in
[0, 1]) is compared with an ink label image inside an optional fragment mask; all are ``[H, W]``
of one size. Labels and mask must be binary, encoded as the fragment reader takes them (0/1,
0/255 or 0/65535, grey or RGB with equal channels; :func:`~scrollsam.data.fragment.binary_image`):
a grey photo or an x-ray slice given by mistake is an error, not a score. The pixel rules are
those of :mod:`scrollsam.metrics`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scrollsam.data.fragment import binary_image
from scrollsam.errors import FragmentError, InputError
from scrollsam.io import read_image
from scrollsam.metrics import Counts, binarize_prediction, check_threshold, confusion

log = logging.getLogger(__name__)

# evaluate --as: how the predicted image is read (binarize_prediction's ``binary``)
KINDS: dict[str, bool | None] = {"auto": None, "mask": True, "prob": False}

__all__ = ["Evaluation", "evaluate_files", "read_prediction"]


@dataclass(frozen=True)
class Evaluation:
    """Scores of one predicted image against its labels (see :func:`evaluate_files`)."""

    counts: Counts
    threshold: float | None  # None when the prediction was already binary
    beta: float = 0.5

    def to_dict(self) -> dict[str, float | int | None]:
        """``f0.5, precision, recall, dice, iou``, the counts, valid pixel count, threshold."""
        return {**self.counts.scores(beta=self.beta), **self.counts.as_dict(),
                "valid_pixels": self.counts.pixels, "threshold": self.threshold}

    def report(self) -> str:
        """A few aligned lines for people."""
        lines = [f"{k:<10} {v:.4f}" for k, v in self.counts.scores(beta=self.beta).items()]
        c = self.counts
        how = "binary" if self.threshold is None else f"probability >= {self.threshold:g}"
        lines.append(f"pixels     tp={c.tp} fp={c.fp} fn={c.fn} tn={c.tn} "
                     f"(valid {c.pixels}; prediction {how})")
        return "\n".join(lines)


def evaluate_files(
    pred: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    mask: str | os.PathLike[str] | None = None,
    *,
    threshold: float = 0.5,
    beta: float = 0.5,
    kind: str = "auto",
) -> Evaluation:
    """Score a predicted image (binary mask or probabilities, see :func:`binarize_prediction`)
    against a binary ink label image, inside ``mask`` (nonzero pixels, as training and predict
    read mask.png; default all pixels). All images are ``[H, W]`` of one size; a mismatch,
    labels that are not binary, or a mask without a valid pixel, raise InputError naming the
    file. ``kind``: ``auto`` tells a mask from probabilities by its values (an 8- or 16-bit
    image of 0s and 1s alone is a mask, with a warning: a probability image of a model that
    found no ink reads the same), ``mask`` takes nonzero as ink, ``prob`` thresholds."""
    check_threshold(threshold)
    if kind not in KINDS:
        raise InputError(f"--as: expected one of {', '.join(KINDS)}, got {kind}")
    truth = _read_binary(labels, "--labels")
    binary, was_binary = read_prediction(pred, threshold=threshold, binary=KINDS[kind])
    if binary.shape != truth.shape:
        raise InputError(f"{pred}: expected {_hw(truth.shape)} pixels (height x width of "
                         f"{labels}), got {_hw(binary.shape)}")
    valid = None
    if mask is not None:
        valid = read_image(mask) != 0  # as the fragment reader takes mask.png: nonzero inside
        if valid.shape != truth.shape:
            raise InputError(f"{mask}: expected {_hw(truth.shape)} pixels (height x width "
                             f"of {labels}), got {_hw(valid.shape)}")
        if not valid.any():  # every score would be 0/0: refuse rather than report 1.0
            raise InputError(f"no valid pixels to score: the mask is all zero ({mask})")
    return Evaluation(confusion(binary, truth, valid), None if was_binary else threshold, beta)


def read_prediction(
    path: str | os.PathLike[str], *, threshold: float = 0.5, binary: bool | None = None
) -> tuple[np.ndarray, bool]:
    """Read a predicted image and make it a bool ink mask ``[H, W]``: (mask, was_binary), as
    :func:`binarize_prediction` (``binary``: None detects); errors name the file."""
    image = read_image(path)
    try:
        out = binarize_prediction(image, threshold=threshold, binary=binary)
    except InputError as err:
        raise InputError(f"{path}: {str(err).removeprefix('pred: ')}") from None
    if binary is None and out[1] and image.dtype.kind in "iu" and int(image.max(initial=0)) == 1:
        log.warning("%s: values 0 and 1 only, read as a mask (1 = ink); a probability image "
                    "reads the same where no pixel reaches 1/255: add --as prob to threshold "
                    "it", path)
    return out


def _read_binary(path: str | os.PathLike[str], flag: str) -> np.ndarray:
    """A label image as bool ``[H, W]``, by the fragment reader's rule."""
    try:
        return binary_image(read_image(path), Path(path), what=f"{flag}:")
    except FragmentError as err:
        raise InputError(str(err)) from None


def _hw(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)
