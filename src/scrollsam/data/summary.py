"""What `scrollsam inspect` reports about a fragment: a JSON-ready dict and its text form.

The seed's "pixel stats" as a tool: sizes, dtype, size on disk, mask coverage, ink fraction, and
per-slice statistics inside the mask, with the ink-versus-background contrast of each slice that
shows which slices carry the ink signal. Statistics are sampled (see :mod:`.stats`), so this is
quick on fragments of any size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import compute_stats, dead_slices, slice_contrast

# How many times the chance contrast (the labels moved, SliceContrast.chance) the peak
# |contrast| must reach for inspect to name an ink band: twice what texture and sampling give.
SIGNAL_OVER_CHANCE = 2.0


def describe(fragment: Fragment, *, seed: int = 0) -> dict[str, Any]:
    """Summary of ``fragment`` as a JSON-serialisable dict (keys as in the `inspect --json`
    output: path, id, layout, store, volume, height, width, depth, dtype, compression,
    memory_mapped, chunks, bytes_on_disk, mask_coverage, has_labels, has_ir, ink_fraction, ir,
    sampled_pixels, slices [{z, file, mean, std, contrast}], chance_contrast (what the labels
    give when moved just past their own pattern, :class:`.stats.SliceContrast`), ink_band
    ([first, last] slice of the ink signal; None when no slice's |contrast| reaches
    :data:`SIGNAL_OVER_CHANCE` times chance), dead_slices: the slices holding one value inside
    the mask, :func:`.stats.dead_slices`).

    ``store`` is "tiff", "zarr" or "ome-zarr"; ``volume`` names the slice folder or store and,
    for Zarr, what it is (``surface_volume.zarr: Zarr v2 array``); ``chunks`` is the Zarr chunk
    shape (z, y, x) or None; a slice's ``file`` is None for Zarr volumes."""
    mask = fragment.mask()
    labels = fragment.labels()
    stats = compute_stats(fragment, rng=np.random.default_rng(seed))
    contrast = slice_contrast(fragment, rng=np.random.default_rng(seed + 1))
    inside = int(np.count_nonzero(mask))
    ink_fraction = None
    if labels is not None and inside:
        ink_fraction = np.count_nonzero(labels & mask) / inside
    slices = []
    names = [p.name for p in fragment.slice_paths] or [None] * fragment.depth
    for z, name in enumerate(names):
        slices.append({
            "z": z, "file": name,
            "mean": round(stats.slice_mean[z], 3), "std": round(stats.slice_std[z], 3),
            "contrast": None if contrast is None else round(contrast.contrast[z], 4),
        })
    zi = fragment.zarr_info
    if zi is None:
        infos = fragment.slice_infos
        volume = f"{fragment.volume_path.name}/"
        compression, mapped = sorted({i.compression for i in infos}), all(
            i.memmappable for i in infos)
    else:
        volume = f"{fragment.volume_path.name}: {zi.description}"
        compression, mapped = [zi.codec], False
    return {
        "path": str(fragment.path),
        "id": fragment.id,
        "layout": fragment.layout,
        "store": fragment.store,
        "volume": volume,
        "height": fragment.height,
        "width": fragment.width,
        "depth": fragment.depth,
        "dtype": fragment.dtype.name,
        "compression": compression,
        "memory_mapped": mapped,
        "chunks": None if zi is None else list(zi.chunks),
        "bytes_on_disk": fragment.bytes_on_disk,
        "mask_coverage": inside / (fragment.height * fragment.width),
        "has_labels": labels is not None,
        "has_ir": fragment.ir_path is not None,
        "ink_fraction": ink_fraction,
        "ir": None if stats.ir_mean is None else {"mean": stats.ir_mean, "std": stats.ir_std},
        "sampled_pixels": stats.pixels,
        "slices": slices,
        "chance_contrast": None if contrast is None else round(contrast.chance, 4),
        "ink_band": _ink_band(contrast.contrast, contrast.chance) if contrast is not None else None,
        "dead_slices": [int(z) for z in np.flatnonzero(dead_slices(stats.slice_std))],
    }


