"""Kaggle "Vesuvius Challenge - Ink Detection" run-length encoding and the submission CSV.

The format, exactly: a mask ``[H, W]`` indexed (row, column) = (y, x) is flattened row-major
(left to right, then top to bottom), pixels are numbered from 1, and each run of ink pixels is
written as ``start length``; all numbers are separated by single spaces, runs are sorted and do
not overlap. An empty mask is the empty string. Example: the 2 x 3 mask ``[[0, 1, 1], [1, 0, 1]]``
is ``"2 3 6 1"`` (pixels 2, 3, 4 are one run, then pixel 6).

The submission file is ``Id,Predicted`` followed by one ``<id>,<rle>`` line per fragment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from scrollsam.errors import InputError
from scrollsam.io import atomic_path

__all__ = [
    "SUBMISSION_HEADER",
    "is_submission_id",
    "parse_pred_specs",
    "rle_decode",
    "rle_encode",
    "rle_encode_rows",
    "write_submission",
]

SUBMISSION_HEADER = "Id,Predicted"
_NUMBER = re.compile(r"[0-9]+")
_BAD_ID = re.compile(r"[\s,\"']")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask ``[H, W]`` (nonzero = ink) as Kaggle RLE (row-major, 1-indexed)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask: expected a 2-D array [H, W], got shape {mask.shape}")
    return "".join(rle_encode_rows([mask]))


def rle_encode_rows(bands: Iterable[np.ndarray]) -> Iterator[str]:
    """:func:`rle_encode` of a mask given as row bands [b, W] from top to bottom (nonzero =
    ink), streamed: yields pieces (``"start length"`` pairs, space-separated) whose
    concatenation is exactly ``rle_encode`` of the whole mask. Memory: one band; a run that
    crosses a band's end is carried into the next."""
    offset, first = 0, True  # pixels before this band; nothing written yet
    open_start: int | None = None  # 0-based start of a run still open at the last band's end
    width = None
    for band in bands:
        band = np.asarray(band)
        if band.ndim != 2 or (width is not None and band.shape[1] != width):
            raise InputError(f"bands: expected 2-D row bands of one width, got shape "
                             f"{band.shape}")
        width = band.shape[1]
        flat = np.zeros(band.size + 2, dtype=bool)
        flat[1:-1] = band.reshape(-1) != 0  # (b * W,) row-major
        flat[0] = open_start is not None  # a run from the band above continues into this one
        edges = np.flatnonzero(flat[1:-1] != flat[:-2])  # changes at pixel i, 0-based in band
        starts_ends = (edges + offset).tolist()
        if open_start is not None:  # the first edge closes the carried run (or none: open)
            starts_ends = [open_start, *starts_ends]
        if len(starts_ends) % 2:  # a run open at this band's end: carry it
            open_start = starts_ends.pop()
        else:
            open_start = None
        pairs = np.asarray(starts_ends, dtype=np.int64).reshape(-1, 2)  # (runs, [start, end))
        if pairs.size:
            text = " ".join(map(str, np.stack([pairs[:, 0] + 1, pairs[:, 1] - pairs[:, 0]],
                                              axis=1).reshape(-1).tolist()))
            yield text if first else " " + text
            first = False
        offset += band.size
    if open_start is not None:
        yield ("" if first else " ") + f"{open_start + 1} {offset - open_start}"


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode Kaggle RLE into a bool mask of ``shape`` = (H, W); the inverse of :func:`rle_encode`.

    Accepts any whitespace between numbers and runs that touch (``1 2 3 1``), which
    :func:`rle_encode` would have merged. Raises InputError for anything else: a token that is
    not a plain decimal number, an odd count, a start < 1 or length < 1, runs not sorted or
    overlapping, or a run past the last pixel.
    """
    if len(shape) != 2 or any(int(n) < 0 for n in shape):
        raise InputError(f"shape: expected (height, width) >= 0, got {tuple(shape)}")
    height, width = int(shape[0]), int(shape[1])
    size = height * width
    tokens = rle.split()
    for tok in tokens:
        if not _NUMBER.fullmatch(tok):
            raise InputError(f"rle: expected space-separated whole numbers, got {tok!r}")
        if len(tok) > 18:  # would overflow int64; no real mask has that many pixels
            raise InputError(f"rle: expected numbers up to {size}, got {tok}")
    if len(tokens) % 2:
        raise InputError(f"rle: expected (start, length) pairs, got {len(tokens)} numbers")
    mask = np.zeros(size, dtype=bool)
    if not tokens:
        return mask.reshape(height, width)
    pairs = np.array([int(t) for t in tokens], dtype=np.int64).reshape(-1, 2)  # (runs, 2)
    starts, lengths = pairs[:, 0], pairs[:, 1]
    if (starts < 1).any():
        raise InputError(f"rle: expected starts >= 1 (1-indexed), got {starts[starts < 1][0]}")
    if (lengths < 1).any():
        raise InputError(f"rle: expected lengths >= 1, got {lengths[lengths < 1][0]}")
    ends = starts + lengths - 1  # last pixel of each run, 1-indexed
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        i = int(bad[0])
        raise InputError(
            "rle: expected sorted, non-overlapping runs, got run "
            f"{starts[i + 1]} {lengths[i + 1]} after {starts[i]} {lengths[i]}"
        )
    if ends[-1] > size:
        raise InputError(
            f"rle: expected runs inside {size} pixels ({height} x {width}), "
            f"got a run ending at pixel {ends[-1]}"
        )
    change = np.zeros(size + 1, dtype=np.int8)  # +1 where a run starts, -1 just after it ends
    change[starts - 1] += 1  # starts are distinct, and so are ends: += is safe here
    change[ends] -= 1  # a run touching the next one gives +1 - 1 = 0 at the join
    mask[:] = np.cumsum(change[:-1], dtype=np.int8) > 0
    return mask.reshape(height, width)


def is_submission_id(ident: str) -> bool:
    """Whether ``ident`` can be an Id of the submission CSV: not empty, and no comma, quote or
    whitespace (they would break the CSV line)."""
    return bool(ident) and not _BAD_ID.search(ident)


def parse_pred_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """Parse ``ID=PATH`` strings into (id, path) pairs, in order.

    Raises InputError for a spec without ``=``, an empty id or path, an id holding a comma,
    quote or whitespace (it would break the CSV), and an id given twice.
    """
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for spec in specs:
        ident, sep, path = spec.partition("=")
        if not sep or not ident or not path:
            raise InputError(f"--pred: expected ID=MASK.png, got {spec!r}")
        if _BAD_ID.search(ident):
            raise InputError(
                f"--pred: expected an id without commas, quotes or spaces, got {ident!r}"
            )
        if ident in seen:
            raise InputError(f"--pred: expected each id once, got {ident!r} twice")
        seen.add(ident)
        out.append((ident, Path(path)))
    return out


def write_submission(
    path: str | os.PathLike[str],
    rows: Iterable[tuple[str, np.ndarray | Iterable[np.ndarray]]],
    *,
    overwrite: bool = False,
    flag: str = "--out",
) -> int:
    """Write the Kaggle CSV (``Id,Predicted`` + one ``id,rle`` line per row, in order) atomically.

    rows: (id, mask) pairs, a mask being an array ``[H, W]`` or an iterable of its row bands
        (``[b, W]`` from top to bottom, encoded as they come, :func:`rle_encode_rows`);
        consumed one at a time, so a generator that loads each mask lazily keeps only one
        fragment (or one band) in memory.
    overwrite: an existing ``path`` (a link too, even one to nothing) is replaced only when
        True; otherwise InputError, raised before any row is read. A folder at ``path`` is
        never replaced (InputError, also before any row is read).
    flag: the option that named ``path``, which error messages name (``--out`` of
        ``scrollsam submit``, ``--submission`` of ``predict``).
    Returns the number of rows written. On any error nothing is written.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag}: expected a CSV file path, got a folder ({target})")
    if os.path.lexists(target) and not overwrite:  # a link counts, even one to nothing
        raise InputError(f"{flag}: expected a new file (--force to overwrite), got an existing "
                         f"{_kind(target)} ({target})")
    if not target.parent.is_dir():
        raise InputError(f"{flag}: expected a file in an existing folder, got none "
                         f"({target.parent})")
    count = 0
    seen: set[str] = set()
    try:
        with atomic_path(target, overwrite=overwrite) as tmp, open(
            tmp, "w", encoding="utf-8", newline="\n"
        ) as f:
            f.write(SUBMISSION_HEADER + "\n")
            for ident, mask in rows:
                if not is_submission_id(ident) or ident in seen:
                    raise InputError(
                        "id: expected a unique, non-empty id without commas, quotes or spaces, "
                        f"got {ident!r}"
                    )
                seen.add(ident)
                f.write(f"{ident},")
                for piece in rle_encode_rows([mask] if isinstance(mask, np.ndarray) else mask):
                    f.write(piece)  # a whole mask, or row bands streamed
                f.write("\n")
                count += 1
    except FileExistsError:
        raise InputError(f"{flag}: expected a new file (--force to overwrite), got an existing "
                         f"{_kind(target)} ({target})") from None
    return count


def _kind(path: Path) -> str:
    """``link`` for a link (to a file or to nothing), else ``file``."""
    return "link" if os.path.islink(path) else "file"
