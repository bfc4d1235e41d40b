"""File access for fragment folders: cheap header probes and windowed reads of TIFF / PNG files.

Only this module touches the bytes of a slice file. A slice is read in one of two ways:

- **memory-mapped** (uncompressed, contiguous pixel data, as in the Kaggle volumes): the pixels
  are mapped (at the offset and byte order the header gives) and a window read copies just that
  window out of the map, so the kernel pages in only the rows the window spans (readahead is
  switched off with ``MADV_RANDOM`` where the platform has it).
- **by segment** (compressed, or uncompressed but scattered strips / tiles): only the strips or
  tiles that intersect the window are read from the file and decoded.

Every problem raises :class:`~scrollsam.errors.FragmentError` whose message ends with the file in
parentheses, e.g. ``truncated TIFF: ... (data/train/1/surface_volume/07.tif)``.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from scrollsam.data.open_files import OPEN_FILES
from scrollsam.errors import FragmentError
from scrollsam.fs_errors import read_failure

log = logging.getLogger(__name__)

SLICE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SLICE_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class SliceInfo:
    """What the header of one slice TIFF promises: its size, pixel type and how to read it."""

    path: Path
    height: int
    width: int
    dtype: np.dtype  # uint8 or uint16, as read (native order; the file's may differ)
    memmappable: bool  # uncompressed and contiguous: read through a memory map
    compression: str
    segment_pixels: int  # pixels in one strip / tile: the least a segment read decodes
    offset: int = 0  # where the pixels start in the file (memmappable slices)
    byteorder: str = "<"  # the file's: "<" little-endian, ">" big-endian
    stamp: tuple[int, int] = (0, 0)  # (size, mtime_ns) when probed; (0, 0): not checked


def probe_slice(path: Path) -> SliceInfo:
    """Read the header of one slice TIFF (not its pixels) and check that it is usable.

    Checks: a TIFF at all, one single-channel 2-D page, uint8 or uint16 samples, a compression
    tifffile can decode, and a file long enough to hold every strip / tile the header lists (a
    truncated copy is caught here, without reading pixel data).
    """
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) != 1:
                raise FragmentError(
                    f"expected one 2-D image per slice file, found {len(tif.pages)} pages ({path})"
                )
            page = tif.pages.first
            if page.ndim != 2 or page.samplesperpixel != 1:
                raise FragmentError(
                    f"expected a single-channel 2-D slice, got shape {page.shape} ({path})"
                )
            dtype = np.dtype(page.dtype) if page.dtype is not None else None
            if dtype not in SLICE_DTYPES:
                raise FragmentError(f"expected uint8 or uint16 pixels, got {dtype} ({path})")
            stat = os.stat(path)
            size = stat.st_size
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
            if not ends or max(ends) > size:
                promised = max(ends) if ends else 0
                raise FragmentError(
                    f"truncated TIFF: header promises pixel data up to byte {promised}, "
                    f"file has {size} bytes ({path})"
                )
            memmappable = bool(page.is_memmappable)
            if page.is_tiled:
                segment = page.tilelength * page.tilewidth
            else:
                segment = (page.rowsperstrip or page.imagelength) * page.imagewidth
            if not memmappable:
                try:
                    page.decode(None, 0)  # raises for a compression tifffile cannot decode
                except (ValueError, NotImplementedError, KeyError) as err:
                    raise FragmentError(f"cannot decode this TIFF: {err} ({path})") from err
            return SliceInfo(
                path=Path(path), height=int(page.shape[0]), width=int(page.shape[1]),
                dtype=dtype, memmappable=memmappable, compression=page.compression.name,
                segment_pixels=int(min(segment, page.imagelength * page.imagewidth)),
                offset=int(page.dataoffsets[0]) if memmappable else 0, byteorder=tif.byteorder,
                stamp=(stat.st_size, stat.st_mtime_ns),
            )
    except FragmentError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, struct.error) as err:
        raise _unreadable(err, "TIFF", path) from err


def _unreadable(err: Exception, kind: str, path: Path) -> FragmentError:
    """``cannot read TIFF: permission denied (PATH)`` when the file system refused (an OSError
    with an errno: permission, a link to nothing, ...), else ``corrupt or unreadable TIFF:
    <the reader's words> (PATH)``."""
    if isinstance(err, OSError) and err.errno is not None:
        return FragmentError(f"cannot read {kind}: {read_failure(err, path)} ({path})")
    return FragmentError(f"corrupt or unreadable {kind}: {err} ({path})")


def is_present(path: Path) -> bool:
    """``path`` is a file (or a link to one); a link to nothing is a FragmentError naming its
    target, not an absent file (a mask, labels or ir.png that would be silently missing)."""
    if os.path.islink(path) and not path.exists():
        raise FragmentError(f"cannot read PNG: it is a link to a missing file, "
                            f"{os.fsdecode(os.readlink(path))} ({path})")
    return path.is_file()


