"""A resumed ``scrollsam predict`` whose every band was already done reports that, not a speed
of 0.00 MP/s."""

from __future__ import annotations

import torch
from infer_helpers import band_data

from scrollsam.cli import main
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.infer.meter import Meter


def test_a_meter_with_nothing_to_predict_has_no_speed(tmp_path):
    frag = Fragment(write_fragment(tmp_path / "frag", height=150, width=120, depth=8))
    assert Meter(frag, False, bands=[]).finish(0.01, torch.device("cpu"))[
        "megapixels_per_s"] is None
    assert Meter(frag, False, bands=[(0, 64)]).finish(0.01, torch.device("cpu"))[
        "megapixels_per_s"] > 0


def test_a_resumed_predict_with_every_band_done_prints_no_speed(tmp_path, capsys):
    data = band_data(tmp_path)
    args = ["predict", "--run", str(data / "run"), "--fragment", str(data / "frag"), "--out",
            str(tmp_path / "o"), "--device", "cpu", "--format", "zarr", "--chunk", "32",
            "--band-rows", "64"]
    assert main(args) == 0
    assert "MP/s" in capsys.readouterr().out
    assert main(args) == 0  # same settings: every band already done
    out = capsys.readouterr().out
    assert "3 of 3 bands already done" in out and "MP/s" not in out, out
