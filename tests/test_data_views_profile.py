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
