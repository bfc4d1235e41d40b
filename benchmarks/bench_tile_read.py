"""tile_read_vs_full_slice: read a training tile's window, or decode whole slices per sample.

A synthetic 4096 x 4096 x 16 fragment (uint16, uncompressed, 512 MB; 2048 x 2048 with --quick)
is written once with :func:`scrollsam.data.synthetic.write_fragment` into ``benchmarks/_work/``
and reused by later runs. Each timed call reads the same 4 random 256 x 256 windows over all 16
slices (the ``slices/range`` view's band): the baseline with ``tifffile.imread`` of every slice,
cropped afterwards (the seed's way); ours with ``Fragment.read``, which touches only the window's
rows and columns. Both read through the OS page cache after the warm-up, so the ratio measures
decoding, not the disk. 7 timed repeats after one warm-up (2 with --quick).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from common import compare, needs_modules, register, synthetic_fragment

TILE = 256
SAMPLES = 4  # windows per timed call


@register(
    "tile_read_vs_full_slice",
    goal=20,
    about="256 px x 16-slice training windows: Fragment.read vs tifffile.imread of whole slices",
    needs=needs_modules("scrollsam.data.fragment", "scrollsam.data.synthetic"),
)
def tile_read_vs_full_slice(quick: bool) -> dict[str, Any]:
    import tifffile

    from scrollsam.data.fragment import Fragment

    side, depth = (2048, 16) if quick else (4096, 16)
    path = synthetic_fragment(side, side, depth)
    fragment = Fragment(path)
    rng = np.random.default_rng(0)
    corners = rng.integers(0, side - TILE, size=(SAMPLES, 2))  # (y0, x0) per window

    def full_slices() -> list[np.ndarray]:
        out = []
        for y0, x0 in corners:
            vol = np.stack([tifffile.imread(p)[y0:y0 + TILE, x0:x0 + TILE]
                            for p in fragment.slice_paths])  # (z, y, x)
            out.append(vol)
        return out

    def windows() -> list[np.ndarray]:
        return [fragment.read(0, depth, y0, y0 + TILE, x0, x0 + TILE) for y0, x0 in corners]

    same = all(np.array_equal(a, b) for a, b in zip(full_slices(), windows(), strict=True))
    if not same:
        raise RuntimeError("Fragment.read and tifffile.imread disagree on a window")
    result = compare(full_slices, windows, repeats=2 if quick else 7)
    fragment.close()
    result["settings"] = {"fragment": f"{side}x{side}x{depth}", "dtype": "uint16",
                          "compression": "none", "tile": TILE, "slices": depth,
                          "windows_per_call": SAMPLES, "page_cache": "warm"}
    return result
