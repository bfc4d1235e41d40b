"""OME-NGFF ``multiscales`` metadata: write it on a Zarr group, read level 0 and its axes back.

OME-Zarr images are Zarr groups whose attributes list the arrays of a resolution pyramid,
full resolution first. Where the metadata lives depends on the NGFF version:

    0.4   zarr v2 group, ``.zattrs``:     {"multiscales": [{"version": "0.4", "axes": ..., ...}]}
    0.5   zarr v3 group, ``zarr.json``:   {"ome": {"version": "0.5", "multiscales": [{...}]}}

Axes are dicts ``{"name": "z", "type": "space"}`` (0.4 / 0.5); 0.3 listed bare names and 0.1 /
0.2 had no axes at all (always ``t, c, z, y, x``). :func:`read_multiscales` understands all of
them; :func:`write_multiscales` writes 0.4 or 0.5. This module knows nothing about fragments:
input volumes (:mod:`scrollsam.data.zarr_volume`) and output maps can both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

VERSIONS = ("0.4", "0.5")
_AXIS_TYPES = {"x": "space", "y": "space", "z": "space", "c": "channel", "t": "time"}
_OLD_AXES = ("t", "c", "z", "y", "x")  # NGFF 0.1 / 0.2: always five dimensions


@dataclass(frozen=True)
class Multiscales:
    """What a reader needs from ``multiscales[0]``: the NGFF version, the axis names in array
    order and the dataset paths, full resolution first."""

    version: str
    axes: tuple[str, ...]
    paths: tuple[str, ...]


def write_multiscales(
    group: Any,
    *,
    axes: Sequence[str],
    scales: Sequence[Sequence[float]],
    paths: Sequence[str] | None = None,
    translations: Sequence[Sequence[float]] | None = None,
    name: str | None = None,
    downscale: str | None = None,
    version: str = "0.4",
) -> None:
    """Set the OME-NGFF ``multiscales`` attribute of a zarr ``group`` (v2 for 0.4, v3 for 0.5).

    ``axes`` names each array dimension in order (e.g. ``("z", "y", "x")``, ``("y", "x")``);
    ``scales[i]`` is level i's voxel size per axis in level-0 voxels (``[1, 2, 2]`` for a level
    halved in y and x); ``translations[i]`` (optional) is the position of level i's first voxel
    centre in level-0 voxels (``[0, 0.5, 0.5]`` for a 2 x 2 mean); ``paths`` defaults to
    ``"0", "1", ...``; ``downscale`` names the method (NGFF ``type``, e.g. ``"mean"``). The
    arrays themselves are the caller's to write.
    """
    if version not in VERSIONS:
        raise ValueError(f"version: expected one of {VERSIONS}, got {version!r}")
    paths = [str(i) for i in range(len(scales))] if paths is None else list(paths)
    if len(paths) != len(scales) or not scales:
        raise ValueError(f"scales / paths: expected one scale per level, got {len(scales)} "
                         f"scales for {len(paths)} paths")
    if translations is not None and len(translations) != len(scales):
        raise ValueError(f"translations: expected one per level ({len(scales)}), got "
                         f"{len(translations)}")
    for s in [*scales, *(translations or [])]:
        if len(s) != len(axes):
            raise ValueError(f"scales / translations: expected {len(axes)} numbers per level, "
                             f"got {list(s)}")
    entry: dict[str, Any] = {
        "axes": [{"name": a, "type": _AXIS_TYPES[a]} if a in _AXIS_TYPES else {"name": a}
                 for a in axes],
        "datasets": [
            {"path": p, "coordinateTransformations": _transforms(s, translations, i)}
            for i, (p, s) in enumerate(zip(paths, scales, strict=True))
        ],
    }
    if name is not None:
        entry["name"] = name
    if downscale is not None:
        entry["type"] = downscale
    if version == "0.4":
        group.attrs["multiscales"] = [{"version": version, **entry}]
    else:
        group.attrs["ome"] = {"version": version, "multiscales": [entry]}


def read_multiscales(attrs: Mapping[str, Any]) -> Multiscales | None:
    """``multiscales[0]`` of a group's attributes (any NGFF version), or None when the group has
    no multiscales metadata. Malformed metadata raises ValueError with a short reason."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:  # 0.5 and later
        listed, version = ome["multiscales"], str(ome.get("version", "?"))
    elif "multiscales" in attrs:  # 0.4 and earlier
        listed, version = attrs["multiscales"], None
    else:
        return None
    if not isinstance(listed, Sequence) or not listed or not isinstance(listed[0], Mapping):
        raise ValueError("multiscales: expected a non-empty list of images")
    first = listed[0]
    version = version or str(first.get("version", "?"))
    datasets = first.get("datasets")
    if not isinstance(datasets, Sequence) or not datasets:
        raise ValueError("multiscales[0].datasets: expected a non-empty list")
    paths = []
    for d in datasets:
        if not isinstance(d, Mapping) or not isinstance(d.get("path"), str):
            raise ValueError(f"multiscales[0].datasets: expected entries with a path, got {d!r}")
        paths.append(d["path"])
    raw = first.get("axes")
    if raw is None:
        axes = _OLD_AXES
    elif isinstance(raw, Sequence):
        axes = tuple(str(a.get("name")) if isinstance(a, Mapping) else str(a) for a in raw)
    else:
        raise ValueError(f"multiscales[0].axes: expected a list, got {raw!r}")
    return Multiscales(version=version, axes=axes, paths=tuple(paths))


def _transforms(scale: Sequence[float], translations: Sequence[Sequence[float]] | None,
                level: int) -> list[dict[str, Any]]:
    """A dataset's coordinateTransformations: its scale, then its translation if given."""
    out: list[dict[str, Any]] = [{"type": "scale", "scale": [float(v) for v in scale]}]
    if translations is not None:
        out.append({"type": "translation",
                    "translation": [float(v) for v in translations[level]]})
    return out
