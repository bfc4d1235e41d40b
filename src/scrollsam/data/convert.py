"""`scrollsam convert`: copy a fragment folder with its volume as a Zarr or OME-Zarr store.

The copy keeps the layout: a Kaggle fragment gets ``surface_volume.zarr``, a segment
``layers.zarr``; mask / ink labels / ir PNGs are copied byte for byte (a segment's
``<id>_mask.png`` is renamed after the new folder, whose name is the copy's id). Voxels are
copied unchanged (lossless Blosc-zstd), so the copy reads the same windows, training batches and
predictions as the original.

Formats:

- ``zarr``: one array of shape (z, y, x), zarr v2 by default (``zarr_format=3`` for v3).
- ``ome-zarr``: an OME-NGFF image, 0.4 on zarr v2 by default (what napari and the Vesuvius
  tools open; ``zarr_format=3`` writes NGFF 0.5), ``/``-separated chunk keys. Level 0 is the
  volume; levels 1.. halve y and x (2 x 2 mean, rounded; z is kept) while a level still spans
  at least one chunk in y and x, at most :data:`MAX_LEVELS` levels (``levels`` fixes the count;
  1 = no pyramid), each with its NGFF scale and the half-voxel translation of a mean. Scrollsam
  reads level 0 only; the pyramid is for viewers.

Memory stays flat: the volume is copied block by block, each block a run of whole chunks (one
chunk deep and high, as wide as fits in ``block_bytes``), read from the source with
:meth:`Fragment.read` and written as whole chunks. Each pyramid level is made the same way
from the level above it. Peak memory is a few blocks (zarr's encode buffers included), whatever
the volume's size.

Nothing is lost on the way: :func:`check_out` refuses, before any work, an OUT whose writing
could delete data (the fragment folder, a folder holding it or inside it, a file, and with
``overwrite`` a folder that is not an earlier copy). The copy is written into a hidden
``.OUT.tmp-*`` folder next to OUT and renamed to OUT once complete; an old OUT is renamed aside
first and deleted only once the new copy is in place. A failure removes the temporary folder
(and any folders made for it) and leaves the old OUT whole; a killed process may leave its
temporary folder, never a half-written OUT, and the next convert into OUT removes that folder
(:mod:`.convert_temp`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scrollsam import ngff
from scrollsam.data.convert_temp import aside_path, remove_stale_temps, remove_temp, temp_path
from scrollsam.data.fragment import ZARR_STORES, Fragment
from scrollsam.errors import InputError, ScrollsamError, WriteError
from scrollsam.io import within, write_failure
from scrollsam.out_path import missing_folders, remove_made, swap_folder
from scrollsam.sigterm import deferred_signals

log = logging.getLogger(__name__)

FORMATS = ("zarr", "ome-zarr")
DEFAULT_CHUNKS = (64, 256, 256)
MAX_LEVELS = 5
BLOCK_BYTES = 64 * 2**20


def convert_fragment(
    src: str | os.PathLike[str] | Fragment,
    out: str | os.PathLike[str],
    *,
    format: str = "zarr",
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    zarr_format: int = 2,
    levels: int | None = None,
    overwrite: bool = False,
    block_bytes: int = BLOCK_BYTES,
) -> Path:
    """Write a copy of fragment ``src`` into folder ``out`` with its volume as a Zarr store and
    return ``out``. ``chunks`` is (z, y, x), clipped to the volume's shape. ``overwrite``
    replaces an ``out`` that an earlier copy wrote or that is empty (see :func:`check_out`)."""
    frag = src if isinstance(src, Fragment) else Fragment(src)
    if format not in FORMATS:
        raise InputError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if zarr_format not in (2, 3):
        raise InputError(f"zarr_format: expected 2 or 3, got {zarr_format!r}")
    chunks = _check_chunks(chunks, frag.shape)
    if levels is not None and (not isinstance(levels, int) or levels < 1 or
                               (format == "zarr" and levels != 1)):
        raise InputError(f"levels: expected a count >= 1 (only 1 for format zarr), got {levels}")
    out = Path(out)
    check_out(out, frag.path, overwrite=overwrite)
    n_levels = levels if levels is not None else (
        1 if format == "zarr" else auto_levels(frag.shape, chunks))

    target = out.resolve()
    remove_stale_temps(target)  # a killed convert's copy into the same OUT
    made = missing_folders(target.parent)
    tmp = temp_path(target)
    placed, old = False, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        store = tmp / ZARR_STORES[frag.layout]
        if format == "zarr":
            _write_array(store, frag.shape, chunks, frag.dtype, zarr_format, frag.read,
                         block_bytes=block_bytes)
        else:
            _write_ome(store, frag, chunks, zarr_format, n_levels, block_bytes=block_bytes)
        _copy_images(frag, tmp, new_id=target.name)
        check_out(out, frag.path, overwrite=overwrite)  # OUT may have changed while we wrote
        with deferred_signals():  # Ctrl-C / SIGTERM take effect once the copy is in place
            old = swap_folder(tmp, target, aside_path(target))  # the old one: deleted below
            placed = True
    except BaseException as err:
        if placed:  # a signal held back during the renames: the copy is whole
            if isinstance(err, KeyboardInterrupt):
                err.args = (_complete(out, old),)
            raise
        remove_temp(tmp)  # once zarr's writes still in flight into it have ended
        remove_made(made)  # the folders made for it, while empty
        cause = None if isinstance(err, ScrollsamError) else write_failure(err, target.parent)
        if cause is None:
            raise
        raise WriteError(f"{cause} while writing the copy ({out})") from err
    _remove_replaced(old, out)
    log.debug("wrote %s (%s, %s levels, chunks %s)", out, format, n_levels, chunks)
    return out


def check_out(out: Path, fragment: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` folder whose writing or replacing could lose data, before any work.

    Refused: a link, a file (or a folder path that runs through one), the fragment folder
    itself, a folder that holds it or lies inside it, an existing folder without
    ``overwrite``, and, with it, a folder that holds anything convert does not write: one Zarr
    store (``surface_volume.zarr`` / ``layers.zarr``) and the PNGs (``mask.png``,
    ``inklabels.png``, ``ir.png``, ``<name>_mask.png``, ``<name>_inklabels.png``). So
    ``overwrite`` replaces an empty folder or an earlier copy, never source data (TIFF
    slices), other fragments or files of the user's.
    """
    if out.is_symlink():
        raise InputError(f"out: is a symbolic link; name the folder itself ({out})")
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f", so {out} cannot be made in it"
                raise InputError(f"out: is a file, not a folder{where} ({path})")
            break
    real, src = out.resolve(), fragment.resolve()
    if real == src:
        raise InputError(f"out: must differ from the fragment folder ({out})")
    if within(src, real):
        raise InputError(f"out: holds the fragment folder being converted ({out})")
    if within(real, src):
        raise InputError(f"out: is inside the fragment folder being converted ({out})")
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"out: folder already exists; --overwrite replaces it ({out})")
    strays = _not_written_by_convert(out, real.name)
    if strays:
        more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
        raise InputError(f"out: not a folder that convert wrote (it holds {strays[0]}{more}); "
                         f"--overwrite replaces only an earlier copy or an empty folder ({out})")


