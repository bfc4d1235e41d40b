"""Files in and out: atomic writes (temp file + rename) and reading 2-D images with clear errors.

Nothing scrollsam writes may be left half-written: a killed process leaves either the old file
or the new one, never a torn mix. Every writer goes through :func:`atomic_path` (or the two
one-call helpers built on it): the data goes to a temp file in the *same* folder (so the rename
never crosses file systems), is flushed to disk, and is then renamed over the target with
:func:`os.replace`, which is atomic on POSIX and Windows. When the file system refuses the
write (full disk, read-only, no permission) the temp file is removed, the target keeps its old
contents, and the error becomes one :class:`~scrollsam.errors.WriteError` line:
``no space left on device while writing last.pt (runs/x)``.

Reading: :func:`read_image` returns a 2-D array (rows, columns) = (y, x) from a PNG/TIFF/... file
and turns every failure into an :class:`~scrollsam.errors.InputError` that names the file.

Paths: :func:`within` is the one test of "this path is that folder or lies inside it", used
wherever an output must stay clear of input folders.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from scrollsam.errors import InputError, WriteError
from scrollsam.fs_errors import bounded_name, read_failure

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "read_image",
           "refused_write", "within", "write_failure", "write_png"]

# Pillow modes whose pixel array is already grey (or grey + alpha, or plain colour).
_DIRECT_MODES = frozenset(
    {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F", "RGB", "RGBA", "RGBX"}
)


# errno -> the few words an error line uses for it (a refused write the user can act on)
_REFUSED = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
}
_FULL_BYTES = 1 << 16  # a folder with less free space than this counts as full
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk


def write_failure(err: BaseException, folder: str | os.PathLike[str] | None = None) -> str | None:
    """Why the file system refused a write, in a few words (``"no space left on device"``), or
    None when ``err`` is not such a refusal. Some writers report a refused write without an
    errno: numpy's ``tofile`` says ``"262144 requested and 255872 written"`` (a full disk),
    OpenCV only returns False; for those the ``folder`` written into is asked whether it is
    read-only, not writable, or has less than 64 KiB free."""
    if not isinstance(err, OSError):
        return None
    if err.errno in _REFUSED:
        return _REFUSED[err.errno]
    if err.errno is None and _SHORT_WRITE.search(str(err)):  # numpy: the disk took less
        return _REFUSED[errno.ENOSPC]
    if err.errno is None and folder is not None:  # OpenCV says only False: ask the folder
        try:
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                return _REFUSED[errno.EROFS]
            if not os.access(folder, os.W_OK):
                return _REFUSED[errno.EACCES]
            if shutil.disk_usage(folder).free < _FULL_BYTES:
                return _REFUSED[errno.ENOSPC]
        except OSError:
            return None
    return None


def refused_write(err: OSError, out: str | os.PathLike[str] | None = None) -> str | None:
    """``no space left on device while writing NAME (FOLDER)`` for a refused write outside
    scrollsam's own writers (a mkdir, ...), else None; ``out``: the command's output, named when
    ``err`` names no file. A missing permission (EACCES, EPERM) may as well be a refused read,
    so it counts only for a path inside ``out``. Never raises: a folder that cannot be looked
    into counts as missing."""
    name = Path(os.fsdecode(err.filename)) if err.filename else None
    if err.errno in (errno.EACCES, errno.EPERM) and not _inside_out(name, out):
        return None
    folder = name.parent if name is not None else (Path(out) if out else None)
    while folder is not None and not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent  # disk_usage needs a folder that exists
    cause = write_failure(err, folder)
    if cause is None:
        return None
    if name is not None:
        return f"{cause} while writing {name.name} ({name.parent})"
    return f"{cause} while writing output ({out})" if out else cause


def _inside_out(name: Path | None, out: str | os.PathLike[str] | None) -> bool:
    """``name`` (None: the output itself) lies in the output ``out``, links resolved."""
    if out is None:
        return False
    if name is None:
        return True
    return within(Path(os.path.realpath(name)), Path(os.path.realpath(out)))


def within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies below it, compared component by component as given: pass
    resolved paths (:meth:`Path.resolve`) so that links and ``..`` cannot hide one in the
    other. Touches no file system; ``/a/bc`` is not within ``/a/b``."""
    return path.is_relative_to(folder)


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that keeps its suffix (writers that pick the format
    from the extension, e.g. ``PIL.Image.save`` or ``cv2.imwrite``, still work), its stem cut
    where the name would pass 255 bytes (``.last.tmp-1a2b3c4d.pt`` for ``last.pt``)."""
    return path.with_name(bounded_name(path.stem, f".tmp-{secrets.token_hex(4)}{path.suffix}"))


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
    The block must create the temp file; writing nothing is an error (FileNotFoundError). A
    refused write (see :func:`write_failure`) in the block or the rename raises WriteError.

    overwrite: when False, raise ``FileExistsError`` if ``path`` exists (a link too, even a
        dangling one), both before the block
        runs and again just before the rename (a check, not a lock: two processes racing for
        the same new file can still both succeed; the later rename wins).
    fsync: flush the temp file to disk before the rename, so a power cut cannot leave an empty
        file under the final name.
    """
    target = Path(path)
    if not overwrite and os.path.lexists(target):  # a link counts, even one to nothing
        raise FileExistsError(f"{target}: file exists")
    tmp = _temp_sibling(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the block inside atomic_path wrote no file")
        if fsync:
            _fsync_file(tmp)
        if not overwrite and os.path.lexists(target):
            raise FileExistsError(f"{target}: file exists")
        os.replace(tmp, target)
    except OSError as err:
        cause = None if isinstance(err, WriteError) else write_failure(err, target.parent)
        if cause is None:
            raise
        raise WriteError(f"{cause} while writing {target.name} ({target.parent})") from err
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):  # never hide the error that got us here
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


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a uint8 / uint16 grey [H, W] or BGR [H, W, 3] image as PNG, atomically.

    The PNG is encoded in memory and written by Python, so a full disk or a read-only folder
    raises :class:`WriteError` naming the file; ``cv2.imwrite`` reports any failure only as
    False, and once its partial file is gone the folder may no longer look full."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(".png", image)
    except cv2.error:
        ok = False
    if not ok:  # not the disk: OpenCV cannot encode this array
        raise ValueError(f"cannot encode a {image.dtype} {image.shape} array as PNG ({path})")
    atomic_write_bytes(path, encoded.tobytes())
    return path


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel image as a 2-D array ``[H, W]`` indexed (row, column) = (y, x).

    Returned dtypes: bool for 1-bit images, uint8 for 8-bit, uint16 (or int32) for 16-bit,
    float32 for floating-point TIFFs. Colour images are accepted only when all colour channels
    are equal (a grey image saved as RGB); with an alpha channel, fully transparent pixels read
    0 (a mask drawn as its alpha). Very large images (whole
    fragments exceed Pillow's decompression-bomb limit) are read without that limit.

    Raises InputError naming ``path`` when the file is missing, cannot be read (``cannot read
    image: permission denied (PATH)``), is not an image Pillow reads, or is truly colour.
    """
    p = Path(path)
    try:
        os.stat(p)
    except OSError as err:  # missing, a link to nothing, a folder we may not look into, ...
        if err.errno == errno.ENOENT and not os.path.islink(p):
            raise InputError(f"{p}: expected an image file, got no such file") from None
        raise InputError(f"cannot read image: {read_failure(err, p)} ({p})") from None
    if os.path.isdir(p):
        raise InputError(f"{p}: expected an image file, got a folder")
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
    except OSError as err:
        if err.errno is not None:  # the file system, not the image: permission, I/O error, ...
            raise InputError(f"cannot read image: {read_failure(err, p)} ({p})") from None
        raise InputError(f"{p}: expected an image Pillow can read, got {err}") from None
    except (ValueError, SyntaxError) as err:  # Pillow's errors for corrupt files
        raise InputError(f"{p}: expected an image Pillow can read, got {err}") from None
    if arr.ndim == 3:  # (H, W, C) colour: keep it only if it is grey
        colour = arr[..., :3] if mode in ("RGB", "RGBA", "RGBX") else arr[..., :1]
        channels = range(1, colour.shape[-1])
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in channels):
            raise InputError(f"{p}: expected a single-channel (grey) image, got {mode} colour")
        grey = colour[..., 0]
        if mode in ("LA", "RGBA"):  # fully transparent pixels read 0 (a shape drawn as alpha)
            grey = np.where(arr[..., -1] == 0, grey.dtype.type(0), grey)
        arr = grey
    if arr.ndim != 2:
        raise InputError(f"{p}: expected a 2-D image, got an array of shape {arr.shape}")
    if arr.dtype.byteorder not in ("=", "|"):  # big-endian 16-bit modes
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(arr)