def slice_files(folder: Path) -> list[Path]:
    """Slice files of ``folder`` in z order; numbered contiguously from 0 or FragmentError."""
    numbered: dict[int, Path] = {}
    try:
        names = sorted(folder.iterdir())
    except OSError as err:  # a slice folder we may not list
        raise FragmentError(f"cannot read slice folder: {read_failure(err)} ({folder})") from err
    for p in names:
        if p.suffix.lower() not in (".tif", ".tiff") or p.name.startswith("."):
            continue
        m = _SLICE_NAME.match(p.name)
        if m is None:
            raise FragmentError(f"unexpected slice file name, expected NN.tif ({p})")
        z = int(m.group(1))
        if z in numbered:
            raise FragmentError(f"two files for slice {z}: {numbered[z].name} and {p.name} ({p})")
        numbered[z] = p
    if not numbered:
        raise FragmentError(f"no slice files (NN.tif) ({folder})")
    for z in range(max(numbered) + 1):
        if z not in numbered:
            width = len(next(iter(numbered.values())).stem)
            raise FragmentError(
                f"missing slice {z}: slices must be numbered contiguously from 0 "
                f"({folder / f'{z:0{width}d}.tif'})"
            )
    return [numbered[z] for z in range(len(numbered))]


class SliceReader:
    """Windowed reads of one slice TIFF; opens its file lazily and can be pickled (re-opens).
    At most :data:`~scrollsam.data.open_files.OPEN_FILES`'s limit of readers keep their file
    open; the others re-open on their next read.

    ``bytes_read`` counts the bytes this reader asked the file for: for the memory-mapped path,
    the bytes of the window's rows copied out of the map (``rows * cols * itemsize``); for the
    segment path, the encoded bytes of every strip / tile read.
    """

    def __init__(self, info: SliceInfo) -> None:
        self.info = info
        self.bytes_read = 0
        self._map: np.memmap | None = None
        self._tif: tifffile.TiffFile | None = None
        self._lock = threading.Lock()  # a read, or a release by OPEN_FILES from another thread

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info, "bytes_read": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["info"])  # type: ignore[misc]

    def close(self) -> None:
        """Release the memory map / file handle (a later read re-opens it)."""
        OPEN_FILES.forget(self)
        self.release()

    def release(self) -> None:
        """Let the open file go, for :data:`OPEN_FILES` (a later read re-opens it)."""
        with self._lock:
            if self._tif is not None:
                self._tif.close()
            self._map, self._tif = None, None

    def after_fork(self) -> None:
        """In a forked child: a new lock, and the inherited file let go (its offset is shared
        with the parent's)."""
        self._lock = threading.Lock()
        self.release()

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (inside the image) as a new native-order array [y, x]."""
        OPEN_FILES.touch(self)
        with self._lock:
            opens = self._map is None and self._tif is None
            read = self._read_mapped if self.info.memmappable else self._read_segments
            out = read(y0, y1, x0, x1)
        if opens:  # another thread may have released it between the touch and the open
            OPEN_FILES.touch(self)
        return out

    def _check_unchanged(self) -> None:
        """Before a (re-)open: the file is the one probed, so its header (the pixels' offset,
        size and order) still holds; a slice rewritten since is an error, not other pixels."""
        if self.info.stamp == (0, 0):
            return
        try:
            stat = os.stat(self.info.path)
        except OSError as err:
            raise _unreadable(err, "TIFF", self.info.path) from err
        if (stat.st_size, stat.st_mtime_ns) != self.info.stamp:
            raise FragmentError(f"slice file changed since the fragment was opened; open the "
                                f"fragment again ({self.info.path})")

    def _read_mapped(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._map is None:  # the header was read when probed: map the pixels directly
            info = self.info
            self._check_unchanged()
            try:
                self._map = np.memmap(info.path, dtype=info.dtype.newbyteorder(info.byteorder),
                                      mode="r", offset=info.offset,
                                      shape=(info.height, info.width))
            except OSError as err:
                raise _unreadable(err, "TIFF", info.path) from err
            except ValueError as err:  # shorter than its header said: changed since probed
                raise FragmentError(f"cannot memory-map TIFF: {err} ({info.path})") from err
            raw = getattr(self._map, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)  # page in the window's rows, not megabytes around
        out = np.array(self._map[y0:y1, x0:x1], dtype=self.info.dtype)  # copy, native order
        self.bytes_read += out.nbytes
        return out

    def _read_segments(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._tif is None:
            self._check_unchanged()
            try:
                self._tif = tifffile.TiffFile(self.info.path)
            except (tifffile.TiffFileError, OSError) as err:  # changed since it was probed
                raise _unreadable(err, "TIFF", self.info.path) from err
        page = self._tif.pages.first
        fh = self._tif.filehandle
        out = np.zeros((y1 - y0, x1 - x0), dtype=self.info.dtype)
        for index in _segments_for_window(page, y0, y1, x0, x1):
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if count:
                fh.seek(offset)
                data = fh.read(count)
                self.bytes_read += len(data)
            try:
                seg, pos, shape = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as err:  # decoders raise many types on corrupt data
                raise FragmentError(f"corrupt TIFF data: {err} ({self.info.path})") from err
            if seg is None:
                continue
            seg = seg.reshape(shape[1], shape[2])  # (depth=1, rows, cols, samples=1) -> [y, x]
            sy, sx = pos[2], pos[3]
            ty0, ty1 = max(y0, sy), min(y1, sy + shape[1])
            tx0, tx1 = max(x0, sx), min(x1, sx + shape[2])
            if ty0 < ty1 and tx0 < tx1:
                part = seg[ty0 - sy:ty1 - sy, tx0 - sx:tx1 - sx]
                out[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] = part
        return out


def _segments_for_window(page: Any, y0: int, y1: int, x0: int, x1: int) -> list[int]:
    """Indices of the strips or tiles of ``page`` that intersect rows y0:y1, columns x0:x1."""
    if page.is_tiled:
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        return [
            ty * across + tx
            for ty in range(y0 // th, (y1 - 1) // th + 1)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1)
        ]
    rows = page.rowsperstrip or page.imagelength
    last = len(page.dataoffsets) - 1
    return list(range(min(y0 // rows, last), min((y1 - 1) // rows, last) + 1))


@dataclass(frozen=True)
class PngInfo:
    """Header of a PNG: size, bit depth and colour type (0 grey, 2 RGB, 3 palette, 4 grey+alpha,
    6 RGBA)."""

    path: Path
    height: int
    width: int
    bit_depth: int
    color_type: int


def probe_png(path: Path) -> PngInfo:
    """Read a PNG's header and walk its chunk list (seeking over the data) to catch truncation."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                raise FragmentError(f"not a PNG file ({path})")
            length, kind = struct.unpack(">I4s", f.read(8))
            if kind != b"IHDR" or length != 13:
                raise FragmentError(f"corrupt PNG: no IHDR header ({path})")
            width, height, bit_depth, color_type = struct.unpack(">IIBB", f.read(10))
            pos = 8 + 8 + length + 4
            while True:
                if pos + 8 > size:
                    raise FragmentError(f"truncated PNG: no IEND chunk ({path})")
                f.seek(pos)
                length, kind = struct.unpack(">I4s", f.read(8))
                pos += 8 + length + 4
                if pos > size:
                    raise FragmentError(
                        f"truncated PNG: chunk {kind!r} runs past the end of the file ({path})"
                    )
                if kind == b"IEND":
                    break
    except FragmentError:
        raise
    except (OSError, struct.error) as err:
        raise _unreadable(err, "PNG", path) from err
    if width == 0 or height == 0:
        raise FragmentError(f"empty PNG image ({path})")
    return PngInfo(Path(path), int(height), int(width), int(bit_depth), int(color_type))