def _not_written_by_convert(folder: Path, name: str) -> list[str]:
    """Names of the entries of ``folder`` (named ``name``) that convert does not write."""
    pngs = {"mask.png", "inklabels.png", "ir.png", f"{name}_mask.png", f"{name}_inklabels.png"}
    strays = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            strays.append(entry.name)
        elif entry.name in ZARR_STORES.values() and entry.is_dir():
            if not any((entry / meta).is_file() for meta in (".zgroup", ".zarray", "zarr.json")):
                strays.append(entry.name)
        elif not (entry.name in pngs and entry.is_file()):
            strays.append(entry.name)
    return strays


def _remove_replaced(old: Path | None, out: Path) -> None:
    """Delete the replaced copy ``old`` once the new one is in place (an interrupt then says
    that the copy is complete)."""
    try:
        if old is not None:
            shutil.rmtree(old)
    except OSError as err:
        log.warning("could not delete the replaced copy %s (%s); delete it by hand", old, err)
    except KeyboardInterrupt as err:
        err.args = (_complete(out, old),)
        raise


def _complete(out: Path, old: Path | None) -> str:
    """What an interrupt after the renames left: the CLI prints ``interrupted: <this>``."""
    left = (f"; the copy it replaced, left as {old.name}, goes with the next convert into it"
            if old is not None and os.path.lexists(old) else "")
    return f"the copy is complete ({out}){left}"


