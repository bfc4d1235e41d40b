"""Synthetic fragments: Kaggle layout and dtypes, determinism, an ink signal where it belongs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import slice_contrast
from scrollsam.data.synthetic import synth_fragments, write_fragment
from scrollsam.errors import InputError


def test_synth_fragments_layout_and_dtypes(tmp_path):
    paths = synth_fragments(tmp_path / "out", fragments=2, height=40, width=56, depth=5, seed=1,
                            test_fragments=2)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == [
        "train/1", "train/2", "test/a", "test/b"]
    for p in paths:
        names = sorted(q.name for q in p.iterdir())
        expected = ["inklabels.png", "ir.png", "mask.png", "surface_volume",
                    "synth_settings.json"]
        if p.parent.name == "test":
            expected.remove("inklabels.png")
        assert names == expected
        slices = sorted((p / "surface_volume").iterdir())
        assert [s.name for s in slices] == ["00.tif", "01.tif", "02.tif", "03.tif", "04.tif"]
        vol = tifffile.imread(slices[2])
        assert vol.dtype == np.uint16 and vol.shape == (40, 56)
        mask = cv2.imread(str(p / "mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        ir = cv2.imread(str(p / "ir.png"), cv2.IMREAD_UNCHANGED)
        assert ir.dtype == np.uint8 and ir.shape == (40, 56)
        if p.parent.name == "train":
            labels = cv2.imread(str(p / "inklabels.png"), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(labels)) <= {0, 255}
        assert Fragment(p).shape == (5, 40, 56)
    assert not list((tmp_path / "out").glob("**/.*tmp*"))  # no leftovers of the temp-and-rename


def test_many_slices_get_three_digit_names(tmp_path):
    path = write_fragment(tmp_path / "f", height=16, width=16, depth=101)
    names = sorted(p.name for p in (path / "surface_volume").iterdir())
    assert names[0] == "000.tif" and names[-1] == "100.tif" and len(names) == 101
    assert Fragment(path).depth == 101


def test_deterministic_per_seed(tmp_path):
    a = write_fragment(tmp_path / "a", height=64, width=64, depth=4, seed=7)
    b = write_fragment(tmp_path / "b", height=64, width=64, depth=4, seed=7)
    c = write_fragment(tmp_path / "c", height=64, width=64, depth=4, seed=8)
    for name in ["surface_volume/02.tif", "mask.png", "inklabels.png", "ir.png"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "surface_volume/02.tif").read_bytes() != (c / "surface_volume/02.tif").read_bytes()


def test_fragment_i_does_not_depend_on_the_count(tmp_path):
    one = synth_fragments(tmp_path / "x", fragments=1, height=32, width=32, depth=3, seed=4)
    two = synth_fragments(tmp_path / "y", fragments=2, height=32, width=32, depth=3, seed=4)
    assert (one[0] / "ir.png").read_bytes() == (two[0] / "ir.png").read_bytes()


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "1"
    return Fragment(write_fragment(path, height=256, width=256, depth=65, seed=0))


def test_looks_like_a_fragment(realistic):
    frag = realistic
    mask, ink, ir = frag.mask(), frag.labels(), frag.ir().astype(float)
    assert 0.4 < mask.mean() < 0.8  # an outline, not the whole image
    assert not mask[0].all() and not mask[:, 0].all()
    assert 0.02 < ink[mask].mean() < 0.3  # ink is a minority, inside the fragment
    assert not (ink & ~mask).any()
    # Infrared: ink clearly darker than papyrus.
    assert ir[ink].mean() < ir[mask & ~ink].mean() - 40


def test_ink_signal_is_subtle_and_in_the_middle_slices(realistic):
    contrast = np.array(slice_contrast(realistic, rng=np.random.default_rng(0)).contrast)
    peak = int(np.argmax(contrast))
    assert 25 <= peak <= 40, contrast.round(2)
    assert 0.2 < contrast[peak] < 3.0  # visible to statistics, not an obvious stamp
    assert np.abs(contrast[:10]).max() < 0.25 and np.abs(contrast[-10:]).max() < 0.25


def test_surface_drifts_across_the_fragment(realistic):
    """The papyrus sheet's edge lies at different depths in different places."""
    vol = realistic.read(0, 65, 0, 256, 0, 256).astype(float)  # [D, H, W]
    mask = realistic.mask()
    threshold = (vol.max() + vol.min()) / 2
    top = np.argmax(vol > threshold, axis=0)[mask]  # first slice above threshold
    assert np.percentile(top, 90) - np.percentile(top, 10) >= 2


def test_ink_contrast_sets_the_strength_of_the_volume_signal(tmp_path):
    peaks = []
    for strength in (0.0, 0.1, 0.3):
        frag = Fragment(write_fragment(tmp_path / f"f{strength}", height=128, width=128, depth=65,
                                       ink_contrast=strength))
        contrast = np.array(slice_contrast(frag, rng=np.random.default_rng(0)).contrast)
        peaks.append(contrast[25:41].max())
    assert peaks[0] < 0.3 and peaks[0] + 0.15 < peaks[1] and peaks[1] + 0.3 < peaks[2], peaks


@pytest.mark.parametrize("kw, name", [
    ({"height": 8}, "height"), ({"depth": 0}, "depth"), ({"ink_contrast": 2.0}, "ink_contrast"),
    ({"width": 3.5}, "width"),
])
def test_bad_arguments(tmp_path, kw, name):
    opts = {"height": 32, "width": 32, "depth": 3, **kw}
    with pytest.raises(InputError, match=name):
        write_fragment(tmp_path / "f", **opts)