_STDERR_LOCK = threading.Lock()  # file descriptor 2 is the process's: one swap at a time


def _quiet(decode: Callable[[], Any]) -> tuple[Any, str]:
    """``decode()``'s result and what it printed to the process's stderr (file descriptor 2),
    held back: libpng prints its errors there itself ("libpng error: IDAT: invalid code
    lengths set"), which would come before the one-line error that names the file. One thread
    at a time swaps the descriptor; with no descriptor 2 (``2>&-``) nothing is caught."""
    with _STDERR_LOCK:
        if sys.stderr is not None:
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # stderr closed
            return decode(), ""
        try:
            with tempfile.TemporaryFile() as caught:
                os.dup2(caught.fileno(), 2)
                try:
                    result = decode()
                finally:
                    os.dup2(saved, 2)
                caught.seek(0)
                said = caught.read().decode(errors="replace")
        finally:
            os.close(saved)
    return result, " ".join(said.replace("libpng error: ", "").split())


def read_png(path: Path, *, gray: str) -> np.ndarray:
    """Decode a PNG to one channel [H, W] uint8 or uint16.

    ``gray`` says what to do with colour images: ``"equal"`` accepts them only when every colour
    channel holds the same values (masks, labels saved as RGB), ``"luma"`` converts to grey
    (infrared images). With ``"equal"``, fully transparent pixels (alpha 0) read 0: a mask whose
    shape is its alpha channel (white, transparent outside the papyrus) reads as that shape;
    ``"luma"`` ignores alpha.
    """
    import cv2  # imported here: cv2 is slow to import and only needed when a PNG is decoded

    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise _unreadable(err, "PNG", path) from err
    img, said = _quiet(lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
    if said:
        log.debug("decoding %s: %s", path, said)
    if img is None:
        cause = f": {said}" if said else ""
        raise FragmentError(f"corrupt PNG: cannot decode pixel data{cause} ({path})")
    if img.ndim == 3:
        color = img[..., :3]  # BGR(A) -> BGR
        clear = img[..., 3] == 0 if img.shape[-1] == 4 else None  # fully transparent pixels
        if gray == "luma":
            img = cv2.cvtColor(np.ascontiguousarray(color), cv2.COLOR_BGR2GRAY)
        elif (color == color[..., :1]).all():
            img = np.ascontiguousarray(color[..., 0])
            if clear is not None:  # a mask or labels drawn as shape over transparency
                img[clear] = 0
        else:
            raise FragmentError(f"expected a single-channel image, got colour ({path})")
    return img
