"""Fragment: layout detection, validation errors naming the file, windowed reads and their bound."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import FragmentError, InputError


def small(tmp_path: Path, name: str = "frag", **kw) -> Path:
    opts = {"height": 48, "width": 64, "depth": 6, "seed": 3, **kw}
    return write_fragment(tmp_path / name, **opts)


def test_kaggle_layout_attributes(tmp_path):
    frag = Fragment(small(tmp_path))
    assert frag.layout == "kaggle"
    assert frag.id == "frag"
    assert frag.shape == (6, 48, 64) and (frag.depth, frag.height, frag.width) == (6, 48, 64)
    assert frag.dtype == np.uint16
    assert [p.name for p in frag.slice_paths] == [f"{z:02d}.tif" for z in range(6)]
    mask, labels, ir = frag.mask(), frag.labels(), frag.ir()
    assert mask.dtype == bool and mask.shape == (48, 64) and 0 < mask.mean() < 1
    assert labels.dtype == bool and labels.shape == (48, 64) and labels.any()
    assert ir.dtype == np.uint8 and ir.shape == (48, 64)


def test_segment_layout(tmp_path):
    src = small(tmp_path, "20230505")
    (src / "surface_volume").rename(src / "layers")
    (src / "mask.png").rename(src / "20230505_mask.png")
    (src / "inklabels.png").rename(src / "20230505_inklabels.png")
    frag = Fragment(src)
    assert frag.layout == "segment" and frag.id == "20230505"
    assert frag.labels() is not None and frag.mask_path.name == "20230505_mask.png"
    assert frag.read(0, 6, 0, 48, 0, 64).shape == (6, 48, 64)


def test_labels_under_another_name_are_named_in_a_warning(tmp_path, caplog):
    src = small(tmp_path, "20230505")
    (src / "surface_volume").rename(src / "layers")
    (src / "mask.png").rename(src / "20230505_mask.png")  # labels keep Kaggle's name
    with caplog.at_level("WARNING"):
        assert Fragment(src).labels() is None
    assert caplog.messages == ["fragment 20230505: no 20230505_inklabels.png, so no ink labels; "
                               "inklabels.png not read (rename it to 20230505_inklabels.png to "
                               "use it)"]


def test_corrupt_png_pixel_data_is_one_error_line_with_libpngs_cause(tmp_path, capfd):
    # Before: libpng printed "libpng error: IDAT: ..." to stderr ahead of the error line.
    from scrollsam.cli import main

    path = small(tmp_path)
    png = bytearray((path / "inklabels.png").read_bytes())
    at = png.find(b"IDAT") + 8
    png[at:at + 24] = bytes(b ^ 0x5A for b in png[at:at + 24])
    (path / "inklabels.png").write_bytes(bytes(png))
    with pytest.raises(FragmentError, match=r"^corrupt PNG: cannot decode pixel data: IDAT: "):
        Fragment(path)
    assert capfd.readouterr().err == ""
    assert main(["inspect", str(path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt PNG") and "inklabels.png" in err[0]


def test_holding_back_libpngs_stderr_is_one_swap_at_a_time_and_stderr_comes_back():
    # Review: two overlapping swaps (a PNG read in a worker thread) left fd 2 on a deleted
    # temp file, and every later error line was lost.
    import os
    import threading
    import time

    from scrollsam.data.formats import _quiet

    before = os.fstat(2)
    worker = threading.Thread(target=lambda: (time.sleep(0.05), _quiet(lambda: time.sleep(0.2))))
    worker.start()
    _quiet(lambda: time.sleep(0.1))  # started first, ends first
    worker.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_a_closed_stderr_does_not_break_reading_pngs(tmp_path):
    # Review: with 2>&- (sys.stderr None) every PNG read raised AttributeError.
    path = small(tmp_path)
    code = ("import sys; from pathlib import Path; from scrollsam.data.fragment import Fragment; "
            f"Fragment(Path({str(path)!r})).mask(); print('ok')")
    out = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{code}" 2>&-'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out


def test_optional_files_absent(tmp_path):
    path = small(tmp_path)
    (path / "inklabels.png").unlink()
    (path / "ir.png").unlink()
    frag = Fragment(path)
    assert frag.labels() is None and frag.ir() is None
    assert frag.labels_window(0, 4, 0, 4) is None and frag.ir_window(0, 4, 0, 4) is None


def test_read_window_matches_files_and_pads_outside(tmp_path):
    path = small(tmp_path)
    frag = Fragment(path)
    full = np.stack([tifffile.imread(p) for p in frag.slice_paths])  # [D, H, W]
    win = frag.read(1, 4, 5, 30, 7, 50)
    assert win.shape == (3, 25, 43) and win.dtype == np.uint16
    np.testing.assert_array_equal(win, full[1:4, 5:30, 7:50])
    # A window hanging over the top-left and bottom-right corners: zeros outside.
    pad = frag.read(0, 6, -10, 10, 50, 80)
    assert pad.shape == (6, 20, 30)
    np.testing.assert_array_equal(pad[:, 10:, :14], full[:, 0:10, 50:64])
    assert not pad[:, :10].any() and not pad[:, :, 14:].any()
    assert not frag.read(0, 1, 100, 110, 100, 110).any()  # wholly outside
    m = frag.mask_window(-5, 5, -5, 5)
    assert m.dtype == bool and not m[:5].any() and not m[:, :5].any()
    np.testing.assert_array_equal(frag.ir_window(40, 60, 0, 64)[:8], frag.ir()[40:48])


@pytest.mark.parametrize("window", [(0, 7, 0, 4, 0, 4), (3, 3, 0, 4, 0, 4), (0, 1, 4, 4, 0, 4)])
def test_read_rejects_bad_ranges(tmp_path, window):
    frag = Fragment(small(tmp_path))
    with pytest.raises(InputError):
        frag.read(*window)


def test_uint8_slices(tmp_path):
    path = small(tmp_path)
    for p in sorted((path / "surface_volume").iterdir()):
        tifffile.imwrite(p, (tifffile.imread(p) >> 8).astype(np.uint8))
    frag = Fragment(path)
    assert frag.dtype == np.uint8 and frag.read(0, 2, 0, 8, 0, 8).dtype == np.uint8


def test_pickled_fragment_reads_the_same(tmp_path):
    frag = Fragment(small(tmp_path))
    before = frag.read(0, 6, 3, 20, 4, 40)
    clone = pickle.loads(pickle.dumps(frag))
    np.testing.assert_array_equal(clone.read(0, 6, 3, 20, 4, 40), before)
    np.testing.assert_array_equal(clone.labels(), frag.labels())


# --- broken folders -----------------------------------------------------------------------------


def _break(path: Path, how: str) -> str:
    """Damage the fragment at ``path``; return the file name the error must mention."""
    sv = path / "surface_volume"
    if how == "no_volume":
        for p in sv.iterdir():
            p.unlink()
        sv.rmdir()
        return path.name
    if how == "both_layouts":
        (path / "layers").mkdir()
        return path.name
    if how == "gap":
        (sv / "03.tif").unlink()
        return "03.tif"
    if how == "bad_name":
        (sv / "extra.tif").write_bytes((sv / "00.tif").read_bytes())
        return "extra.tif"
    if how == "no_slices":
        for p in sv.iterdir():
            p.unlink()
        return "surface_volume"
    if how == "size_mismatch":
        tifffile.imwrite(sv / "02.tif", np.zeros((40, 64), np.uint16))
        return "02.tif"
    if how == "dtype_mismatch":
        tifffile.imwrite(sv / "04.tif", np.zeros((48, 64), np.uint8))
        return "04.tif"
    if how == "float_slice":
        for p in sv.iterdir():
            tifffile.imwrite(p, np.zeros((48, 64), np.float32))
        return "00.tif"
    if how == "rgb_slice":
        tifffile.imwrite(sv / "01.tif", np.zeros((48, 64, 3), np.uint8))
        return "01.tif"
    if how == "multipage":
        tifffile.imwrite(sv / "05.tif", np.zeros((2, 48, 64), np.uint16), photometric="minisblack")
        return "05.tif"
    if how == "truncated_tiff":
        data = (sv / "02.tif").read_bytes()
        (sv / "02.tif").write_bytes(data[: len(data) - 100])
        return "02.tif"
    if how == "not_a_tiff":
        (sv / "01.tif").write_bytes(b"this is not a tiff file at all")
        return "01.tif"
    if how == "no_mask":
        (path / "mask.png").unlink()
        return "mask.png"
    if how == "mask_size":
        cv2.imwrite(str(path / "mask.png"), np.full((48, 60), 255, np.uint8))
        return "mask.png"
    if how == "truncated_png":
        data = (path / "mask.png").read_bytes()
        (path / "mask.png").write_bytes(data[: len(data) // 2])
        return "mask.png"
    if how == "not_a_png":
        (path / "ir.png").write_bytes(b"GIF89a....")
        return "ir.png"
    if how == "labels_not_binary":
        labels = cv2.imread(str(path / "inklabels.png"), cv2.IMREAD_UNCHANGED)
        labels[0, :3] = 128
        cv2.imwrite(str(path / "inklabels.png"), labels)
        return "inklabels.png"
    if how == "labels_colour":
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[..., 2] = 255
        cv2.imwrite(str(path / "inklabels.png"), rgb)
        return "inklabels.png"
    if how == "ir_size":
        cv2.imwrite(str(path / "ir.png"), np.zeros((49, 64), np.uint8))
        return "ir.png"
    raise AssertionError(how)


BROKEN = [
    "no_volume", "both_layouts", "gap", "bad_name", "no_slices", "size_mismatch",
    "dtype_mismatch", "float_slice", "rgb_slice", "multipage", "truncated_tiff", "not_a_tiff",
    "no_mask", "mask_size", "truncated_png", "not_a_png", "labels_not_binary", "labels_colour",
    "ir_size",
]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_folder_names_the_file(tmp_path, how):
    path = small(tmp_path)
    name = _break(path, how)
    with pytest.raises(FragmentError) as err:
        Fragment(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.endswith(")") and name in msg.rsplit("(", 1)[1], msg


def test_labels_0_1_are_accepted(tmp_path):
    path = small(tmp_path)
    labels = cv2.imread(str(path / "inklabels.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path / "inklabels.png"), (labels > 0).astype(np.uint8))
    np.testing.assert_array_equal(Fragment(path).labels(), labels > 0)


def test_missing_folder(tmp_path):
    with pytest.raises(FragmentError, match="not found"):
        Fragment(tmp_path / "nope")


# --- reading only the window --------------------------------------------------------------------


@pytest.mark.parametrize("layout", [{"rowsperstrip": 16}, {"tile": (64, 64)}])
def test_compressed_slices_read_only_needed_segments(tmp_path, layout):
    """zlib strips / tiles: a window reads only the segments it intersects."""
    path = small(tmp_path, height=512, width=512, depth=3)
    full = []
    for p in sorted((path / "surface_volume").iterdir()):
        img = tifffile.imread(p)
        full.append(img)
        tifffile.imwrite(p, img, compression="zlib", **layout)
    frag = Fragment(path)
    assert not frag.slice_infos[0].memmappable
    np.testing.assert_array_equal(frag.read(0, 3, 0, 512, 0, 512), np.stack(full))
    frag = Fragment(path)
    win = frag.read(0, 3, 100, 150, 200, 260)  # 50 x 60 window
    np.testing.assert_array_equal(win, np.stack(full)[:, 100:150, 200:260])
    if "tile" in layout:
        needed = [1 * 8 + 3, 1 * 8 + 4, 2 * 8 + 3, 2 * 8 + 4]  # tiles rows 64..191, cols 192..319
    else:
        needed = [6, 7, 8, 9]  # strips of rows 96..159
    expected = 0
    for p in frag.slice_paths:
        with tifffile.TiffFile(p) as tif:
            counts = tif.pages.first.databytecounts
        expected += sum(counts[i] for i in needed)
    assert frag.bytes_read == expected
    assert expected < 0.2 * sum(p.stat().st_size for p in frag.slice_paths)


def test_lzw_slices_as_pillow_and_imagej_write_them_read_as_the_originals(tmp_path):
    """LZW, the most common TIFF compression, needs imagecodecs (a dependency): without it
    tifffile refused the slices."""
    path = small(tmp_path, height=64, width=48, depth=3)
    full = []
    for p in sorted((path / "surface_volume").iterdir()):
        full.append(tifffile.imread(p))
        Image.fromarray(full[-1]).save(p, compression="tiff_lzw")
    frag = Fragment(path)
    assert tifffile.TiffFile(frag.slice_paths[0]).pages.first.compression == 5  # LZW
    np.testing.assert_array_equal(frag.read(0, 3, 10, 40, 5, 30), np.stack(full)[:, 10:40, 5:30])


def _sparse_png_header(path: Path, height: int, width: int) -> None:
    """A PNG whose header says height x width; its pixel data is never decoded by the test."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_window_read_memory_is_bounded_on_a_volume_larger_than_ram(tmp_path):
    """65 slices of 16384 x 16384 uint16 = 35 GB (sparse files, no disk used): opening it and
    reading a 256 x 256 x 65 window must stay far below one slice (512 MB) of resident memory."""
    h = w = 16384
    sv = tmp_path / "huge" / "surface_volume"
    sv.mkdir(parents=True)
    for z in range(65):
        m = tifffile.memmap(sv / f"{z:02d}.tif", shape=(h, w), dtype=np.uint16)
        del m
    _sparse_png_header(tmp_path / "huge" / "mask.png", h, w)
    code = textwrap.dedent(f"""
        import json
        from scrollsam.data.fragment import Fragment
        def status(key):  # VmRSS: resident now; VmHWM: peak of this process image
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        frag = Fragment({str(tmp_path / "huge")!r})
        before = status("VmRSS")
        win = frag.read(0, 65, 8000, 8256, 9000, 9256)
        after, peak = status("VmRSS"), status("VmHWM")
        print(json.dumps({{"before": before, "after": after, "peak": peak,
                           "shape": list(win.shape), "bytes_read": frag.bytes_read}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["shape"] == [65, 256, 256]
    assert r["bytes_read"] == 65 * 256 * 256 * 2
    slice_bytes = h * w * 2
    grown = r["after"] - r["before"]
    peak_growth = r["peak"] - r["before"]
    # At most two 4 KiB pages per window row per slice, plus the 8.5 MB result.
    assert grown < 65 * 256 * 2 * 4096 + 32e6, r
    assert peak_growth < slice_bytes / 2, r


def test_decoding_the_mask_holds_one_copy_of_it(tmp_path):
    """A segment's mask.png is hundreds of MB decoded: the bool mask reuses the decoded bytes
    (the peak was two copies)."""
    import tracemalloc

    h = w = 1500
    (tmp_path / "f" / "surface_volume").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "f" / "surface_volume" / "00.tif", np.zeros((h, w), np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[100:1400, 50:1450] = 255
    cv2.imwrite(str(tmp_path / "f" / "mask.png"), m)
    frag = Fragment(tmp_path / "f")
    tracemalloc.start()
    try:
        mask = frag.mask()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.dtype == np.bool_ and int(mask.sum()) == 1300 * 1400
    assert peak < 1.3 * h * w, peak / (h * w)


def test_links_to_folders_of_one_name_clash_naming_the_links(tmp_path, capsys):
    """Before: "got 1 twice" (predict) or "got ['1', '1']" (train) for two links named a and b
    that lead to folders both named 1; the message now names what the user wrote."""
    from scrollsam.cli import main

    for side in ("x", "y"):
        write_fragment(tmp_path / side / "1", height=48, width=48, depth=4, seed=1)
    (tmp_path / "a").symlink_to(tmp_path / "x" / "1")
    (tmp_path / "b").symlink_to(tmp_path / "y" / "1")
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--fragment",
                 str(tmp_path / "a"), "--fragment", str(tmp_path / "b"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fragment: expected fragment folders with distinct names")
    assert f"{tmp_path / 'a'} and {tmp_path / 'b'} are both 1" in err
    assert main(["train", "--config", "configs/demo.yaml", f"out={tmp_path / 'run'}",
                 f"data.root={tmp_path}", "data.train=[a]", "data.valid=[b]"]) == 2
    err = capsys.readouterr().err
    assert "data.train / data.valid: expected fragment folders" in err
    assert "a and b are both 1" in err
    assert not (tmp_path / "run").exists()