def test_existing_folder_is_not_overwritten_unless_asked(tmp_path):
    path = write_fragment(tmp_path / "f", height=32, width=32, depth=2, seed=1)
    before = (path / "ir.png").read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_fragment(path, height=32, width=32, depth=2, seed=2)
    assert (path / "ir.png").read_bytes() == before
    write_fragment(path, height=32, width=32, depth=2, seed=2, overwrite=True)
    assert (path / "ir.png").read_bytes() != before


def _settings(path):
    import json

    return json.loads((path / "synth_settings.json").read_text())


@pytest.mark.parametrize("level", [1, 2])
def test_vary_is_deterministic_per_seed_and_within_its_ranges(tmp_path, level):
    from scrollsam.data.synth_settings import VARY_RANGES, SynthSettings

    seen = []
    for seed in range(6):
        a = write_fragment(tmp_path / f"a{seed}", height=32, width=32, depth=8, seed=seed,
                           vary=level)
        b = write_fragment(tmp_path / f"b{seed}", height=32, width=32, depth=8, seed=seed,
                           vary=level)
        assert _settings(a) == _settings(b)
        assert (a / "mask.png").read_bytes() == (b / "mask.png").read_bytes()
        got = _settings(a)
        for name, (low, high) in VARY_RANGES[level].items():
            assert low - 0.5 <= got[name] <= high + 0.5 if name == "depth" else \
                low <= got[name] <= high, (name, got[name])
        assert Fragment(a).depth == got["depth"]
        seen.append(got)
    defaults = SynthSettings()
    for name in VARY_RANGES[level]:  # every setting of the level actually varies
        values = {s[name] for s in seen}
        assert len(values) > 1 and values != {getattr(defaults, name)}, name


def test_vary_zero_is_the_fixed_generator_and_settings_override_draws(tmp_path):
    from dataclasses import asdict

    from scrollsam.data.synth_settings import SynthSettings

    plain = write_fragment(tmp_path / "p", height=32, width=32, depth=8, seed=3)
    assert _settings(plain) == asdict(SynthSettings(depth=8))
    fixed = write_fragment(tmp_path / "f", height=32, width=32, depth=8, seed=3, vary=1,
                           settings={"ink_offset": 5.0, "ink_contrast": 0.3})
    drawn = write_fragment(tmp_path / "d", height=32, width=32, depth=8, seed=3, vary=1)
    got, other = _settings(fixed), _settings(drawn)
    assert got["ink_offset"] == 5.0 and got["ink_contrast"] == 0.3
    # the other settings are the same draws as without the fixed ones
    assert {k: v for k, v in got.items() if k not in ("ink_offset", "ink_contrast")} == \
        {k: v for k, v in other.items() if k not in ("ink_offset", "ink_contrast")}


def test_ink_offset_moves_the_ink_signal_in_depth(tmp_path):
    peaks = []
    for offset in (-6.0, 6.0):
        frag = Fragment(write_fragment(tmp_path / f"o{offset}", height=128, width=128,
                                       depth=65, settings={"ink_offset": offset,
                                                           "ink_contrast": 0.3, "drift": 0.0}))
        contrast = np.array(slice_contrast(frag, rng=np.random.default_rng(0)).contrast)
        peaks.append(int(np.argmax(contrast)))
    assert peaks[1] - peaks[0] >= 9, peaks


@pytest.mark.parametrize("items, name", [
    (["nope=1"], "--setting"), (["ink_offset"], "--setting"), (["depth=x"], "depth"),
])
def test_bad_settings_name_the_setting(items, name):
    from scrollsam.data.synth_settings import parse_settings

    with pytest.raises(InputError, match=name):
        parse_settings(items)


def test_settings_out_of_limits_are_refused(tmp_path):
    with pytest.raises(InputError, match="noise"):
        write_fragment(tmp_path / "f", height=32, width=32, depth=8, settings={"noise": 2.0})
    with pytest.raises(InputError, match="--vary"):
        write_fragment(tmp_path / "g", height=32, width=32, depth=8, vary=7)


def test_ink_variation_makes_some_strokes_stronger_than_others(tmp_path):
    """Without noise and fibres the ink's density excess is the same everywhere at
    ink_variation 0 and spreads over a factor of several at 1.0 (bounded by e**1 either way)."""
    spreads = []
    for v in (0.0, 1.0):
        quiet = {"ink_variation": v, "noise": 0.0, "fibre": 0.0, "drift": 0.0, "stroke": 2.5}
        frag = Fragment(write_fragment(tmp_path / f"v{v}", height=192, width=192, depth=65,
                                       seed=3, settings=quiet))
        ink = cv2.erode(frag.labels().astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        z = 32  # the sheet's centre, where the ink peaks
        plain = write_fragment(tmp_path / f"p{v}", height=192, width=192, depth=65, seed=3,
                               settings={**quiet, "ink_contrast": 0.0})
        excess = (frag.read(z, z + 1, 0, 192, 0, 192)[0].astype(np.float64)
                  - Fragment(plain).read(z, z + 1, 0, 192, 0, 192)[0])[ink]
        spreads.append(np.percentile(excess, 95) / np.percentile(excess, 5))
    assert spreads[0] < 1.3 and 2.0 < spreads[1] < np.e ** 2 + 0.1, spreads