def auto_levels(shape: Sequence[int], chunks: Sequence[int]) -> int:
    """Pyramid levels for a (z, y, x) ``shape``: 1 + the halvings of y and x after which the
    level still spans at least one chunk in both, at most :data:`MAX_LEVELS`."""
    n = 1
    while n < MAX_LEVELS and all(-(-shape[a] // 2**n) >= chunks[a] for a in (1, 2)):
        n += 1
    return n


def blocks(shape: Sequence[int], chunks: Sequence[int], *, block_bytes: int,
           itemsize: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Chunk-aligned blocks (z0, z1, y0, y1, x0, x1) covering a (z, y, x) ``shape``: one chunk
    deep and high, as many whole chunks wide as fit in ``block_bytes`` (at least one)."""
    d, h, w = shape
    cz, cy, cx = chunks
    per_chunk_column = cz * cy * cx * itemsize
    bw = cx * max(1, block_bytes // per_chunk_column)
    for z0 in range(0, d, cz):
        for y0 in range(0, h, cy):
            for x0 in range(0, w, bw):
                yield z0, min(z0 + cz, d), y0, min(y0 + cy, h), x0, min(x0 + bw, w)


# --- writers -----------------------------------------------------------------------------------

Reader = Callable[[int, int, int, int, int, int], np.ndarray]


def _create(store: Any, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
            zarr_format: int, *, dimension_separator: str = ".") -> Any:
    import zarr

    if zarr_format == 2:
        from numcodecs import Blosc

        compressor: Any = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
        extra: dict[str, Any] = {
            "chunk_key_encoding": {"name": "v2", "separator": dimension_separator}}
    else:
        from zarr.codecs import BloscCodec

        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
        extra = {"dimension_names": ("z", "y", "x")}
    return zarr.create_array(store=store, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
                             fill_value=0, zarr_format=zarr_format, compressors=compressor,
                             **extra)


def _fill(array: Any, read: Reader, shape: Sequence[int], chunks: Sequence[int], *,
          block_bytes: int) -> None:
    """Copy ``read(z0, z1, y0, y1, x0, x1)`` into ``array`` block by block (whole chunks)."""
    for z0, z1, y0, y1, x0, x1 in blocks(shape, chunks, block_bytes=block_bytes,
                                         itemsize=array.dtype.itemsize):
        array[z0:z1, y0:y1, x0:x1] = read(z0, z1, y0, y1, x0, x1)


def _write_array(store: Path, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
                 zarr_format: int, read: Reader, *, block_bytes: int) -> None:
    array = _create(store, shape, chunks, dtype, zarr_format)
    _fill(array, read, shape, chunks, block_bytes=block_bytes)


def _write_ome(store: Path, frag: Fragment, chunks: Sequence[int], zarr_format: int,
               levels: int, *, block_bytes: int) -> None:
    import zarr

    group = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    read: Reader = frag.read
    shape: tuple[int, int, int] = frag.shape
    for level in range(levels):
        if level:
            read = _halved(group[str(level - 1)], shape)
            shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2))
        level_chunks = [min(c, n) for c, n in zip(chunks, shape, strict=True)]
        array = _create(group.store_path / str(level), shape, level_chunks, frag.dtype,
                        zarr_format, dimension_separator="/")
        # a pyramid block reads four times its size from the level above
        _fill(array, read, shape, level_chunks,
              block_bytes=block_bytes if level == 0 else block_bytes // 4)
    ngff.write_multiscales(
        group, axes=("z", "y", "x"), scales=[(1, 2**n, 2**n) for n in range(levels)],
        translations=[(0, (2**n - 1) / 2, (2**n - 1) / 2) for n in range(levels)],
        name=frag.id, downscale="mean" if levels > 1 else None,
    )


def _halved(above: Any, above_shape: Sequence[int]) -> Reader:
    """Reader of the level below ``above``: y and x halved by a rounded 2 x 2 mean (an odd
    last row / column is paired with itself)."""
    _, h, w = above_shape

    def read(z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        src = np.asarray(above[z0:z1, 2 * y0:min(2 * y1, h), 2 * x0:min(2 * x1, w)])
        pad_y, pad_x = 2 * (y1 - y0) - src.shape[1], 2 * (x1 - x0) - src.shape[2]
        if pad_y or pad_x:
            src = np.pad(src, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
        total = src[:, 0::2, 0::2].astype(np.uint32)  # (z, h, w)
        total += src[:, 1::2, 0::2]
        total += src[:, 0::2, 1::2]
        total += src[:, 1::2, 1::2]
        total += 2  # round half up
        total //= 4
        return total.astype(above.dtype)

    return read


def _copy_images(frag: Fragment, folder: Path, *, new_id: str) -> None:
    """Copy mask / labels / ir PNGs byte for byte; a segment's ``<id>_`` prefix follows the new
    folder name."""
    for path in (frag.mask_path, frag.labels_path, frag.ir_path):
        if path is None:
            continue
        name = path.name
        if frag.layout == "segment" and name.startswith(f"{frag.id}_"):
            name = f"{new_id}_{name[len(frag.id) + 1:]}"
        shutil.copyfile(path, folder / name)


def _check_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    if (len(chunks) != 3 or not all(isinstance(c, int | np.integer) and c > 0
                                    for c in chunks)):
        raise InputError(f"chunks: expected three positive integers (z, y, x), got "
                         f"{list(chunks)}")
    return tuple(min(int(c), n) for c, n in zip(chunks, shape, strict=True))  # type: ignore


def parse_chunks(text: str) -> tuple[int, ...]:
    """``"64,256,256"`` -> (64, 256, 256); anything else is an InputError naming --chunks."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise InputError(f"--chunks: expected three positive integers Z,Y,X, got {text!r}")
    return values