def format_description(d: dict[str, Any]) -> str:
    """Human-readable text of a :func:`describe` dict."""
    first, last = d["slices"][0]["file"], d["slices"][-1]["file"]
    codec = "/".join(d["compression"]).lower().replace("none", "uncompressed")
    if d["chunks"] is None:
        volume = f"{d['volume']}{first}..{last}"
        read = "memory-mapped" if d["memory_mapped"] else "read by strip / tile"
    else:
        volume = d["volume"]
        read = "read by chunk, chunks " + " x ".join(str(c) for c in d["chunks"]) + " (z, y, x)"
    lines = [
        f"fragment {d['id']} ({d['path']})",
        f"  layout      {d['layout']} ({volume})",
        f"  size        {d['height']} x {d['width']} x {d['depth']} (height x width x depth), "
        f"{d['dtype']}, {codec} ({read})",
        f"  on disk     {_bytes(d['bytes_on_disk'])}",
        f"  mask        {d['mask_coverage']:.1%} of the image",
    ]
    if d["ink_fraction"] is not None:
        lines.append(f"  ink         {d['ink_fraction']:.2%} of the mask")
    else:
        lines.append("  ink         no ink labels")
    if d["ir"] is not None:
        lines.append(f"  ir.png      mean {d['ir']['mean']:.1f}, std {d['ir']['std']:.1f} "
                     "inside the mask")
    else:
        lines.append("  ir.png      absent")
    lines.append(f"  per-slice statistics inside the mask ({d['sampled_pixels']} sampled pixels "
                 "per slice; contrast = ink minus background, in pooled std):")
    has_contrast = d["slices"][0]["contrast"] is not None
    header = "      z  file            mean        std"
    lines.append(header + ("  contrast" if has_contrast else ""))
    peak = max((abs(s["contrast"]) for s in d["slices"]), default=0.0) if has_contrast else 0.0
    for s in d["slices"]:
        row = f"  {s['z']:5d}  {s['file'] or '-':<10} {s['mean']:10.1f} {s['std']:10.1f}"
        if has_contrast:
            bar = "#" * round(20 * abs(s["contrast"]) / peak) if peak > 0 else ""
            row += f"  {s['contrast']:+8.3f} {bar}"
        lines.append(row)
    if d["dead_slices"]:
        lines.append(f"  dead slices {', '.join(map(str, d['dead_slices']))}: one value inside "
                     f"the mask (blank, missing or saturated); profile views and align: sheet "
                     f"leave them out, other views read them as they are")
    chance = d["chance_contrast"]
    if d["ink_band"] is not None:
        z0, z1 = d["ink_band"]
        lines.append(f"  ink signal  strongest in slices {z0}..{z1} (|contrast| at least half "
                     f"its peak, {peak:.3f}; the labels moved elsewhere on the fragment give "
                     f"{chance:.3f})")
    elif chance is not None:  # contrast measured, no band
        lines.append(f"  ink signal  none that stands out: the largest |contrast|, {peak:.3f}, is "
                     f"not {SIGNAL_OVER_CHANCE:g} times what the labels moved elsewhere on the "
                     f"fragment give ({chance:.3f}); fibres, drift or noise alone reach it")
    return "\n".join(lines)


def _ink_band(contrast: tuple[float, ...], chance: float) -> list[int] | None:
    """[first, last] slice whose |contrast| is at least half the peak (the ink-carrying band);
    None unless the peak is at least SIGNAL_OVER_CHANCE times ``chance``."""
    c = np.abs(np.asarray(contrast))
    if c.size == 0 or not np.isfinite(c).all() or c.max() <= 0:
        return None
    if c.max() < SIGNAL_OVER_CHANCE * chance:
        return None
    strong = np.flatnonzero(c >= c.max() / 2)
    return [int(strong[0]), int(strong[-1])]


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
