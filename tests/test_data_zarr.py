"""Zarr / OME-Zarr fragment volumes: the same windows, batches and predictions as the TIFF
layout, chunk-bounded reads, pickling, one-line errors (convert itself: test_data_convert)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from infer_helpers import make_run
from torch.utils.data import DataLoader
from zarr_helpers import CHUNKS, D, H, W, tiff_pair, zarr_copy

from scrollsam import ngff
from scrollsam.cli import main
from scrollsam.data.convert import convert_fragment
from scrollsam.data.dataset import make_datasets
from scrollsam.data.fragment import Fragment
from scrollsam.data.views import make_view
from scrollsam.errors import FragmentError
from scrollsam.infer.predict import Predictor

# (format, zarr_format): plain v2 / v3 arrays, OME-NGFF 0.4 (zarr v2) and 0.5 (zarr v3)
STORES = [("zarr", 2), ("zarr", 3), ("ome-zarr", 2), ("ome-zarr", 3)]
WINDOWS = [
    (0, D, 0, H, 0, W),  # everything
    (1, 4, 5, 30, 7, 50),  # inside, crossing chunk borders
    (0, 6, -10, 10, 50, 80),  # over the top-left and right edges
    (2, 3, 40, 60, -7, 3),  # over the bottom-left corner
    (0, 1, 100, 110, 100, 110),  # wholly outside
]


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory):
    return tiff_pair(tmp_path_factory.mktemp("tiff"))


# --- the same data as the TIFF layout -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["kaggle", "segment"])
@pytest.mark.parametrize(("fmt", "zf"), STORES)
def test_zarr_copy_reads_the_same_windows(tiffs, tmp_path, layout, fmt, zf):
    tiff = Fragment(tiffs[layout])
    copy = Fragment(zarr_copy(tiffs[layout], tmp_path, fmt, zf))
    store = "surface_volume.zarr" if layout == "kaggle" else "layers.zarr"
    assert copy.layout == layout and copy.store == fmt and copy.volume_path.name == store
    assert copy.zarr_info.zarr_format == zf and copy.slice_paths == []
    assert (copy.shape, copy.dtype, copy.id) == (tiff.shape, tiff.dtype, tiff.id)
    for window in WINDOWS:
        got = copy.read(*window)
        assert got.dtype == np.uint16 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, tiff.read(*window), err_msg=str(window))
    np.testing.assert_array_equal(copy.mask(), tiff.mask())
    np.testing.assert_array_equal(copy.labels(), tiff.labels())
    np.testing.assert_array_equal(copy.ir(), tiff.ir())
    if layout == "segment":
        assert copy.mask_path.name == f"{copy.id}_mask.png"



@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")
def test_ome_zarr_written_by_ome_zarr_library(tiffs, tmp_path):
    """An independent writer (ome-zarr-py: paths s0, s1, translations) reads the same."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    tiff = Fragment(tiffs["kaggle"])
    volume = tiff.read(0, D, 0, H, 0, W)
    for fmt, zf in ((FormatV04(), 2), (FormatV05(), 3)):
        folder = tmp_path / fmt.version / "frag"
        folder.mkdir(parents=True)
        for name in ("mask.png", "inklabels.png", "ir.png"):
            shutil.copy(tiffs["kaggle"] / name, folder / name)
        group = zarr.open_group(folder / "surface_volume.zarr", mode="w", zarr_format=zf)
        write_image(volume, group, axes="zyx", fmt=fmt, scale_factors=(2,),
                    storage_options={"chunks": (3, 16, 16)}, scaler=None)
        frag = Fragment(folder)
        assert frag.zarr_info.array_path == "s0" and frag.zarr_info.ngff_version == fmt.version
        np.testing.assert_array_equal(frag.read(1, 5, -3, 30, 20, 70), tiff.read(1, 5, -3, 30,
                                                                                   20, 70))


def test_size_one_leading_axes_are_dropped_and_byte_order_is_native(tiffs, tmp_path):
    """OME-Zarr t, c, z, y, x with t = c = 1 reads as (z, y, x); big-endian voxels come back in
    native order; uint8 volumes work too."""
    tiff = Fragment(tiffs["kaggle"])
    volume = tiff.read(0, D, 0, H, 0, W)  # (z, y, x)
    folder = _pngs_only(tiffs["kaggle"], tmp_path / "tczyx")
    group = zarr.open_group(folder / "surface_volume.zarr", mode="w", zarr_format=2)
    arr = group.create_array("0", shape=(1, 1, D, H, W), chunks=(1, 1, 4, 16, 16), dtype=">u2")
    arr[:] = volume[None, None]
    ngff.write_multiscales(group, axes=("t", "c", "z", "y", "x"), scales=[(1, 1, 1, 1, 1)])
    frag = Fragment(folder)
    assert frag.zarr_info.lead == 2 and frag.dtype == np.dtype("=u2")
    got = frag.read(0, D, -4, 20, 30, 70)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, tiff.read(0, D, -4, 20, 30, 70))

    folder8 = _pngs_only(tiffs["kaggle"], tmp_path / "u8")
    small = (volume >> 8).astype(np.uint8)
    zarr.create_array(folder8 / "surface_volume.zarr", data=small, chunks=(2, 16, 16),
                      zarr_format=3)
    np.testing.assert_array_equal(Fragment(folder8).read(0, D, 0, H, 0, W), small)


