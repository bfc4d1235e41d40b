"""The ``profile`` option of the band views: each pixel's band standardised along depth."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.data.views import CLIP, make_view
from scrollsam.errors import InputError

S = 64
BAND = {"depth": 16, "z0": 3, "z1": 13, "depth_shift": 0}


@pytest.fixture(scope="module")
def frag(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "1"
    return Fragment(write_fragment(path, height=160, width=192, depth=16, seed=5))


@pytest.mark.parametrize("strategy, channels", [("range", 10), ("project", 3), ("mosaic", 3)])
def test_profile_views_keep_shape_dtype_range_and_mask(frag, strategy, channels):
    view = make_view("slices", strategy, profile=True, **BAND)
    inside = frag.mask_window(40, 40 + S, 50, 50 + S)
    for x in [view.train_window(frag, 40, 50, S, rng=np.random.default_rng(0)),
              view.eval_window(frag, 40, 50, S)]:
        assert x.shape == (channels, S, S) and x.dtype == np.float32
        assert np.isfinite(x).all() and np.abs(x).max() <= CLIP
        assert not x[:, ~inside].any()
    assert view.params["profile"] is True


def test_profile_standardises_each_pixel_along_depth(frag):
    x = make_view("slices", "range", profile=True, **BAND).eval_window(frag, 40, 50, S)
    inside = frag.mask_window(40, 40 + S, 50, 50 + S)
    cols = x[:, inside]  # [10, n] each pixel's depth profile
    assert np.abs(cols.mean(axis=0)).max() < 0.05
    assert np.abs(cols.std(axis=0) - 1).max() < 0.1


def test_profile_cancels_a_column_scaled_and_offset(frag, tmp_path):
    """Every slice of a block of pixels scaled by 1.5 and raised by 500 (as a brighter fibre or
    a denser patch would): the profile view shows the same input there, the per-slice view does
    not."""
    path = tmp_path / "scaled"
    shutil.copytree(frag.path, path)
    ys, xs = slice(50, 90), slice(60, 110)
    for tif in sorted((path / "surface_volume").glob("*.tif")):
        img = tifffile.imread(tif).astype(np.float64)
        img[ys, xs] = img[ys, xs] * 1.5 + 500
        tifffile.imwrite(tif, np.round(img).astype(np.uint16))
    scaled = Fragment(path)
    prof = make_view("slices", "range", profile=True, **BAND)
    a, b = prof.eval_window(frag, 40, 50, S), prof.eval_window(scaled, 40, 50, S)
    block = (slice(None), slice(10, 50), slice(10, 60))  # ys, xs in window coordinates
    np.testing.assert_allclose(a[block], b[block], atol=2e-3)
    plain = make_view("slices", "range", **BAND)
    pa, pb = plain.eval_window(frag, 40, 50, S), plain.eval_window(scaled, 40, 50, S)
    assert np.abs(pa[block] - pb[block]).mean() > 0.3


def test_profile_is_deterministic_and_checked(frag):
    one = make_view("slices", "range", profile=True, depth_scale=0.5, **BAND)
    two = make_view("slices", "range", profile=True, depth_scale=0.5, **BAND)
    np.testing.assert_array_equal(one.eval_window(frag, 40, 50, S),
                                  two.eval_window(frag, 40, 50, S))
    np.testing.assert_array_equal(one.train_window(frag, 40, 50, S, rng=np.random.default_rng(3)),
                                  two.train_window(frag, 40, 50, S, rng=np.random.default_rng(3)))
    for bad in ("yes", 1, None):
        with pytest.raises(InputError, match="profile"):
            make_view("slices", "range", profile=bad, **BAND)


def _with_slice(src, dst, z: int, value: int):
    """A copy of fragment ``src`` whose slice ``z`` holds ``value`` everywhere (a dead slice)."""
    shutil.copytree(src, dst)
    path = sorted((dst / "surface_volume").iterdir())[z]
    tifffile.imwrite(path, np.full_like(tifffile.imread(path), value))
    return Fragment(dst)


def test_a_dead_slice_in_the_band_is_left_out_of_each_pixels_profile(frag, tmp_path):
    # Before: a blank slice 8 in the band took part in each pixel's depth std, which grew by
    # the papyrus-to-zero jump and squashed the live slices (QA: F0.5 0.567 -> 0.000).
    dead = _with_slice(frag.path, tmp_path / "dead", 8, 0)
    view = make_view("slices", "range", profile=True, **BAND)
    inside = frag.mask_window(40, 40 + S, 50, 50 + S)
    clean, got = view.eval_window(frag, 40, 50, S), view.eval_window(dead, 40, 50, S)
    assert not got[8 - BAND["z0"]].any()  # the dead slice says nothing
    live = [c for c in range(got.shape[0]) if c != 8 - BAND["z0"]]
    ratio = got[live][:, inside].std() / clean[live][:, inside].std()
    assert 0.95 < ratio < 1.25, ratio  # before: about 0.3


@pytest.mark.parametrize("value", [0, 65535], ids=["blank", "saturated"])
def test_a_dead_last_slice_does_not_move_the_sheet_aligned_band(frag, tmp_path, value):
    # Before: a blank (or saturated) last slice made the emptiest slice 0 (or raised the
    # baseline), so the density centroid slid towards the dead end: band 0..25 -> 9..34.
    from scrollsam.data.stats import sheet_centre

    dead = _with_slice(frag.path, tmp_path / "dead", 15, value)
    view = make_view("slices", "range", align="sheet", **{**BAND, "z0": 2, "z1": 8})
    assert view.band(dead) == view.band(frag)
    # the centroid itself, on a profile where it matters: air at 100, the sheet at slices 5-10
    mean, std = [100.0] * 40, [10.0] * 40
    mean[5:11] = [1100.0] * 6
    mean[-1], std[-1] = float(value), 0.0
    assert sheet_centre(mean, std) == pytest.approx(7.5)
    assert abs(sheet_centre(mean) - 7.5) > 3  # what leaving the slices' std out gives


def test_an_aligned_band_fits_a_volume_shallower_than_its_configured_end(tmp_path):
    # Before: align: sheet still asked for slices z0..z1-1, so a model trained on 20..45 of 65
    # refused every volume of 26 to 45 slices, though its band moves into each volume.
    from scrollsam.errors import FragmentError

    shallow = Fragment(write_fragment(tmp_path / "1", height=96, width=96, depth=12, seed=2))
    view = make_view("slices", "range", align="sheet", depth=16, z0=6, z1=14)
    z0, z1 = view.band(shallow)
    assert z1 - z0 == 8 and 0 <= z0 and z1 <= 12
    assert view.eval_window(shallow, 0, 0, 32).shape == (8, 32, 32)
    with pytest.raises(FragmentError, match="has 12 slices, view slices/range needs slices 6..13"):
        make_view("slices", "range", depth=16, z0=6, z1=14).eval_window(shallow, 0, 0, 32)
    narrow = make_view("slices", "range", align="sheet", depth=16, z0=0, z1=13)
    with pytest.raises(FragmentError, match="with align: sheet needs 13 "):
        narrow.eval_window(shallow, 0, 0, 32)


def test_the_log_names_the_slices_an_aligned_band_reads(frag, caplog):
    # Before: nothing said which slices align: sheet picked, in training or prediction.
    from scrollsam.data.band_views import aligned_band
    from scrollsam.data.dataset import make_datasets

    aligned = make_view("slices", "range", align="sheet", **{**BAND, "z0": 2, "z1": 8})
    z0, z1 = aligned.band(frag)
    assert aligned_band(aligned, frag) == f"slices {z0}..{z1 - 1} (aligned on its sheet)"
    assert aligned_band(make_view("slices", "range", **BAND), frag) is None
    assert aligned_band(make_view("ir"), frag) is None
    with caplog.at_level("INFO"):
        make_datasets([frag], aligned, size=S, valid_band=(0.8, 1.0))
    assert f"{frag.id}: slices {z0}..{z1 - 1} (aligned on its sheet)" in caplog.messages


@pytest.mark.parametrize("profile", [True, False])
def test_a_uint16_volume_of_8_bit_values_reads_as_its_uint8_copy(frag, tmp_path, profile):
    # Before: the std floor was 1e-3 of the dtype's maximum, 65.5 for uint16, above these
    # slices' own std: the input was squashed to about a third (QA: recall 0.64 -> 0.38).
    copies = {}
    for dtype in (np.uint8, np.uint16):
        dst = tmp_path / np.dtype(dtype).name
        shutil.copytree(frag.path, dst)
        for path in (dst / "surface_volume").iterdir():
            tifffile.imwrite(path, (tifffile.imread(path) >> 8).astype(dtype))
        copies[dtype] = Fragment(dst)
    view = make_view("slices", "range", profile=profile, **BAND)
    small, wide = (view.eval_window(copies[t], 40, 50, S) for t in (np.uint8, np.uint16))
    np.testing.assert_allclose(wide, small, atol=1e-5)
