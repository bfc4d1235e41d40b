"""Input views: shape, dtype, value range of each; parameters checked; stats cached in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from scrollsam.data import stats as stats_module
from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import StatsCache, compute_stats
from scrollsam.data.synthetic import write_fragment
from scrollsam.data.views import CLIP, make_view
from scrollsam.errors import FragmentError, InputError

S = 64


@pytest.fixture(scope="module")
def frag(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "1"
    return Fragment(write_fragment(path, height=160, width=192, depth=16, seed=5))


VIEWS = [
    (("ir", None), {}, 3, 1),
    (("slices", "triplet"), {"depth": 16}, 3, 1),
    (("slices", "every"), {"depth": 16}, 3, 4),  # default band of 16 slices: 6..9
    (("slices", "range"), {"depth": 16, "z0": 4, "z1": 12}, 8, 1),
    (("slices", "project"), {"depth": 16}, 3, 1),
    (("slices", "project"), {"depth": 16, "reductions": "mean,min"}, 2, 1),
    (("slices", "mosaic"), {"depth": 16, "grid": 2}, 3, 1),
]


@pytest.mark.parametrize("args, params, channels, k", VIEWS)
def test_view_shape_dtype_range(frag, args, params, channels, k):
    view = make_view(*args, **params)
    assert view.channels == channels
    rng = np.random.default_rng(0)
    inside = frag.mask_window(40, 40 + S, 50, 50 + S)
    for x in [view.train_window(frag, 40, 50, S, rng=rng), view.eval_window(frag, 40, 50, S)]:
        assert x.shape == (channels, S, S) and x.dtype == np.float32
        assert np.isfinite(x).all() and np.abs(x).max() <= CLIP
        assert not x[:, ~inside].any()  # exactly 0 outside the mask
    xs = view.infer_windows(frag, 40, 50, S)
    assert xs.shape == (k, channels, S, S) and xs.dtype == np.float32
    if args[1] != "every":
        np.testing.assert_array_equal(xs[0], view.eval_window(frag, 40, 50, S))


@pytest.mark.parametrize("args, params, channels, _k", VIEWS)
def test_view_is_normalised_inside_the_mask(frag, args, params, channels, _k):
    """Over the whole fragment every channel is roughly zero mean, unit std inside the mask."""
    view = make_view(*args, **params)
    x = view.eval_window(frag, 0, 0, 192)  # [C, 192, 192] covers the 160 x 192 fragment
    inside = frag.mask_window(0, 192, 0, 192)
    vals = x[:, inside]  # [C, n]
    assert np.all(np.abs(vals.mean(axis=1)) < 0.35), vals.mean(axis=1)
    assert np.all((vals.std(axis=1) > 0.5) & (vals.std(axis=1) < 1.6)), vals.std(axis=1)
    assert not x[:, 160:].any()  # outside the image


def test_every_infers_each_slice_of_the_band(frag):
    view = make_view("slices", "every", z0=3, z1=9, depth=16)
    xs = view.infer_windows(frag, 10, 10, S)
    assert xs.shape == (6, 3, S, S)
    ranged = make_view("slices", "range", z0=3, z1=9, depth=16, stats=view.stats)
    ref = ranged.eval_window(frag, 10, 10, S)  # [6, S, S]
    for k in range(6):
        for c in range(3):
            np.testing.assert_array_equal(xs[k, c], ref[k])
    drawn = set()
    for i in range(40):
        x = view.train_window(frag, 10, 10, S, rng=np.random.default_rng(i))  # [3, S, S]
        drawn.add(int(np.argmin([np.abs(x[0] - ref[k]).sum() for k in range(6)])))
    assert drawn == set(range(6))  # training draws cover the band


def test_triplet_draws_consecutive_slices_around_the_centre(frag):
    view = make_view("slices", "triplet", depth=16, z0=2, z1=14, centre=8, std=2)
    ranged = make_view("slices", "range", depth=16, z0=0, z1=16, stats=view.stats)
    ref = ranged.eval_window(frag, 30, 30, S)  # [16, S, S]
    starts = []
    for i in range(60):
        x = view.train_window(frag, 30, 30, S, rng=np.random.default_rng(i))
        z = int(np.argmin([np.abs(x[0] - ref[z]).sum() for z in range(16)]))
        np.testing.assert_array_equal(x, ref[z:z + 3])
        starts.append(z)
    assert min(starts) >= 2 and max(starts) <= 11  # clipped to the band
    assert len(set(starts)) >= 3 and abs(np.mean(starts) - 7) < 1.0  # middle slice ~ centre
    np.testing.assert_array_equal(view.eval_window(frag, 30, 30, S), ref[7:10])


def test_mosaic_pixels_come_from_their_slices_in_place(frag):
    view = make_view("slices", "mosaic", depth=16, z0=2, z1=14, grid=2, depth_shift=0)
    ranged = make_view("slices", "range", depth=16, z0=2, z1=14, stats=view.stats)
    y0, x0 = 31, 17  # odd corner: the pattern follows image coordinates, not the window
    x, ref = view.eval_window(frag, y0, x0, S), ranged.eval_window(frag, y0, x0, S)
    picks = np.round(np.linspace(0, 11, 12)).astype(int)
    for c in range(3):
        for yy in (0, 1, 6):
            for xx in (0, 3, 9):
                phase = ((y0 + yy) % 2) * 2 + (x0 + xx) % 2
                assert x[c, yy, xx] == ref[picks[c * 4 + phase], yy, xx]


def test_project_channels_follow_reductions(frag):
    view = make_view("slices", "project", depth=16, z0=4, z1=12, reductions=("max", "min"))
    x = view.eval_window(frag, 40, 40, S)
    inside = frag.mask_window(40, 40 + S, 40, 40 + S)
    # Standardised max and min stay ordered pixel by pixel up to their affine calibration:
    # they are strongly but not perfectly correlated.
    corr = np.corrcoef(x[0][inside], x[1][inside])[0, 1]
    assert 0.0 < corr < 0.99


def test_depth_shift_moves_the_band_in_training_only(frag):
    view = make_view("slices", "range", depth=16, z0=4, z1=8, depth_shift=2)
    ref = make_view("slices", "range", depth=16, z0=0, z1=16, stats=view.stats).eval_window(
        frag, 0, 0, S)
    seen = set()
    for i in range(30):
        x = view.train_window(frag, 0, 0, S, rng=np.random.default_rng(i))
        shift = [d for d in range(-2, 3) if np.array_equal(x, ref[4 + d:8 + d])]
        assert len(shift) == 1
        seen.add(shift[0])
    assert seen == {-2, -1, 0, 1, 2}
    np.testing.assert_array_equal(view.eval_window(frag, 0, 0, S), ref[4:8])


def test_8_and_16_bit_slices_give_the_same_inputs(tmp_path):
    a = write_fragment(tmp_path / "a", height=96, width=96, depth=8, seed=2)
    b = write_fragment(tmp_path / "b", height=96, width=96, depth=8, seed=2)
    for p in (b / "surface_volume").iterdir():
        tifffile.imwrite(p, (tifffile.imread(p) // 256).astype(np.uint8))
    fa, fb = Fragment(a), Fragment(b)
    assert fb.dtype == np.uint8
    view = make_view("slices", "range", depth=8, z0=0, z1=8)
    xa, xb = view.eval_window(fa, 0, 0, 96), view.eval_window(fb, 0, 0, 96)
    assert np.abs(xa - xb).mean() < 0.05


def test_a_12_bit_ir_png_keeps_its_levels(tmp_path):
    import cv2

    a = write_fragment(tmp_path / "a", height=96, width=96, depth=4, seed=2)
    b = write_fragment(tmp_path / "b", height=96, width=96, depth=4, seed=2)
    ir8 = cv2.imread(str(a / "ir.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(b / "ir.png"), ir8.astype(np.uint16) * 16)  # 12-bit levels in 16 bits
    fa, fb = Fragment(a), Fragment(b)
    np.testing.assert_array_equal(fb.ir(), ir8.astype(np.uint16) * 16)  # was >> 8: 16 levels
    view = make_view("ir")
    np.testing.assert_allclose(view.eval_window(fa, 0, 0, 96), view.eval_window(fb, 0, 0, 96),
                               atol=1e-5)


def test_statistics_cached_before_16_bit_ir_are_computed_again(tmp_path, monkeypatch):
    # Review: a run trained when ir was shifted to 8 bits kept 8-bit ir_mean / ir_std in its
    # cache; read with 16-bit ir every pixel standardised to +5 (a constant image).
    import cv2

    frag = Fragment(write_fragment(tmp_path / "f", height=96, width=96, depth=4, seed=2))
    ir8 = cv2.imread(str(frag.ir_path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(frag.ir_path), ir8.astype(np.uint16) * 257)
    frag = Fragment(frag.path)
    monkeypatch.setattr(stats_module, "_VERSION", 2)  # the cache as the older code wrote it
    old = compute_stats(frag, rng=np.random.default_rng(0))
    old = stats_module.FragmentStats.from_dict({**old.to_dict(), "ir_mean": float(ir8.mean()),
                                                "ir_std": float(ir8.std())})
    stats_module.StatsCache(tmp_path / "run")._save(
        frag, stats_module._cache_key(frag, 0), old)
    monkeypatch.undo()
    x = make_view("ir", stats=StatsCache(tmp_path / "run")).eval_window(frag, 0, 0, 96)
    inside = frag.mask_window(0, 96, 0, 96)
    assert abs(x[0][inside].mean()) < 0.5 and 0.5 < x[0][inside].std() < 2.0


@pytest.mark.parametrize("args, params, match", [
    (("rgb", None), {}, "input"),
    (("slices", "random"), {}, "strategy"),
    (("ir", "triplet"), {}, "strategy"),
    (("ir", None), {"z0": 3}, "z0"),
    (("slices", "triplet"), {"sigma": 2}, "sigma"),
    (("slices", "range"), {"z0": 10, "z1": 5}, "z1"),
    (("slices", "range"), {"depth": 65, "z1": 70}, "z1"),
    (("slices", "range"), {"z0": -1}, "z0"),
    (("slices", "triplet"), {"z0": 4, "z1": 6}, "z1"),
    (("slices", "triplet"), {"std": -1.0}, "std"),
    (("slices", "triplet"), {"centre": "middle"}, "centre"),
    (("slices", "project"), {"reductions": ("mean", "median")}, "reductions"),
    (("slices", "mosaic"), {"grid": 0}, "grid"),
    (("slices", "range"), {"depth_shift": 1.5}, "depth_shift"),
])
def test_bad_parameters_name_themselves(args, params, match):
    with pytest.raises(InputError, match=match):
        make_view(*args, **params)


def test_defaults_are_the_ink_band_of_65_slices():
    view = make_view("slices", "range")
    assert (view.z0, view.z1, view.channels) == (25, 41, 16)
    assert make_view("slices", "triplet").params == {
        "depth": 65, "z0": 25, "z1": 41, "norm": "mean_std", "centre": 32.5, "std": 4.0}


def test_missing_ir_and_too_few_slices_are_fragment_errors(tmp_path):
    path = write_fragment(tmp_path / "noir", height=64, width=64, depth=8, ir=False)
    frag = Fragment(path)
    with pytest.raises(FragmentError, match="noir has no ir.png"):
        make_view("ir").prepare(frag)
    with pytest.raises(FragmentError, match="noir has 8 slices") as err:
        make_view("slices", "triplet").eval_window(frag, 0, 0, 32)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "set data.z_start / data.z_end" in str(err.value)  # was "z0 / z1 or depth"


def test_a_band_past_slice_65_is_checked_against_each_fragments_depth(tmp_path):
    deep = Fragment(write_fragment(tmp_path / "deep", height=32, width=32, depth=100))
    view = make_view("slices", "range", z0=55, z1=75)  # was refused: "z1 <= depth (65)"
    assert view.eval_window(deep, 0, 0, 32).shape == (20, 32, 32)
    kaggle = Fragment(write_fragment(tmp_path / "kaggle", height=32, width=32, depth=65))
    with pytest.raises(FragmentError, match="kaggle has 65 slices, view slices/range needs "
                                            "slices 55..74"):
        view.eval_window(kaggle, 0, 0, 32)


def test_band_errors_from_a_config_name_its_keys():
    from scrollsam.config import load_config
    from scrollsam.data.views import view_from_config
    from scrollsam.errors import ConfigError

    cfg = load_config(None, ["data.input=slices"])
    cfg.data.z_start, cfg.data.z_end = 25, 26
    with pytest.raises(ConfigError, match=r"^data\.z_end: expected data\.z_end >= "
                                          r"data\.z_start \+ 3"):
        view_from_config(cfg.data, cache_dir=None)
    with pytest.raises(ConfigError, match=r"^data\.z_end: expected data\.z_end >= "
                                          r"data\.z_start \+ 3"):  # when the config loads
        load_config(None, ["data.input=slices", "data.z_start=25", "data.z_end=26"])


def test_stats_cache_lives_in_the_run_dir(tmp_path, frag, monkeypatch):
    data_before = sorted(p.name for p in frag.path.rglob("*"))
    run = tmp_path / "run"
    first = StatsCache(run).get(frag)
    files = list((run / "stats").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("1-")
    assert json.loads(files[0].read_text())["stats"]["slice_mean"] == list(first.slice_mean)
    assert sorted(p.name for p in frag.path.rglob("*")) == data_before  # data folder untouched

    def fail(*a, **k):
        raise AssertionError("recomputed instead of using the cache")

    monkeypatch.setattr(stats_module, "compute_stats", fail)
    assert StatsCache(run).get(frag) == first
    with pytest.raises(InputError, match="cache_dir"):
        StatsCache(frag.path / "stats").get(frag)


def test_stats_are_sampled_and_bounded(frag):
    st = compute_stats(frag, rng=np.random.default_rng(0), windows=4, size=16)
    assert st.pixels <= 4 * 16 * 16 and len(st.slice_mean) == 16
    full = frag.read(0, 16, 0, 160, 0, 192)[:, frag.mask()].astype(float)  # [D, n]
    np.testing.assert_allclose(compute_stats(frag, rng=np.random.default_rng(0)).slice_mean,
                               full.mean(axis=1), rtol=0.05)


def test_stats_count_each_pixel_once_however_the_windows_overlap(tmp_path):
    from scrollsam.data.stats import slice_contrast

    frag = Fragment(write_fragment(tmp_path / "small", height=40, width=50, depth=4))
    inside = int(frag.mask().sum())
    st = compute_stats(frag, rng=np.random.default_rng(0))  # 32 windows of 64 px, overlapping
    assert st.pixels == inside  # every window covers the whole fragment: each pixel once
    full = frag.read(0, 4, 0, 40, 0, 50)[:, frag.mask()].astype(float)
    np.testing.assert_allclose(st.slice_mean, full.mean(axis=1), rtol=1e-9)
    contrast = slice_contrast(frag, rng=np.random.default_rng(0))
    assert contrast.ink_pixels + contrast.background_pixels == inside


def test_every_view_parameter_is_set_through_the_one_config_key():
    from scrollsam.config import load_config
    from scrollsam.data.views import view_from_config

    cfg = load_config(None, ["data.input=slices", "data.strategy=triplet",
                             "data.view={depth: 16, centre: 7, std: 0.5}"])
    view = view_from_config(cfg.data, cache_dir=None)
    assert (view.depth, view.centre, view.std) == (16, 7.0, 0.5)
    cfg = load_config(None, ["data.input=slices", "data.strategy=project",
                             "data.view.reductions=[max, min]", "data.view.depth_shift=0",
                             "data.z_start=2", "data.z_end=9"])
    view = view_from_config(cfg.data, cache_dir=None)
    assert (view.reductions, view.depth_shift, view.z0, view.z1) == (("max", "min"), 0, 2, 9)
    mosaic = load_config(None, ["data.input=slices", "data.strategy=mosaic", "data.view.grid=3"])
    assert view_from_config(mosaic.data, cache_dir=None).grid == 3


@pytest.mark.parametrize("overrides, match", [
    (["data.input=slices", "data.view.sigma=2"],
     r"data\.view: sigma: unknown parameter of view slices/triplet \(known: depth, z0, z1, "
     r"norm, centre, std\)"),
    (["data.view.depth=16"], r"data\.view: depth: unknown parameter of view ir"),
    (["data.input=slices", "data.view.std=-1"], r"data\.view: std: expected a number >= 0"),
    (["data.input=slices", "data.z_start=3", "data.view.z0=4"], r"set the band once"),
    (["data.view=3"], r"data\.view: expected a mapping"),
])
def test_bad_view_parameters_in_a_config_name_the_key(overrides, match):
    from scrollsam.config import load_config
    from scrollsam.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_align_sheet_follows_the_papyrus_wherever_the_scan_put_it(tmp_path):
    """A sheet 8 slices deeper moves the aligned band by about 8 slices; ``none`` stays put."""
    from scrollsam.data.stats import sheet_centre
    from scrollsam.data.synthetic import write_fragment
    from scrollsam.data.views import make_view

    frags = {s: Fragment(write_fragment(tmp_path / f"s{s}", height=96, width=96, depth=65,
                                        seed=3, settings={"surface": s, "drift": 0.0}))
             for s in (0.0, 8.0)}
    view = make_view("slices", "range", z0=20, z1=46, align="sheet")
    plain = make_view("slices", "range", z0=20, z1=46)
    bands = {s: view.band(f) for s, f in frags.items()}
    assert bands[8.0][0] - bands[0.0][0] in (7, 8, 9) and bands[0.0][1] - bands[0.0][0] == 26
    assert abs(bands[0.0][0] - 20) <= 1  # the default generator's sheet is already centred
    assert plain.band(frags[8.0]) == (20, 46)
    deep = frags[8.0]
    x = view.eval_window(deep, 0, 0, 32)
    z0, z1 = bands[8.0]
    np.testing.assert_array_equal(x, plain._normalised(deep, z0, z1, 0, 0, 32))
    assert sheet_centre([1.0, 1.0, 1.0]) == 1.0  # flat: the middle
    with pytest.raises(InputError, match="align"):
        make_view("slices", "range", align="top")
    far = make_view("slices", "range", z0=0, z1=26, align="sheet")  # stays inside the volume
    z0, z1 = far.band(deep)
    assert 0 <= z0 and z1 <= 65


def test_project_with_align_sheet_calibrates_on_the_band_it_shows(tmp_path):
    """Its per-channel standardisation was sampled from the unaligned band."""
    from scrollsam.data.synthetic import write_fragment
    from scrollsam.data.views import make_view

    deep = Fragment(write_fragment(tmp_path / "deep", height=128, width=128, depth=65, seed=3,
                                   settings={"surface": 12.0, "drift": 0.0}))
    view = make_view("slices", "project", z0=14, z1=40, align="sheet",
                     reductions=("mean", "std"))
    view.prepare(deep)
    x = view.eval_window(deep, 0, 0, 128)  # [2, 128, 128]
    inside = deep.mask()
    means = x[:, inside].mean(axis=1)
    assert np.abs(means).max() < 0.3, means  # standardised on the band it shows


def test_depth_scale_resamples_the_band_about_its_middle(frag):
    """Scale 2 over slices 6..10 (middle 8) shows slices 4, 6, 8, 10, 12; scale 1 is the band;
    positions outside the volume repeat its first / last slice; evaluation never scales."""
    view = make_view("slices", "range", depth=16, z0=6, z1=11, depth_scale=1.0)
    band = view._band_slices(frag, 6, 11, 10, 20, S)
    assert np.array_equal(band, view._normalised(frag, 6, 11, 10, 20, S))
    wide = view._band_slices(frag, 6, 11, 10, 20, S, scale=2.0)
    want = np.stack([view._normalised(frag, z, z + 1, 10, 20, S)[0] for z in (4, 6, 8, 10, 12)])
    assert np.allclose(wide, want, atol=1e-6)
    half = view._band_slices(frag, 6, 11, 10, 20, S, scale=0.5)  # 7, 7.5, 8, 8.5, 9
    mid = (view._normalised(frag, 7, 8, 10, 20, S) + view._normalised(frag, 8, 9, 10, 20, S)) / 2
    assert np.allclose(half[1], mid[0], atol=1e-6)
    edge = view._band_slices(frag, 0, 5, 10, 20, S, scale=3.0)  # -4, -1, 2, 5, 8 -> 0, 0, 2, ..
    assert np.array_equal(edge[0], edge[1])
    assert np.array_equal(view.eval_window(frag, 10, 20, S), view._normalised(frag, 6, 11, 10,
                                                                              20, S))


def test_depth_scale_draws_vary_in_training_and_are_checked(frag):
    view = make_view("slices", "range", depth=16, z0=6, z1=11, depth_shift=0, depth_scale=0.5)
    draws = [view.train_window(frag, 10, 20, S, rng=np.random.default_rng(i)) for i in range(6)]
    assert all(d.shape == (5, S, S) and d.dtype == np.float32 for d in draws)
    assert len({d.tobytes() for d in draws}) > 1
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(InputError, match="depth_scale"):
            make_view("slices", "range", depth=16, depth_scale=bad)


def test_median_mad_norm_ignores_outliers_that_squash_mean_std(tmp_path):
    """A crack-like 10% of saturated pixels inflates a slice's std several times, squashing the
    papyrus to a fraction of unit spread; median / MAD keeps it near unit spread."""
    path = write_fragment(tmp_path / "f", height=128, width=128, depth=16, seed=2)
    z = 8
    img = tifffile.imread(path / "surface_volume" / f"{z:02d}.tif")
    crack = np.zeros(img.shape, bool)
    crack[:, ::10] = True
    img[crack] = np.iinfo(img.dtype).max
    tifffile.imwrite(path / "surface_volume" / f"{z:02d}.tif", img)
    frag = Fragment(path)
    spreads = {}
    for norm in ("mean_std", "median_mad"):
        view = make_view("slices", "range", depth=16, z0=z, z1=z + 1, norm=norm)
        x = view.eval_window(frag, 0, 0, 128)[0]
        inside = frag.mask_window(0, 128, 0, 128) & ~crack
        spreads[norm] = float(x[inside].std())
    assert spreads["median_mad"] > 0.6 and spreads["mean_std"] < 0.5 * spreads["median_mad"], \
        spreads
    with pytest.raises(InputError, match="norm"):
        make_view("slices", "range", depth=16, norm="minmax")
