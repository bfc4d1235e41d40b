"""The segment-scale output: a chunked OME-Zarr probability map with a pyramid, written by bands.

Layout of ``OUT/prob.ome.zarr`` (Zarr v2 format, OME-NGFF 0.4 metadata written by ``ome_zarr``
through :func:`scrollsam.ngff.write_multiscales`, axes (y, x), so napari's ``napari-ome-zarr``
plugin and the Vesuvius tools open it)::

    prob.ome.zarr/0, 1, ..., L     ink probability [H / 2**l, W / 2**l] (ceil), chunks C x C;
                                   uint8 = round(255 * p) (as prob.png; p = value / 255), or
                                   float16 = p; level l + 1 is the 2 x 2 mean of level l
    prob.ome.zarr/labels/ink/0..L  the mask, uint8 1 = ink (p >= threshold, the rule of
                                   :mod:`scrollsam.metrics`), 0 elsewhere; level l + 1 is the
                                   2 x 2 maximum (thin strokes stay visible when zoomed out)

Levels are added until the longest side fits one chunk. Pixels outside the fragment mask are 0,
and chunks that are all 0 are not stored (Zarr's default), so a sparse segment stays small.

With a threshold adapted to the fragment, the mask is written at the run's threshold and later
rewritten at the fragment's (:func:`scrollsam.infer.segment.adapt_mask`), which is one of the
candidates 0.01 ... 0.99 (:mod:`.threshold`). The stored values cannot tell every pixel's side
of it (a uint8 value spans 1/255, float16 a little less), so ``OUT/.predict/rounding.zarr``
keeps, per pixel, what the rounding lost: int8 = the
:func:`~scrollsam.infer.threshold.candidate_ranks` of the probability minus those of its
stored value, mostly 0 (chunks of 0 are not stored). The stored values plus it give the exact
ranks (:meth:`ZarrOutput.ranks`), so the rewritten mask is the one the probabilities
themselves give, as in PNG mode.

Level 0 is written band by band (:meth:`ZarrOutput.write_band`): a band is a run of whole chunk
rows, so two processes never write the same chunk. The pyramid is built afterwards from level 0,
one chunk row at a time per process (:meth:`ZarrOutput.build_level`). Memory is a band of rows,
never a level.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from ome_zarr.format import FormatV04

with warnings.catch_warnings():  # ome_zarr 0.18 warns about its own Scaler at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import write_label_metadata

from scrollsam import ngff
from scrollsam.errors import InputError
from scrollsam.infer.band_state import STATE_NAME
from scrollsam.infer.outputs import block_mean, overlay_factor
from scrollsam.infer.threshold import candidate_ranks
from scrollsam.io import write_png
from scrollsam.train.distributed import World, row_bands

ZARR_NAME = "prob.ome.zarr"
ROUNDING_NAME = "rounding.zarr"  # in OUT/.predict/: what rounding the stored values lost
LABEL_NAME = "ink"
VALUE_TYPES = ("uint8", "float16")
DEFAULT_CHUNK = 1024
PREVIEW_MAX_SIDE = 2048
_KEYS = {"name": "v2", "separator": "/"}  # chunk files 0/0, 0/1, ... as OME-Zarr 0.4 expects


def level_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level: level 0 is ``shape``, each next one halves it (ceil),
    until the longest side fits in one chunk."""
    h, w = shape
    out = [(h, w)]
    while max(h, w) > chunk:
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


def encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of probabilities float32 [..] in [0, 1]: uint8 ``round(255 p)`` or float16."""
    if dtype == "uint8":
        return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    return prob.astype(np.float16)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Stored values (uint8 or float16) as 8-bit probabilities ``round(255 p)``."""
    if values.dtype == np.uint8:
        return values
    return np.rint(np.clip(values.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


class ZarrOutput:
    """``OUT/prob.ome.zarr`` of one fragment: create it (:meth:`create`, one process), then
    every process opens it and writes its own bands and pyramid rows."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / ZARR_NAME
        self.rounding_path = Path(out_dir) / STATE_NAME / ROUNDING_NAME
        self._root: zarr.Group | None = None
        self._rounding: zarr.Array | None = None

    @property
    def exists(self) -> bool:
        return (self.path / ".zgroup").is_file()

    def remove(self) -> None:
        """Delete the store (a restart)."""
        if self.path.exists():
            shutil.rmtree(self.path)

    def create(self, *, shape: tuple[int, int], chunk: int, dtype: str, name: str,
               threshold: float, rounding: bool = False) -> None:
        """Write the empty arrays of every level and their OME-NGFF 0.4 metadata; with
        ``rounding``, also the empty ``OUT/.predict/rounding.zarr`` (its folder must exist)."""
        if dtype not in VALUE_TYPES:
            raise InputError(f"--dtype: expected one of {', '.join(VALUE_TYPES)}, got {dtype!r}")
        root = zarr.open_group(self.path, mode="w", zarr_format=2)
        labels = root.create_group("labels").create_group(LABEL_NAME)
        shapes = level_shapes(shape, chunk)
        for level, lshape in enumerate(shapes):
            root.create_array(str(level), shape=lshape, chunks=(chunk, chunk), dtype=dtype,
                              fill_value=0, chunk_key_encoding=_KEYS)
            labels.create_array(str(level), shape=lshape, chunks=(chunk, chunk),
                                dtype="uint8", fill_value=0, chunk_key_encoding=_KEYS)
        scales = [(2**level, 2**level) for level in range(len(shapes))]
        ngff.write_multiscales(root, axes=("y", "x"), scales=scales, name=name)
        ngff.write_multiscales(labels, axes=("y", "x"), scales=scales, name=LABEL_NAME)
        write_label_metadata(root["labels"], LABEL_NAME, fmt=FormatV04(),
                             colors=[{"label-value": 1, "rgba": [255, 40, 40, 255]}])
        scale = "p = value / 255" if dtype == "uint8" else "p = value"
        root.attrs["scrollsam"] = {"values": scale, "threshold": float(threshold),
                                   "mask": f"labels/{LABEL_NAME}: 1 where p >= threshold"}
        if rounding:
            zarr.create_array(self.rounding_path, shape=shape, chunks=(chunk, chunk),
                              dtype="int8", fill_value=0, zarr_format=2,
                              chunk_key_encoding=_KEYS, overwrite=True)
        self._root = self._rounding = None

    # --- reading and writing ---------------------------------------------------------------

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(self.path, mode="r+", zarr_format=2)
        return self._root

    def levels(self) -> int:
        return len(self.root.attrs["multiscales"][0]["datasets"])

    def prob(self, level: int = 0) -> zarr.Array:
        """Probability array of ``level`` [H_l, W_l] (uint8 or float16)."""
        return self.root[str(level)]

    def mask(self, level: int = 0) -> zarr.Array:
        """Mask array of ``level`` [H_l, W_l], uint8 1 = ink."""
        return self.root[f"labels/{LABEL_NAME}/{level}"]

    @property
    def chunk(self) -> int:
        return int(self.prob(0).chunks[0])

    @property
    def has_rounding(self) -> bool:
        """Whether ``OUT/.predict/rounding.zarr`` exists (:meth:`create` with ``rounding``)."""
        return (self.rounding_path / ".zarray").is_file()

    @property
    def rounding(self) -> zarr.Array:
        """``OUT/.predict/rounding.zarr`` [H, W] int8: exact candidate ranks minus those of the
        stored values."""
        if self._rounding is None:
            self._rounding = zarr.open_array(self.rounding_path, mode="r+", zarr_format=2)
        return self._rounding

    def write_band(self, y0: int, prob: np.ndarray, ink: np.ndarray) -> None:
        """Level-0 rows [y0, y0 + len(prob)): probabilities float32 [b, W] and the mask bool
        [b, W] (and what rounding lost, when the store keeps it). The rows must be whole chunk
        rows (the last may end at the border)."""
        arr = self.prob(0)
        h, c = arr.shape[0], self.chunk
        y1 = y0 + prob.shape[0]
        if y0 % c or (y1 % c and y1 != h):
            raise InputError(f"band rows {y0}:{y1}: expected whole chunk rows of {c}")
        stored = encode(prob, str(arr.dtype))  # (b, W)
        arr[y0:y1] = stored
        self.mask(0)[y0:y1] = ink.astype(np.uint8)
        if self.has_rounding:
            for a in range(0, y1 - y0, c):  # a chunk row at a time: small temporaries
                lost = (candidate_ranks(prob[a:a + c]).astype(np.int16)
                        - candidate_ranks(stored[a:a + c]))  # (c, W) mostly 0
                self.rounding[y0 + a:y0 + a + c] = lost.astype(np.int8)

    def ranks(self, y0: int, y1: int) -> np.ndarray:
        """uint8 [y1 - y0, W]: the exact :func:`~scrollsam.infer.threshold.candidate_ranks` of
        the probabilities of level-0 rows [y0, y1), from the stored values and the rounding."""
        ranks = candidate_ranks(self.prob(0)[y0:y1]).astype(np.int16)  # (b, W)
        return (ranks + self.rounding[y0:y1]).astype(np.uint8)

    def build_level(self, level: int, world: World) -> None:
        """Level ``level`` (>= 1) from the one below: this process's chunk rows (dealt
        round-robin, :func:`row_bands`), each read as 2 chunk rows of the level below."""
        c = self.chunk
        src_p, src_m = self.prob(level - 1), self.mask(level - 1)
        dst_p, dst_m = self.prob(level), self.mask(level)
        for a, b in row_bands(dst_p.shape[0], band_rows=c, world=world):
            rows = src_p[2 * a:2 * b]  # (2c, W_prev)
            dtype = np.uint8 if rows.dtype == np.uint8 else np.float32
            mean = block_mean(lambda i, j, r=rows: r[i:j], rows.shape, 2, dtype=dtype)
            dst_p[a:b] = mean.astype(rows.dtype)
            dst_m[a:b] = _block_max(src_m[2 * a:2 * b])

    def mask_rows(self) -> Iterator[np.ndarray]:
        """Level-0 mask as bool row bands [c, W] from top to bottom (streaming RLE)."""
        arr = self.mask(0)
        for y0 in range(0, arr.shape[0], self.chunk):
            yield arr[y0:y0 + self.chunk] > 0

    def write_previews(self, out_dir: Path, *, max_side: int = PREVIEW_MAX_SIDE) -> dict[str, Path]:
        """``prob_preview.png`` (8-bit probability) and ``mask_preview.png`` (share of ink per
        block, 0..255): level 0 block-averaged so the longest side is at most ``max_side``."""
        shape = self.prob(0).shape
        f = overlay_factor(shape, max_side)
        step = f * max(1, round(self.chunk / f))  # about a chunk row of rows, whole blocks
        out = {}
        for key, arr, scale in (("prob_preview", self.prob(0), None),
                                ("mask_preview", self.mask(0), 255)):
            parts = []
            for y0 in range(0, shape[0], step):
                rows = to_uint8(arr[y0:y0 + step]) if scale is None else arr[y0:y0 + step] * \
                    np.uint8(scale)  # (step, W) uint8
                parts.append(block_mean(lambda i, j, r=rows: r[i:j], rows.shape, f,
                                        dtype=np.uint8))
            out[key] = write_png(out_dir / f"{key}.png", np.concatenate(parts))
        return out


def _block_max(rows: np.ndarray) -> np.ndarray:
    """2 x 2 maximum of [h, w] (partial blocks at the far borders): [ceil(h/2), ceil(w/2)]."""
    h, w = rows.shape
    padded = np.zeros((h + h % 2, w + w % 2), rows.dtype)
    padded[:h, :w] = rows
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))
