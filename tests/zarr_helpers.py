"""Small TIFF fragments and their Zarr copies for the Zarr tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

from scrollsam.data.convert import convert_fragment
from scrollsam.data.synthetic import write_fragment

D, H, W = 6, 44, 58
CHUNKS = (4, 16, 16)


def tiff_pair(root: Path) -> dict[str, Path]:
    """{"kaggle": folder, "segment": folder}: the same D x H x W synthetic fragment in both
    layouts (kaggle ``frag/``, segment ``2023/`` with ``layers/`` and ``2023_mask.png``)."""
    kaggle = write_fragment(root / "kaggle" / "frag", height=H, width=W, depth=D, seed=3)
    seg = write_fragment(root / "segment" / "2023", height=H, width=W, depth=D, seed=3)
    (seg / "surface_volume").rename(seg / "layers")
    for name in ("mask", "inklabels"):
        (seg / f"{name}.png").rename(seg / f"{seg.name}_{name}.png")
    return {"kaggle": kaggle, "segment": seg}


def zarr_copy(tiff: Path, tmp_path: Path, fmt: str, zf: int) -> Path:
    """``tiff`` converted to ``fmt`` ("zarr" | "ome-zarr") on zarr v``zf`` with CHUNKS, into
    ``tmp_path/<fmt><zf>/<same name>``."""
    return convert_fragment(tiff, tmp_path / f"{fmt}{zf}" / tiff.name, format=fmt,
                            zarr_format=zf, chunks=CHUNKS)
