"""What `scrollsam predict` advises about window sizes: only values it accepts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from infer_helpers import make_run
from PIL import Image

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("warn") / "run", "data.input=ir", best=0.4,
                    image_size=32)


def cropped(src: Path, dest: Path, height: int, width: int) -> Path:
    """A copy of fragment ``src`` cut to its top-left ``height x width`` pixels, mask all in."""
    (dest / "surface_volume").mkdir(parents=True)
    for p in sorted((src / "surface_volume").glob("*.tif")):
        tifffile.imwrite(dest / "surface_volume" / p.name, tifffile.imread(p)[:height, :width])
    for name in ("inklabels.png", "ir.png"):
        Image.open(src / name).crop((0, 0, width, height)).save(dest / name)
    Image.fromarray(np.full((height, width), 255, np.uint8)).save(dest / "mask.png")
    return dest


def warnings_of(caplog, run, frag, out, *extra: str) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--run", str(run), "--fragment", str(frag), "--out", str(out),
                     "--device", "cpu", *extra]) == 0
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_fragment_smaller_than_the_smallest_window_gets_advice_predict_accepts(run, tmp_path,
                                                                                  caplog):
    # Before: "use --tile 5 or less" for a 5 x 5 fragment, and --tile 5 is refused (>= 16).
    frag = cropped(write_fragment(tmp_path / "big", height=32, width=32, depth=4, seed=3),
                   tmp_path / "tiny", 5, 7)
    warned = warnings_of(caplog, run, frag, tmp_path / "out")
    assert len(warned) == 1, warned
    assert "32 px is larger than the fragment (5 x 7 px)" in warned[0]
    assert "smaller than the smallest window (--tile 16)" in warned[0]
    assert "--tile 16 pads it least" in warned[0] and "--tile 5" not in warned[0]
    # at the smallest window there is nothing better to advise
    warned = warnings_of(caplog, run, frag, tmp_path / "out16", "--tile", "16")
    assert len(warned) == 1 and "--tile 16 pads" not in warned[0], warned
    assert "smaller than the smallest window (--tile 16)" in warned[0]
    assert main(["predict", "--run", str(run), "--fragment", str(frag), "--out",
                 str(tmp_path / "out5"), "--tile", "5"]) == 2  # why the advice above matters


def test_a_fragment_at_least_the_smallest_window_gets_the_tile_that_fits(run, tmp_path, caplog):
    frag = write_fragment(tmp_path / "small", height=20, width=24, depth=4, seed=3)
    warned = warnings_of(caplog, run, frag, tmp_path / "out")
    assert len(warned) == 1 and "use --tile 20 or less" in warned[0], warned
