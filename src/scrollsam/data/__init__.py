"""Fragment data: validated lazy reading, synthetic fragments, input views, tiles and datasets.

    fragment.Fragment      a validated fragment folder read window by window, axes (z, y, x)
    formats / zarr_volume  TIFF slice and Zarr / OME-Zarr volume access behind Fragment
    convert                convert_fragment: a fragment copy with its volume as (OME-)Zarr
    synthetic              synth_fragments / write_fragment: realistic fake fragments
    views.make_view        a fragment window -> float32 [C, S, S] model input ("ir", "slices/...")
    stats                  per-fragment normalisation statistics (cached in the run dir)
    tiles                  tile windows inside the mask, spatial train / validation split
    dataset                TileDataset / make_datasets: CPU tensors image, label, valid
    summary                what `scrollsam inspect` prints

Names are imported lazily so that importing one part does not pay for the others (torch, cv2).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Fragment": "scrollsam.data.fragment",
    "convert_fragment": "scrollsam.data.convert",
    "synth_fragments": "scrollsam.data.synthetic",
    "write_fragment": "scrollsam.data.synthetic",
    "make_view": "scrollsam.data.views",
    "View": "scrollsam.data.views",
    "StatsCache": "scrollsam.data.stats",
    "Augment": "scrollsam.data.augment",
    "TileDataset": "scrollsam.data.dataset",
    "make_datasets": "scrollsam.data.dataset",
    "describe": "scrollsam.data.summary",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scrollsam.data' has no attribute {name!r}")
