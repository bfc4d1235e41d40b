"""Validation's probability histogram counted on the GPU, where the probabilities are.

:class:`~scrollsam.metrics.ProbabilityHistogram` counts on the host with numpy: each batch's
probabilities are copied back and binned on one core while the GPU, whose prompt-free forward
of the batch is far shorter, waits (``make bench`` entry ``validation_histogram_1024``; the
numbers are in ``benchmarks/README.md``). On CUDA,
:class:`DeviceHistogram` bins each batch where it was predicted (``torch.bincount``; one small
wait for the device a batch, as the copy back was) and hands the counts to the host once, at the
end. Its levels are numpy's exactly: probabilities clamped to [0, 1], times 65535 in float32,
rounded half to even.
"""

from __future__ import annotations

import numpy as np
import torch

from scrollsam.errors import InputError
from scrollsam.metrics import LEVELS, ProbabilityHistogram


class DeviceHistogram:
    """Counts of 16-bit probability levels by truth (ink / background) inside the valid mask,
    kept on the device of the probabilities; :meth:`histogram` gives the host's
    :class:`ProbabilityHistogram` of the same counts."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # (2 * LEVELS,) int64: bin 2 * level + ink

    def add(self, prob: torch.Tensor, ink: torch.Tensor, valid: torch.Tensor) -> None:
        """Count ``prob`` (float in [0, 1]) against ``ink`` and ``valid`` (bool), all of one
        shape, any rank, on the device of ``prob`` (moved there if not); pixels outside
        ``valid`` are skipped. The same call as :meth:`ProbabilityHistogram.add`."""
        if not (prob.shape == ink.shape == valid.shape):
            raise InputError(f"prob, ink and valid: expected one shape, got {tuple(prob.shape)}, "
                             f"{tuple(ink.shape)} and {tuple(valid.shape)}")
        ink, valid = ink.to(prob.device), valid.to(prob.device)
        p = prob.detach().float().reshape(-1)  # (n,)
        if torch.isnan(p).any():  # as the host's histogram refuses it
            raise InputError("prob: expected probabilities in [0, 1], got NaN")
        level = torch.round(p.clamp(0.0, 1.0) * float(LEVELS - 1)).long()  # (n,) 0..65535
        # pixels outside the valid mask go to one more bin, dropped below (no sync to select)
        index = torch.where(valid.reshape(-1), level * 2 + ink.reshape(-1).long(), 2 * LEVELS)
        counts = torch.bincount(index, minlength=2 * LEVELS + 1)[:2 * LEVELS]
        self._counts = counts if self._counts is None else self._counts + counts

    def histogram(self) -> ProbabilityHistogram:
        """The counts so far on the host (one copy)."""
        hist = ProbabilityHistogram()
        if self._counts is not None:
            counts = self._counts.cpu().numpy().astype(np.int64)
            hist.background, hist.ink = counts[0::2].copy(), counts[1::2].copy()
        return hist
