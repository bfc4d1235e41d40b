"""Files in and out: atomic writes (temp file + rename) and reading 2-D images with clear errors.

Nothing scrollsam writes may be left half-written: a killed process leaves either the old file
or the new one, never a torn mix. Every writer goes through :func:`atomic_path` (or the two
one-call helpers built on it): the data goes to a temp file in the *same* folder (so the rename
never crosses file systems), is flushed to disk, and is then renamed over the target with
:func:`os.replace`, which is atomic on POSIX and Windows.

Reading: :func:`read_image` returns a 2-D array (rows, columns) = (y, x) from a PNG/TIFF/... file
and turns every failure into an :class:`~scrollsam.errors.InputError` that names the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from scrollsam.errors import InputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "read_image"]

# Pillow modes whose pixel array is already grey (or grey + alpha, or plain colour).
_DIRECT_MODES = frozenset(
    {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F", "RGB", "RGBA", "RGBX"}
)


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that keeps its suffix (writers that pick the format
    from the extension, e.g. ``PIL.Image.save`` or ``cv2.imwrite``, still work)."""
    return path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, overwrite: bool = True, fsync: bool = True
) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block ends without an exception, rename it
    onto ``path``. On an exception the temp file is removed and ``path`` is left untouched.

    The temp name is hidden (leading dot) and keeps ``path``'s suffix, so format-by-extension
    writers work: ``with atomic_path("out/mask.png") as tmp: Image.fromarray(m).save(tmp)``.
    The block must create the temp file; writing nothing is an error (FileNotFoundError).

    overwrite: when False, raise ``FileExistsError`` if ``path`` exists, both before the block
        runs and again just before the rename (a check, not a lock: two processes racing for
        the same new file can still both succeed; the later rename wins).
    fsync: flush the temp file to disk before the rename, so a power cut cannot leave an empty
        file under the final name.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target}: file exists")
    tmp = _temp_sibling(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the block inside atomic_path wrote no file")
        if fsync:
            _fsync_file(tmp)
        if not overwrite and target.exists():
            raise FileExistsError(f"{target}: file exists")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", overwrite: bool = True
) -> None:
    """Write ``text`` to ``path`` atomically. Newlines are written as given (no translation)."""
    atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel image as a 2-D array ``[H, W]`` indexed (row, column) = (y, x).

    Returned dtypes: bool for 1-bit images, uint8 for 8-bit, uint16 (or int32) for 16-bit,
    float32 for floating-point TIFFs. Colour images are accepted only when all colour channels
    are equal (a grey image saved as RGB); an alpha channel is dropped. Very large images (whole
    fragments exceed Pillow's decompression-bomb limit) are read without that limit.

    Raises InputError naming ``path`` when the file is missing, unreadable, or truly colour.
    """
    p = Path(path)
    if not p.is_file():
        what = "a folder" if p.is_dir() else "no such file"
        raise InputError(f"{p}: expected an image file, got {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(p) as img:
                    img.load()
                    if img.mode not in _DIRECT_MODES:  # palette, CMYK, ...: to colour first
                        img = img.convert("RGBA")
                    mode = img.mode
                    arr = np.asarray(img)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's errors for corrupt files
        raise InputError(f"{p}: expected an image Pillow can read, got {err}") from None
    if arr.ndim == 3:  # (H, W, C) colour: keep it only if it is grey
        colour = arr[..., :3] if mode in ("RGB", "RGBA", "RGBX") else arr[..., :1]
        channels = range(1, colour.shape[-1])
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in channels):
            raise InputError(f"{p}: expected a single-channel (grey) image, got {mode} colour")
        arr = colour[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{p}: expected a 2-D image, got an array of shape {arr.shape}")
    if arr.dtype.byteorder not in ("=", "|"):  # big-endian 16-bit modes
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(arr)
