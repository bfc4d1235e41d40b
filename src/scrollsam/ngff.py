"""OME-NGFF ``multiscales`` metadata: write it on a Zarr group, read level 0 and its axes back.

OME-Zarr images are Zarr groups whose attributes list the arrays of a resolution pyramid,
full resolution first. Where the metadata lives depends on the NGFF version:

    0.4   zarr v2 group, ``.zattrs``:     {"multiscales": [{"version": "0.4", "axes": ..., ...}]}
    0.5   zarr v3 group, ``zarr.json``:   {"ome": {"version": "0.5", "multiscales": [{...}]}}

Axes are dicts ``{"name": "z", "type": "space"}`` (0.4 / 0.5); 0.3 listed bare names and 0.1 /
0.2 had no axes at all (always ``t, c, z, y, x``). :func:`read_multiscales` understands all of
them; :func:`write_multiscales` writes 0.4 or 0.5 through ``ome_zarr``. This module
knows nothing about fragments: input volumes (:mod:`scrollsam.data.zarr_volume`), converted
volumes (:mod:`scrollsam.data.convert`) and predicted maps (:mod:`scrollsam.infer.zarr_out`)
all use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
) -> None:
    """Set the OME-NGFF ``multiscales`` metadata of a zarr ``group``: NGFF 0.4 on a zarr v2
    group, 0.5 on a v3 group, written by ``ome_zarr`` (the one writer of scrollsam's
    OME-Zarr stores: converted volumes and predicted maps).

    ``axes`` names each array dimension in order (e.g. ``("z", "y", "x")``, ``("y", "x")``);
    ``scales[i]`` is level i's voxel size per axis in level-0 voxels (``[1, 2, 2]`` for a level
    halved in y and x); ``translations[i]`` (optional) is the position of level i's first voxel
    centre in level-0 voxels (``[0, 0.5, 0.5]`` for a 2 x 2 mean); ``paths`` defaults to
    ``"0", "1", ...``; ``downscale`` names the method (NGFF ``type``, e.g. ``"mean"``). The
    arrays themselves are the caller's to write.
    """
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
    datasets = [{"path": p, "coordinateTransformations": _transforms(s, translations, i)}
                for i, (p, s) in enumerate(zip(paths, scales, strict=True))]
    from ome_zarr.format import FormatV04, FormatV05  # (reading volumes does not need it)

    with warnings.catch_warnings():  # ome_zarr 0.18 warns about its own Scaler at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata

    fmt = FormatV04() if group.metadata.zarr_format == 2 else FormatV05()
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=list(axes), name=name)
    if downscale is not None:  # NGFF's optional ``type``, which ome_zarr does not take
        if fmt.version == "0.4":
            listed = group.attrs["multiscales"]
            group.attrs["multiscales"] = [{**listed[0], "type": downscale}, *listed[1:]]
        else:
            ome = dict(group.attrs["ome"])
            ome["multiscales"] = [{**ome["multiscales"][0], "type": downscale},
                                  *ome["multiscales"][1:]]
            group.attrs["ome"] = ome


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