def _pngs_only(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for p in src.glob("*.png"):
        shutil.copy(p, folder / p.name)
    return folder


# --- lazy, chunk-bounded, picklable -------------------------------------------------------------


# chunk (iz, iy, ix) -> its file in the store, per store kind
CHUNK_FILES = {
    ("zarr", 2): lambda store, z, y, x: store / f"{z}.{y}.{x}",  # zarr v2 default: "." keys
    ("ome-zarr", 2): lambda store, z, y, x: store / "0" / f"{z}/{y}/{x}",  # NGFF 0.4: "/"
    ("ome-zarr", 3): lambda store, z, y, x: store / "0" / "c" / f"{z}/{y}/{x}",
}


@pytest.mark.parametrize(("fmt", "zf"), list(CHUNK_FILES))
def test_a_window_reads_only_the_chunks_it_touches(tiffs, tmp_path, fmt, zf):
    frag = Fragment(zarr_copy(tiffs["kaggle"], tmp_path, fmt, zf))

    def size(z, y, x):
        return CHUNK_FILES[fmt, zf](frag.volume_path, z, y, x).stat().st_size

    assert frag.bytes_read == 0  # probing reads metadata only; metadata is never counted
    frag.read(1, 3, 17, 20, 33, 40)  # inside chunk (0, 1, 2) of 4 x 16 x 16
    assert frag.bytes_read == size(0, 1, 2)
    before = frag.bytes_read
    frag.read(3, 5, 10, 20, -5, 20)  # z chunks 0-1, y chunks 0-1, x chunks 0-1 (x < 0: none)
    touched = sum(size(z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1))
    assert frag.bytes_read - before == touched  # 8 of the 2 x 3 x 4 chunks


def test_pickle_round_trip_and_dataloader_workers(tiffs, tmp_path):
    frag = Fragment(zarr_copy(tiffs["kaggle"], tmp_path, "ome-zarr", 2))
    first = frag.read(0, D, 3, 40, 2, 50)
    clone = pickle.loads(pickle.dumps(frag))
    assert clone.bytes_read == 0 and clone._zarr._array is None  # no open store travels
    np.testing.assert_array_equal(clone.read(0, D, 3, 40, 2, 50), first)
    assert clone.bytes_read > 0
    frag.close()
    np.testing.assert_array_equal(frag.read(0, D, 3, 40, 2, 50), first)  # re-opens

    view = make_view("slices", "every", depth=D)
    train, _ = make_datasets([frag], view, size=32, samples_per_epoch=6, seed=0, min_valid=0.1)
    serial = [b["image"] for b in DataLoader(train, batch_size=3)]
    workers = [b["image"] for b in DataLoader(train, batch_size=3, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, workers, strict=True))


# --- training batches and predictions are bit-identical -----------------------------------------


def test_training_batches_are_bit_identical(data, tmp_path):
    tiff = Fragment(data / "train" / "1")
    copy = Fragment(convert_fragment(tiff, tmp_path / "z" / "1", format="ome-zarr",
                                     chunks=(3, 48, 40)))
    view = make_view("slices", "range", depth=8)
    a_train, a_valid = make_datasets([tiff], view, size=64, samples_per_epoch=4, seed=5)
    b_train, b_valid = make_datasets([copy], view, size=64, samples_per_epoch=4, seed=5)
    for a, b in ((a_train, b_train), (a_valid, b_valid)):
        assert len(a) == len(b)
        for i in range(min(len(a), 4)):
            for key in ("image", "label", "valid"):
                assert torch.equal(a[i][key], b[i][key]), (key, i)


def test_predictions_are_bit_identical(data, tmp_path):
    tiff = data / "train" / "2"
    copy = convert_fragment(tiff, tmp_path / "z" / "2", format="zarr", zarr_format=3,
                            chunks=(4, 64, 64))
    run = make_run(tmp_path / "run", "data.input=slices", "data.strategy=triplet",
                   "data.z_start=2", "data.z_end=6")
    pred = Predictor.from_run(run, device="cpu")
    a, b = pred.predict_fragment(tiff), pred.predict_fragment(copy)
    assert a.prob.shape == (160, 160) and a.prob.max() > 0
    assert np.array_equal(a.prob, b.prob)


# --- bad input: one line naming the path ---------------------------------------------------------


def _kaggle_with_store(tiffs, tmp_path: Path, make) -> Path:
    """A fragment folder of the kaggle PNGs plus ``make(store_path)``'s volume."""
    folder = _pngs_only(tiffs["kaggle"], tmp_path / "bad")
    make(folder / "surface_volume.zarr")
    return folder


def _array(data, **kw):
    return lambda p: zarr.create_array(p, data=data, **kw)


def _ome(shape, axes, dtype="u2"):
    def make(p):
        g = zarr.open_group(p, mode="w", zarr_format=2)
        g.create_array("0", shape=shape, dtype=dtype)
        ngff.write_multiscales(g, axes=axes, scales=[[1] * len(axes)])
    return make


def _garbled(p):
    zarr.create_array(p, data=np.zeros((D, H, W), np.uint16), zarr_format=2)
    (p / ".zarray").write_text("{not json")


def _plain_group(p):
    zarr.open_group(p, mode="w").create_array("0", shape=(D, H, W), dtype="u2")


BAD = {
    "float voxels": (_array(np.zeros((D, H, W), np.float32)), "expected uint8 or uint16"),
    "signed voxels": (_array(np.zeros((D, H, W), np.int16), zarr_format=2),
                      "expected uint8 or uint16"),
    "2-D array": (_array(np.zeros((H, W), np.uint16)), "expected a 3-D (z, y, x) volume"),
    "4-D array": (_array(np.zeros((2, D, H, W), np.uint16)), "got shape (2, 6, 44, 58)"),
    "channel axis": (_ome((2, D, H, W), ("c", "z", "y", "x")), "axes (c, z, y, x)"),
    "axis order": (_ome((D, W, H), ("z", "x", "y")), "axes (z, x, y)"),
    "axes vs dims": (_ome((D, H, W), ("y", "x")), "lists 2 axes"),
    "no multiscales": (_plain_group, "without OME-Zarr multiscales"),
    "empty store": (lambda p: p.mkdir(), "not a readable Zarr store"),
    "garbled metadata": (_garbled, "not a readable Zarr store"),
    "a file": (lambda p: p.write_bytes(b"zarr"), "expected a Zarr store (a folder)"),
    "empty volume": (_array(np.zeros((0, H, W), np.uint16)), "empty volume"),
    "PNG size": (_array(np.zeros((D, H + 1, W), np.uint16)),
                 "image is 44x58 but the volume is 45x58"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_zarr_volume_is_one_line_naming_the_path(tiffs, tmp_path, case):
    make, words = BAD[case]
    folder = _kaggle_with_store(tiffs, tmp_path, make)
    with pytest.raises(FragmentError) as err:
        Fragment(folder)
    line = str(err.value)
    assert words in line and "\n" not in line
    assert str(folder) in line


def test_tiff_folder_and_zarr_store_together_are_refused(tiffs, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tiffs["kaggle"], folder)
    convert_fragment(tiffs["kaggle"], tmp_path / "z" / "frag", chunks=CHUNKS)
    shutil.copytree(tmp_path / "z" / "frag" / "surface_volume.zarr",
                    folder / "surface_volume.zarr")
    with pytest.raises(FragmentError, match=r"both surface_volume/ and surface_volume.zarr "
                                            r"exist; keep one volume"):
        Fragment(folder)


def test_cli_exits_2_with_one_line(tiffs, tmp_path, capsys):
    folder = _kaggle_with_store(tiffs, tmp_path, _ome((2, D, H, W), ("c", "z", "y", "x")))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: expected a 3-D (z, y, x) volume") and "\n" not in err


def test_corrupt_chunk_is_an_error_at_read(tiffs, tmp_path):
    frag = Fragment(zarr_copy(tiffs["kaggle"], tmp_path, "zarr", 2))
    (frag.volume_path / "0.1.1").write_bytes(b"not a blosc frame")
    frag.read(0, 2, 0, 8, 0, 8)  # other chunks are fine
    with pytest.raises(FragmentError, match=r"corrupt or unreadable Zarr chunk .*surface_vol"):
        frag.read(0, 2, 20, 24, 20, 24)


def test_a_corrupt_chunk_leaves_no_read_running_behind_its_error(tiffs, tmp_path):
    # Before: the window's other chunk reads were left running on zarr's event loop; a CLI that
    # exited on the error then printed asyncio's "Task was destroyed but it is pending!".
    import asyncio

    from zarr.core import sync

    frag = Fragment(zarr_copy(tiffs["kaggle"], tmp_path, "zarr", 2))
    (frag.volume_path / "0.0.0").write_bytes(b"not a blosc frame")
    with pytest.raises(FragmentError, match=r"corrupt or unreadable Zarr chunk"):
        frag.read(0, D, 0, H, 0, W)  # every chunk: the first fails, the others still run

    async def running() -> int:
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    assert asyncio.run_coroutine_threadsafe(running(), sync.loop[0]).result(5) == 0


def test_too_few_slices_for_the_view(tiffs, tmp_path):
    frag = Fragment(zarr_copy(tiffs["kaggle"], tmp_path, "ome-zarr", 2))
    with pytest.raises(FragmentError, match=r"has 6 slices, view .* needs"):
        make_view("slices", "triplet").check(frag)


def test_tiff_fragments_still_name_their_slices(tiffs):
    frag = Fragment(tiffs["kaggle"])
    assert frag.store == "tiff" and frag.zarr_info is None
    assert frag.volume_files == frag.slice_paths and len(frag.slice_paths) == D
