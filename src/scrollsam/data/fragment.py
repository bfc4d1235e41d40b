"""`Fragment`: one validated fragment folder, read lazily window by window.

Two layouts are recognised (``<id>`` is the folder name), each with its volume either as a TIFF
slice folder or as a Zarr / OME-Zarr store (see :mod:`.zarr_volume`)::

    kaggle   surface_volume/00.tif .. NN.tif   mask.png         [inklabels.png]        [ir.png]
             or surface_volume.zarr
    segment  layers/00.tif .. NN.tif           <id>_mask.png    [<id>_inklabels.png]   [ir.png]
             or layers.zarr

A folder holding more than one volume (a TIFF folder and a ``.zarr`` store, or both layouts) is
refused rather than guessed: the two copies may differ, and reading the wrong one is silent.

Opening a folder validates it before any work: slice files numbered contiguously from 0, each a
single-channel uint8 / uint16 TIFF of the same height x width and pixel type, none truncated
(file size against what the header promises), or a Zarr store whose metadata promises a (z, y,
x) uint8 / uint16 volume; mask / labels / ir PNGs intact and the same size as the volume's
(y, x); labels binary (0/1, 0/255 or 0/65535: :func:`binary_image`). Only headers and
metadata are read, except ``inklabels.png``, whose values are checked (and kept) at open.
Every problem raises :class:`~scrollsam.errors.FragmentError` naming the file.

Volumes use axis order ``(z, y, x)``; z indexes the slice files. Nothing reads a whole slice
stack: :meth:`Fragment.read` touches only the requested window (see :mod:`.formats`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from scrollsam.data.formats import (
    SliceInfo,
    SliceReader,
    is_present,
    probe_png,
    probe_slice,
    read_png,
    slice_files,
)
from scrollsam.data.zarr_volume import ZarrInfo, ZarrReader, probe_zarr, store_files
from scrollsam.errors import FragmentError, InputError
from scrollsam.fs_errors import read_failure

log = logging.getLogger(__name__)

LAYOUTS = ("kaggle", "segment")
SLICE_DIRS = {"kaggle": "surface_volume", "segment": "layers"}
ZARR_STORES = {"kaggle": "surface_volume.zarr", "segment": "layers.zarr"}
_LARGE_SEGMENT = 4 * 1024 * 1024  # pixels; bigger compressed strips make window reads slow


def _warn_of_other_labels(folder: Path, expected: str) -> None:
    """A warning when ``folder`` holds no ``expected`` labels but PNGs named like ink labels
    (a segment folder renamed after its ``<id>_inklabels.png``, Kaggle's name in a segment):
    they are not read, and the fragment counts as unlabelled."""
    others = sorted(p.name for p in folder.glob("*inklabels*.png"))
    if others:
        log.warning("fragment %s: no %s, so no ink labels; %s not read (rename it to %s to use "
                    "it)", folder.name, expected, ", ".join(others), expected)


def _other_masks(folder: Path, expected: str) -> str:
    """``; found mask.png: rename it to <expected>`` when ``folder`` holds ``mask.png`` or a
    ``*_mask.png`` other than ``expected`` (a renamed segment folder), else empty."""
    others = sorted(p.name for p in [*folder.glob("*_mask.png"), *folder.glob("mask.png")])
    which = "it" if len(others) == 1 else "the right one"
    return f"; found {', '.join(others)}: rename {which} to {expected}" if others else ""


class Fragment:
    """A validated fragment folder.

    Attributes: ``path``, ``id`` (folder name), ``layout`` ("kaggle" | "segment"), ``store``
    ("tiff" | "zarr" | "ome-zarr"), ``volume_path`` (the slice folder or the ``.zarr`` store),
    ``depth``, ``height``, ``width``, ``dtype`` (np.uint8 or np.uint16), ``shape`` = (depth,
    height, width), ``slice_paths`` (z order; empty for a Zarr volume), ``zarr_info`` (None for
    TIFF), ``mask_path``, ``labels_path`` / ``ir_path`` (None when absent).

    Window readers take half-open ranges and accept y / x ranges that reach outside the image;
    the outside is filled with 0 (False), so sliding windows need no special case at borders.
    A fragment pickles (DataLoader workers) without its memory maps and file handles, which
    re-open on the next read; decoded PNGs travel with it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._open()
        except OSError as err:  # a folder we may not look into, ...: reading, never writing
            raise FragmentError(f"cannot read fragment folder: {read_failure(err)} "
                                f"({self.path})") from err

    def _open(self) -> None:
        """Find the volume, probe it and the PNGs, read the labels (OSErrors pass through)."""
        if not self.path.is_dir():
            what = "expected a fragment folder, got a file" if self.path.exists() else (
                "fragment folder not found")
            raise FragmentError(f"{what} ({self.path})")
        self.id = self.path.resolve().name
        self.layout, self.volume_path = _detect_layout(self.path)
        self.slice_paths: list[Path] = []
        self._readers: list[SliceReader] = []
        self.zarr_info: ZarrInfo | None = None
        self._zarr: ZarrReader | None = None
        if self.volume_path.suffix == ".zarr":
            self._open_zarr()
        else:
            self._open_slices()

        prefix = "" if self.layout == "kaggle" else f"{self.id}_"
        self.mask_path = self.path / f"{prefix}mask.png"
        if not is_present(self.mask_path):
            raise FragmentError(f"missing mask: expected {self.mask_path.name}"
                                f"{_other_masks(self.path, self.mask_path.name)} "
                                f"({self.mask_path})")
        self._check_png_size(self.mask_path)
        labels = self.path / f"{prefix}inklabels.png"
        self.labels_path: Path | None = labels if is_present(labels) else None
        if self.labels_path is None:
            _warn_of_other_labels(self.path, labels.name)
        ir = self.path / "ir.png"
        self.ir_path: Path | None = ir if is_present(ir) else None
        for p in (self.labels_path, self.ir_path):
            if p is not None:
                self._check_png_size(p)

        self._mask: np.ndarray | None = None
        self._ir: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if self.labels_path is not None:
            self._labels = binary_image(read_png(self.labels_path, gray="equal"),
                                        self.labels_path)
            self._check_decoded_size(self._labels, self.labels_path)
        log.debug("opened %s: %s layout, %s %s", self.path, self.layout, self.shape, self.dtype)

    def _open_slices(self) -> None:
        """Probe and cross-check every slice TIFF (headers only)."""
        self.store = "tiff"
        self.slice_paths = slice_files(self.volume_path)
        infos = [probe_slice(p) for p in self.slice_paths]
        first = infos[0]
        for info in infos[1:]:
            if (info.height, info.width) != (first.height, first.width):
                raise FragmentError(
                    f"slice is {info.height}x{info.width} but {first.path.name} is "
                    f"{first.height}x{first.width} ({info.path})"
                )
            if info.dtype != first.dtype:
                raise FragmentError(
                    f"slice is {info.dtype} but {first.path.name} is {first.dtype} ({info.path})"
                )
        self.depth, self.height, self.width = len(infos), first.height, first.width
        self.dtype = first.dtype
        self._readers = [SliceReader(info) for info in infos]
        if not first.memmappable and first.segment_pixels > _LARGE_SEGMENT:
            log.warning(
                "%s: slices are %s-compressed in segments of %d pixels; every window read "
                "decodes whole segments (%.0f MB per slice). Uncompressed or tiled TIFFs read "
                "windows much faster.", self.path, first.compression, first.segment_pixels,
                first.segment_pixels * first.dtype.itemsize / 1e6,
            )

    def _open_zarr(self) -> None:
        """Probe the Zarr store's metadata (no chunk data)."""
        info = probe_zarr(self.volume_path)
        self.store, self.zarr_info, self._zarr = info.kind, info, ZarrReader(info)
        self.depth, self.height, self.width = info.shape
        self.dtype = info.dtype

    # --- description -----------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depth, height, width) of the slice volume."""
        return (self.depth, self.height, self.width)

    @property
    def slice_infos(self) -> list[SliceInfo]:
        """Header facts of every slice file, in z order."""
        return [r.info for r in self._readers]

    @property
    def volume_files(self) -> list[Path]:
        """The files that hold the volume: the slice TIFFs in z order, or every file of the
        Zarr store (metadata and chunks, walked on each call)."""
        if self._zarr is not None:
            return store_files(self.volume_path)
        return list(self.slice_paths)

    @property
    def bytes_on_disk(self) -> int:
        """Size of the volume files plus the PNGs, in bytes."""
        files = [*self.volume_files, self.mask_path, self.labels_path, self.ir_path]
        return sum(os.path.getsize(p) for p in files if p is not None)

    @property
    def bytes_read(self) -> int:
        """Bytes of volume data read so far by this process: window bytes or encoded strips /
        tiles of the TIFFs (:class:`.formats.SliceReader`), encoded chunks fetched from a Zarr
        store (:class:`.zarr_volume.ZarrReader`)."""
        if self._zarr is not None:
            return self._zarr.bytes_read
        return sum(r.bytes_read for r in self._readers)

    def __repr__(self) -> str:
        return (
            f"Fragment({str(self.path)!r}, layout={self.layout!r}, store={self.store!r}, "
            f"shape={self.shape}, "
            f"dtype={self.dtype.name})"
        )

    # --- volume ----------------------------------------------------------------------------

    def read(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Window ``[z0:z1, y0:y1, x0:x1]`` of the volume: [z1-z0, y1-y0, x1-x0], native dtype.

        ``0 <= z0 < z1 <= depth``; y / x ranges may reach outside the image (filled with 0). Only
        the rows and columns of the window are read from each slice file, only the chunks the
        window touches from a Zarr store.
        """
        if not (0 <= z0 < z1 <= self.depth):
            raise InputError(
                f"z range: expected 0 <= z0 < z1 <= {self.depth} for fragment {self.id}, "
                f"got {z0}:{z1}"
            )
        _check_window(y0, y1, x0, x1)
        iy0, iy1 = max(y0, 0), min(y1, self.height)
        ix0, ix1 = max(x0, 0), min(x1, self.width)
        inside = (iy0, iy1, ix0, ix1) == (y0, y1, x0, x1) and y0 < y1 and x0 < x1
        if inside and self._zarr is not None:  # a new array already: no padded copy
            return self._zarr.read(z0, z1, y0, y1, x0, x1)  # (z, y, x)
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=self.dtype)  # (z, y, x)
        if iy0 < iy1 and ix0 < ix1 and self._zarr is not None:
            out[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = self._zarr.read(
                z0, z1, iy0, iy1, ix0, ix1)
        elif iy0 < iy1 and ix0 < ix1:
            for i, reader in enumerate(self._readers[z0:z1]):
                out[i, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = reader.read(iy0, iy1, ix0, ix1)
        return out

    def close(self) -> None:
        """Release memory maps and file handles (reads re-open them)."""
        for r in self._readers:
            r.close()
        if self._zarr is not None:
            self._zarr.close()

    def __enter__(self) -> Fragment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- 2-D images --------------------------------------------------------------------------

    def mask(self) -> np.ndarray:
        """Fragment outline from mask.png: bool [H, W], True inside (decoded once, cached)."""
        if self._mask is None:
            img = read_png(self.mask_path, gray="equal")
            self._check_decoded_size(img, self.mask_path)
            if img.dtype == np.uint8:  # in place: a segment's mask is hundreds of MB
                np.minimum(img, 1, out=img)
                self._mask = img.view(np.bool_)
            else:
                self._mask = img > 0
        return self._mask

    def labels(self) -> np.ndarray | None:
        """Ink labels: bool [H, W], True = ink; None when the folder has no ink labels."""
        return self._labels

    def ir(self) -> np.ndarray | None:
        """Infrared image: uint8 or uint16 [H, W] as stored (views standardise it by its own
        mean and std, so a 12-bit image in a 16-bit PNG keeps its 4096 levels); None when
        absent."""
        if self.ir_path is None:
            return None
        if self._ir is None:
            img = read_png(self.ir_path, gray="luma")
            self._check_decoded_size(img, self.ir_path)
            self._ir = img
        return self._ir

    def mask_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``mask()[y0:y1, x0:x1]`` as bool [y1-y0, x1-x0]; False outside the image."""
        return _window(self.mask(), y0, y1, x0, x1)

    def labels_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray | None:
        """``labels()[y0:y1, x0:x1]`` as bool, False outside the image; None without labels."""
        labels = self.labels()
        return None if labels is None else _window(labels, y0, y1, x0, x1)

    def ir_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray | None:
        """``ir()[y0:y1, x0:x1]`` in its dtype, 0 outside the image; None without ir.png."""
        ir = self.ir()
        return None if ir is None else _window(ir, y0, y1, x0, x1)

    # --- checks ----------------------------------------------------------------------------

    def _check_png_size(self, path: Path) -> None:
        info = probe_png(path)
        if (info.height, info.width) != (self.height, self.width):
            raise FragmentError(
                f"image is {info.height}x{info.width} but the "
                f"{'slices are' if self.store == 'tiff' else 'volume is'} "
                f"{self.height}x{self.width} ({path})"
            )

    def _check_decoded_size(self, img: np.ndarray, path: Path) -> None:
        if img.shape != (self.height, self.width):
            raise FragmentError(
                f"decoded image is {img.shape}, expected {(self.height, self.width)} ({path})"
            )


def _detect_layout(path: Path) -> tuple[str, Path]:
    """(layout, volume path): the one slice folder or ``.zarr`` store in ``path``; none or more
    than one is a FragmentError."""
    found = [(layout, path / sub) for layout, sub in SLICE_DIRS.items() if (path / sub).is_dir()]
    found += [(layout, path / name) for layout, name in ZARR_STORES.items()
              if (path / name).exists()]
    if not found:
        raise FragmentError(
            f"not a fragment folder: no surface_volume/ or surface_volume.zarr (Kaggle layout) "
            f"or layers/ or layers.zarr (scroll-segment layout) ({path})"
        )
    if len(found) > 1:
        names = " and ".join(f"{p.name}{'' if p.suffix else '/'}" for _, p in found)
        raise FragmentError(
            f"ambiguous fragment folder: both {names} exist; keep one volume ({path})"
        )
    return found[0]


def binary_image(img: np.ndarray, path: Path, *, what: str = "labels") -> np.ndarray:
    """bool [H, W] from a 0/1, 0/255 or 0/65535 image (ink labels, masks: the values of the
    whole image are checked); FragmentError naming ``path`` otherwise. ``what`` starts the
    message (``labels``; ``evaluate`` passes its flag)."""
    if img.dtype.kind in "bu" and img.dtype.itemsize <= 2:  # fast on a whole segment's labels
        values = set(np.flatnonzero(np.bincount(img.ravel(), minlength=2)).tolist())
    else:  # other integers and floats (evaluate reads TIFFs too)
        values = set(np.unique(img).tolist())
    for on in (1, 255, 65535):
        if values <= {0, on}:
            return img == on
    shown = ", ".join(f"{v:g}" for v in sorted(values)[:6])
    raise FragmentError(
        f"{what} must be binary (0/1, 0/255 or 0/65535), found values {shown}"
        f"{' ...' if len(values) > 6 else ''} ({path})"
    )


def _check_window(y0: int, y1: int, x0: int, x1: int) -> None:
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"window: expected y0 < y1 and x0 < x1, got y {y0}:{y1}, x {x0}:{x1}")


def _window(img: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``img[y0:y1, x0:x1]`` of a 2-D array, zero-padded where the window leaves the image."""
    _check_window(y0, y1, x0, x1)
    h, w = img.shape
    if y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w:
        return img[y0:y1, x0:x1].copy()
    out = np.zeros((y1 - y0, x1 - x0), dtype=img.dtype)
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if iy0 < iy1 and ix0 < ix1:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = img[iy0:iy1, ix0:ix1]
    return out


def check_distinct_ids(fragments: list[Fragment], given: list[str], *, setting: str,
                       why: str) -> None:
    """InputError naming the folders ``given`` (as the user wrote them, one per fragment) that
    share an id: a fragment's id is its folder's name after links are resolved, so two links
    to two folders named ``1`` clash though the links' names differ. ``why`` says what the ids
    name (output folders, tiles, ...)."""
    by_id: dict[str, list[str]] = {}
    for frag, name in zip(fragments, given, strict=True):
        by_id.setdefault(frag.id, []).append(name)
    clashes = [f"{' and '.join(names)} are both {i}" for i, names in by_id.items()
               if len(names) > 1]
    if clashes:
        raise InputError(f"{setting}: expected fragment folders with distinct names ({why}; "
                         f"links count by the folder they lead to), got {'; '.join(clashes)}")
