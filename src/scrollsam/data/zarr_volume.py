"""Zarr / OME-Zarr fragment volumes: probe a store once, then read windows chunk by chunk.

A fragment folder may hold its volume as a Zarr store instead of a TIFF slice folder
(``surface_volume.zarr`` in the Kaggle layout, ``layers.zarr`` in the segment layout). The store
is either

- a **Zarr array** (zarr v2 or v3) of shape (z, y, x), uint8 or uint16 (either byte order); or
- an **OME-Zarr image**: a group with NGFF ``multiscales`` metadata (0.4 in ``.zattrs`` on
  zarr v2, 0.5 under ``ome`` in ``zarr.json`` on zarr v3, older versions too). Its level 0
  (``multiscales[0].datasets[0].path``) is read; the other levels are ignored. The axes must
  be ``z, y, x`` after dropping *leading* axes of size 1 (``t, c, z, y, x`` with t = c = 1
  reads as (z, y, x)); any other axis, order or size is refused.

Only local folders are read (zarr's ``LocalStore``, read-only). A window read asks zarr for
``array[z0:z1, y0:y1, x0:x1]``, which fetches and decodes exactly the chunks the window
touches. ``bytes_read`` counts the encoded bytes of those chunks as fetched from the store
(a chunk touched by two windows counts twice; chunks never written, which read as the fill
value, count 0; metadata documents are not counted). Every problem raises
:class:`~scrollsam.errors.FragmentError` naming the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scrollsam import ngff, zarr_tasks
from scrollsam.errors import FragmentError
from scrollsam.fs_errors import read_failure

log = logging.getLogger(__name__)

VOLUME_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
_OPEN_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)
_METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


@dataclass(frozen=True)
class ZarrInfo:
    """What the metadata of one volume store promises.

    ``path`` is the store folder, ``array_path`` the array inside it ("" for a bare array, the
    level-0 path of an OME-Zarr image), ``lead`` the number of size-1 leading axes dropped.
    ``shape`` and ``chunks`` are (z, y, x); ``dtype`` is native-order uint8 or uint16.
    """

    path: Path
    array_path: str
    kind: str  # "zarr" (a bare array) | "ome-zarr"
    zarr_format: int  # 2 | 3
    ngff_version: str | None
    levels: int  # resolution levels listed (1 for a bare array)
    lead: int
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    dtype: np.dtype
    codec: str  # e.g. "blosc/zstd", "zstd", "none"

    @property
    def description(self) -> str:
        """One phrase for `scrollsam inspect`: ``Zarr v2 array`` / ``OME-Zarr 0.4 image (Zarr
        v2), level 0 of 3``."""
        if self.kind == "zarr":
            return f"Zarr v{self.zarr_format} array"
        return (f"OME-Zarr {self.ngff_version} image (Zarr v{self.zarr_format}), "
                f"level 0 of {self.levels} at '{self.array_path}'")


def probe_zarr(path: Path) -> ZarrInfo:
    """Open the store's metadata (no chunk data) and check it holds a usable (z, y, x) volume:
    a readable store, an array or an OME-Zarr image, three axes after dropping size-1 leading
    ones (named z, y, x where the metadata names them), uint8 / uint16, no empty axis."""
    path = Path(path)
    if not path.is_dir():
        raise FragmentError(f"expected a Zarr store (a folder), found a file ({path})")
    node = _open(path, counter=None)
    import zarr

    if isinstance(node, zarr.Array):
        array, kind, version, levels, array_path = node, "zarr", None, 1, ""
        names = _dimension_names(array)
    else:
        try:
            ms = ngff.read_multiscales(dict(node.attrs))
        except ValueError as err:
            raise FragmentError(f"bad OME-Zarr metadata: {err} ({path})") from err
        if ms is None:
            raise FragmentError(
                "a Zarr group without OME-Zarr multiscales metadata: expected a (z, y, x) "
                f"array or an OME-Zarr image ({path})"
            )
        array_path, kind, version, levels = ms.paths[0], "ome-zarr", ms.version, len(ms.paths)
        try:
            array = node[array_path]
        except _OPEN_ERRORS as err:
            raise FragmentError(
                f"OME-Zarr level 0 array '{array_path}' is missing or unreadable: {err} ({path})"
            ) from err
        if not isinstance(array, zarr.Array):
            raise FragmentError(f"OME-Zarr level 0 '{array_path}' is not an array ({path})")
        if len(ms.axes) != array.ndim:
            raise FragmentError(
                f"OME-Zarr metadata lists {len(ms.axes)} axes ({', '.join(ms.axes)}) but level "
                f"0 has {array.ndim} dimensions {tuple(array.shape)} ({path})"
            )
        names = ms.axes
    shape, chunks = tuple(int(n) for n in array.shape), tuple(int(n) for n in array.chunks)
    lead = _leading_singletons(names, shape)
    named_wrong = names is not None and any(
        n not in (None, want) for n, want in zip(names[lead:], "zyx", strict=False))
    if len(shape) - lead != 3 or named_wrong:
        shown = ", ".join(n or "?" for n in names) if names else ""
        raise FragmentError(
            f"expected a 3-D (z, y, x) volume (leading axes of size 1 are dropped), got shape "
            f"{shape}{f' with axes ({shown})' if shown else ''} ({path})"
        )
    dtype = np.dtype(array.dtype)
    if dtype.kind != "u" or dtype.itemsize not in (1, 2):
        raise FragmentError(f"expected uint8 or uint16 voxels, got {dtype} ({path})")
    if min(shape[lead:]) == 0:
        raise FragmentError(f"empty volume of shape {shape[lead:]} ({path})")
    return ZarrInfo(
        path=path, array_path=array_path, kind=kind, zarr_format=int(array.metadata.zarr_format),
        ngff_version=version, levels=levels, lead=lead,
        shape=shape[lead:], chunks=chunks[lead:],  # type: ignore[arg-type]
        dtype=dtype.newbyteorder("="), codec=_codec_name(array),
    )


class ZarrReader:
    """Windowed reads of one probed store; opens it lazily and pickles without it (re-opens).

    ``bytes_read`` is the encoded chunk bytes fetched from the store by this process (see the
    module docstring).
    """

    def __init__(self, info: ZarrInfo) -> None:
        self.info = info
        self._counter = _Counter()
        self._array: Any = None

    @property
    def bytes_read(self) -> int:
        return self._counter.bytes

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info, "_counter": _Counter(), "_array": None}

    def close(self) -> None:
        """Forget the open array (a later read re-opens the store)."""
        self._array = None

    def read(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Voxels ``[z0:z1, y0:y1, x0:x1]`` (inside the volume) as a new native-order array."""
        index = (0,) * self.info.lead + (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        try:
            if self._array is None:
                node = _open(self.info.path, counter=self._counter)
                self._array = node[self.info.array_path] if self.info.array_path else node
            out = self._array[index]
        except FragmentError:
            raise
        except Exception as err:  # codecs raise many types (RuntimeError, ValueError, ...)
            zarr_tasks.settle()
            raise FragmentError(
                f"corrupt or unreadable Zarr chunk in window z {z0}:{z1}, y {y0}:{y1}, "
                f"x {x0}:{x1}: {err} ({self.info.path})"
            ) from err
        return np.asarray(out).astype(self.info.dtype, copy=False)


def store_files(path: Path) -> list[Path]:
    """Every file of a store folder (metadata and chunks), sorted; what ``bytes_on_disk`` and
    the statistics cache key of a Zarr fragment are made of."""
    found = [Path(root) / name for root, _, names in os.walk(path) for name in names]
    return sorted(found)


# --- helpers -----------------------------------------------------------------------------------


class _Counter:
    """Chunk bytes fetched from a store (incremented on zarr's I/O thread; a plain int is
    enough)."""

    def __init__(self) -> None:
        self.bytes = 0


def _open(path: Path, *, counter: _Counter | None) -> Any:
    """The zarr Array or Group at the root of the local store ``path``, read-only; with a
    ``counter``, every byte fetched through it is counted."""
    import zarr
    from zarr.storage import LocalStore

    try:
        store: Any = LocalStore(path, read_only=True)
        if counter is not None:
            store = _counting_store(store, counter)
        return zarr.open(store=store, mode="r")
    except OSError as err:
        if err.errno is not None:  # the file system refused: permission, a link to nothing
            raise FragmentError(f"cannot read Zarr store: {read_failure(err)} ({path})") from err
        raise FragmentError(f"not a readable Zarr store: {err} ({path})") from err
    except _OPEN_ERRORS as err:
        raise FragmentError(f"not a readable Zarr store: {err} ({path})") from err


def _counting_store(store: Any, counter: _Counter) -> Any:
    from zarr.storage import WrapperStore

    class CountingStore(WrapperStore):  # type: ignore[type-arg]
        def _with_store(self, inner: Any) -> CountingStore:
            return CountingStore(inner)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None and key.rsplit("/", 1)[-1] not in _METADATA_KEYS:
                counter.bytes += len(buf)
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Iterable[Any]) -> Any:
            key_ranges = list(key_ranges)
            bufs = await self._store.get_partial_values(prototype, key_ranges)
            counter.bytes += sum(len(b) for (key, _), b in zip(key_ranges, bufs, strict=True)
                                 if b is not None
                                 and key.rsplit("/", 1)[-1] not in _METADATA_KEYS)
            return bufs

    return CountingStore(store)


def _dimension_names(array: Any) -> tuple[str | None, ...] | None:
    """A zarr v3 array's ``dimension_names`` (None where absent or unnamed)."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names or all(n is None for n in names):
        return None
    return tuple(names)


def _leading_singletons(names: tuple[str | None, ...] | None, shape: tuple[int, ...]) -> int:
    """How many leading axes of size 1 to drop so that three remain (never z, y or x)."""
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1 and (
            names is None or names[lead] not in ("z", "y", "x")):
        lead += 1
    return lead


def _codec_name(array: Any) -> str:
    """The array's compression as a short name: ``blosc/zstd``, ``zstd``, ``none``."""
    parts = []
    for c in getattr(array, "compressors", ()) or ():
        name = getattr(c, "codec_id", None) or type(c).__name__.removesuffix("Codec").lower()
        cname = getattr(c, "cname", None)
        cname = getattr(cname, "value", cname)
        parts.append(f"{name}/{cname}" if cname else str(name))
    return "+".join(parts) or "none"
