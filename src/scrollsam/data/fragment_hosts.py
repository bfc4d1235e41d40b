"""Which folders are fragment folders: those whose volume :class:`~scrollsam.data.fragment.
Fragment` would read, a slice folder that holds a TIFF (``surface_volume/``, ``layers/``) or a
Zarr store with its metadata (``surface_volume.zarr``, ``layers.zarr``).

Output checks use it so that nothing is written into data: ``predict --out`` and a training run
dir (:mod:`scrollsam.infer.out_safety`, :mod:`scrollsam.train.rundir`). It imports no array
library (zarr's import starts a native thread, which the training process should not carry).
"""

from __future__ import annotations

import os
from pathlib import Path

from scrollsam.data.fragment import SLICE_DIRS, ZARR_STORES

__all__ = ["VolumeHosts", "fragment_holding"]


class VolumeHosts:
    """Which folders hold a fragment volume, each folder asked once."""

    def __init__(self) -> None:
        self._volume: dict[Path, str | None] = {}

    def volume(self, folder: Path) -> str | None:
        """The name of the fragment volume in ``folder`` (``layers/``, ``surface_volume.zarr``,
        ...), tested as :class:`~scrollsam.data.fragment.Fragment` finds it; None without one."""
        if folder not in self._volume:
            found = [f"{name}/" for name in SLICE_DIRS.values() if _holds_tiffs(folder / name)]
            found += [name for name in ZARR_STORES.values() if _is_store(folder / name)]
            self._volume[folder] = found[0] if found else None
        return self._volume[folder]

    def host(self, real: Path) -> tuple[Path, str] | None:
        """(folder, its volume's name) of the nearest fragment folder that is the resolved
        folder ``real`` or holds it; None when there is none."""
        for folder in (real, *real.parents):
            volume = self.volume(folder)
            if volume is not None:
                return folder, volume
        return None


def _holds_tiffs(folder: Path) -> bool:
    """``folder`` is a folder with a TIFF in it: a slice folder, not a ``layers/`` package of
    some Python project (stops at the first TIFF)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith((".tif", ".tiff")) for e in entries)
    except OSError:  # not a folder, or not readable
        return False


def _is_store(path: Path) -> bool:
    """``path`` is a Zarr store: a folder with v2 (``.zarray`` / ``.zgroup``) or v3
    (``zarr.json``) metadata at its root."""
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def fragment_holding(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(folder, its volume's name) of the nearest fragment folder that is ``path`` (resolved;
    it need not exist) or holds it, by the volume :class:`Fragment` would read; None when no
    folder on the way up holds a volume."""
    return VolumeHosts().host(Path(path).resolve())
