"""Tiles inside the mask, a spatial split without overlap, and balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.data.tiles import (
    Region,
    Tile,
    _starts,
    balanced_indices,
    make_tiles,
    split_regions,
    tile_windows,
)
from scrollsam.errors import InputError


@pytest.fixture(scope="module")
def frags(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    return [Fragment(write_fragment(root / str(i), height=200, width=260, depth=3, seed=i))
            for i in (1, 2)]


def _covered(tiles: list[Tile], shape: tuple[int, int]) -> np.ndarray:
    """int [H, W]: how many tiles cover each image pixel."""
    cover = np.zeros(shape, int)
    for t in tiles:
        cover[max(t.y0, 0):max(t.y1, 0), max(t.x0, 0):max(t.x1, 0)] += 1
    return cover


def test_tiles_respect_min_valid_and_report_ink(frags):
    f = frags[0]
    tiles = tile_windows(f, Region(f.id, 0, f.height, 0, f.width), size=64, stride=32,
                         min_valid=0.6)
    assert tiles
    for t in tiles:
        inside = f.mask_window(t.y0, t.y1, t.x0, t.x1)
        assert inside.mean() >= 0.6 and t.valid == pytest.approx(inside.mean())
        ink = f.labels_window(t.y0, t.y1, t.x0, t.x1) & inside
        assert t.ink == pytest.approx(ink.sum() / inside.sum())
    # Every pixel of the mask far from the outline is covered by some tile.
    inner = f.mask().copy()
    inner[:32], inner[-32:], inner[:, :32], inner[:, -32:] = False, False, False, False
    assert (_covered(tiles, f.mask().shape)[inner] > 0).mean() > 0.95


def test_small_fragment_gets_padded_tiles(tmp_path):
    f = Fragment(write_fragment(tmp_path / "s", height=40, width=50, depth=2))
    tiles = tile_windows(f, Region(f.id, 0, 40, 0, 50), size=64, min_valid=0.2)
    assert [(t.y0, t.x0) for t in tiles] == [(0, 0)]


@pytest.mark.parametrize("axis", ["y", "x"])
def test_band_split_has_no_pixel_overlap(frags, axis):
    train_r, valid_r = split_regions(frags, valid_band=(0.4, 0.7), axis=axis)
    train = make_tiles(frags, train_r, size=48, stride=16, min_valid=0.1)
    valid = make_tiles(frags, valid_r, size=48, stride=16, min_valid=0.1)
    assert train and valid
    for f in frags:
        shape = (f.height, f.width)
        ct = _covered([t for t in train if t.fragment == f.id], shape)
        cv = _covered([t for t in valid if t.fragment == f.id], shape)
        assert not ((ct > 0) & (cv > 0)).any()
        length = f.height if axis == "y" else f.width
        band = np.zeros(shape, bool)
        lo, hi = round(0.4 * length), round(0.7 * length)
        if axis == "y":
            band[lo:hi] = True
        else:
            band[:, lo:hi] = True
        assert not cv[~band].any() and not ct[band].any()


def test_whole_fragment_split(frags):
    train_r, valid_r = split_regions(frags, valid_fragments=["2"])
    assert {r.fragment for r in train_r} == {"1"} and {r.fragment for r in valid_r} == {"2"}
    with pytest.raises(InputError, match="valid_fragments"):
        split_regions(frags, valid_fragments=["9"])
    with pytest.raises(InputError, match="valid_band"):
        split_regions(frags, valid_band=(0.5, 0.5))


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), size=st.integers(1, 80), stride=st.integers(1, 80),
       a=st.floats(0, 1), b=st.floats(0, 1))
def test_starts_stay_in_their_region(length, size, stride, a, b):
    r0, r1 = sorted((round(a * length), round(b * length)))
    if r0 == r1:
        return
    for s in _starts(r0, r1, length, size, stride):
        lo, hi = max(s, 0), min(s + size, length)  # the image pixels the tile covers
        assert r0 <= lo and hi <= r1 and lo < hi
    starts = _starts(r0, r1, length, size, stride)
    if stride <= size and (r1 - r0 >= size or r0 == 0 or r1 == length):
        assert starts  # a region that can hold a tile gets one
        covered = set()
        for s in starts:
            covered.update(range(max(s, r0), min(s + size, r1)))
        assert covered == set(range(r0, r1))


def test_balanced_sampling():
    tiles = [Tile("1", 0, 16 * i, 16, 1.0, 0.2 if i % 10 == 0 else 0.0) for i in range(100)]
    is_ink = np.array([t.ink >= 0.01 for t in tiles])  # 10 % ink tiles
    idx = balanced_indices(tiles, 4000, rng=np.random.default_rng(0), ink_share=0.5)
    assert abs(is_ink[idx].mean() - 0.5) < 0.03
    idx = balanced_indices(tiles, 4000, rng=np.random.default_rng(0), ink_share=0.8)
    assert abs(is_ink[idx].mean() - 0.8) < 0.03
    assert len(set(idx[is_ink[idx]].tolist())) == 10  # uniform within the group
    again = balanced_indices(tiles, 4000, rng=np.random.default_rng(0), ink_share=0.8)
    np.testing.assert_array_equal(idx, again)
    only_bg = [t for t in tiles if t.ink == 0]
    picked = balanced_indices(only_bg, 50, rng=np.random.default_rng(1), ink_share=0.9)
    assert picked.min() >= 0 and picked.max() < len(only_bg)


def test_bad_tile_arguments(frags):
    with pytest.raises(InputError, match="ink_share"):
        balanced_indices([Tile("1", 0, 0, 8, 1.0, 0.0)], 3, rng=np.random.default_rng(0),
                         ink_share=2.0)
    f = frags[0]
    whole = Region(f.id, 0, f.height, 0, f.width)
    for kw, name in [({"size": 0}, "size"), ({"size": 8, "stride": 0}, "stride"),
                     ({"size": 8, "min_valid": 1.5}, "min_valid")]:
        with pytest.raises(InputError, match=name):
            tile_windows(f, whole, **kw)
    with pytest.raises(InputError, match="region"):
        tile_windows(frags[1], whole, size=8)


def test_a_region_without_tiles_is_logged_in_words_not_as_a_repr(frags, caplog):
    f = frags[0]
    with caplog.at_level("WARNING"):
        assert make_tiles(frags, [Region(f.id, 0, 4, 0, 4)], size=64, min_valid=0.9) == []
    (message,) = caplog.messages
    assert message == (f"no 64 px tile of rows 0..3, columns 0..3 of fragment {f.id} has 90% "
                       f"of its pixels inside the mask")  # was "no tile fits": they may fit
