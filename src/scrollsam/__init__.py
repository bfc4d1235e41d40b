"""scrollsam: fine-tune Segment Anything to find ink in x-ray scans of the Herculaneum scrolls.

The public API is imported lazily so that `scrollsam --help` does not pay for importing torch::

    from scrollsam import build_model
    model = build_model("vit_b", checkpoint="sam_vit_b_01ec64.pth", image_size=256, in_chans=3)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "scrollsam.model.build",
    "SamSegmenter": "scrollsam.model.segmenter",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scrollsam' has no attribute {name!r}")
