"""Validation's probability histogram on the CPU: numpy (what the host does) vs torch.bincount.

``validation_histogram_1024``: one batch of 32 probability maps of 1024 x 1024 with ink and
valid masks, counted into 16-bit levels by truth. Baseline: :class:`ProbabilityHistogram`'s
numpy counts, what validation runs on a CPU, and ran on a GPU's host for every batch before
:class:`scrollsam.train.histogram.DeviceHistogram`; ours: ``DeviceHistogram`` on the same CPU
tensors. It measures the host work a GPU run no longer does (``baseline_s``), and why a CPU run
keeps numpy (a ratio below 1).
"""

from __future__ import annotations

from typing import Any

import torch
from common import compare, register


@register("validation_histogram_1024", goal=None,
          about="validation histogram of 32 x 1024 x 1024 probabilities on the CPU: numpy vs "
                "torch.bincount (the GPU path's counting)")
def validation_histogram_1024(quick: bool) -> dict[str, Any]:
    from scrollsam.metrics import ProbabilityHistogram
    from scrollsam.train.histogram import DeviceHistogram

    tiles = 8 if quick else 32
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(tiles, 1024, 1024, generator=gen)  # (T, S, S)
    ink = torch.rand(tiles, 1024, 1024, generator=gen) > 0.7
    valid = torch.ones(tiles, 1024, 1024, dtype=torch.bool)
    result = compare(lambda: ProbabilityHistogram().add(prob.numpy(), ink.numpy(), valid.numpy()),
                     lambda: DeviceHistogram().add(prob, ink, valid),
                     repeats=2 if quick else 4)
    result["metrics"] = {"ns_per_pixel_numpy": result["baseline_s"] / prob.numel() * 1e9}
    result["settings"] = {"tiles": tiles, "size": 1024, "levels": 65536}
    return result
