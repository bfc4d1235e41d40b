"""Ink is only ever marked inside the fragment mask, whatever the threshold (QA: with
``--threshold 0`` every pixel outside mask.png was ink in mask.png, in the OME-Zarr
``labels/ink`` and in both submissions). Tiny model, a 150 x 120 fragment in 3 bands."""

from __future__ import annotations

import numpy as np
import pytest
from infer_helpers import band_data, zarr_files

from scrollsam.infer.outputs import write_outputs
from scrollsam.infer.pipeline import predict_to_folder
from scrollsam.io import read_image
from scrollsam.rle import rle_encode

BANDS = {"chunk": 32, "band_rows": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return band_data(tmp_path_factory.mktemp("inside"))


def test_write_outputs_marks_no_ink_outside_valid_at_threshold_0(tmp_path):
    """Also a map of only 0 and 1 is read as probabilities (at 0 every valid pixel is ink), as
    the OME-Zarr bands read it, not as a binary mask."""
    rng = np.random.default_rng(0)
    valid = np.zeros((40, 30), bool)
    valid[5:35, 4:26] = True
    prob = np.where(valid & (rng.random(valid.shape) < 0.3), 1.0, 0.0).astype(np.float32)
    labels = valid & (rng.random(valid.shape) < 0.5)
    written = write_outputs(tmp_path, prob, threshold=0.0, valid=valid, labels=labels)
    np.testing.assert_array_equal(read_image(written.files["mask"]) > 0, valid)
    assert written.metrics is not None
    assert written.metrics["fp"] == int((valid & ~labels).sum())
    assert written.metrics["tp"] == int(labels.sum())


def test_threshold_0_marks_the_fragment_and_nothing_else_in_every_output(data, tmp_path):
    frag = read_image(data / "frag" / "mask.png") > 0
    labels = read_image(data / "frag" / "inklabels.png") > 0
    assert not frag.all()  # the fragment has pixels outside its mask
    common = dict(device="cpu", threshold=0, **BANDS)
    (png,) = predict_to_folder(data / "run", [data / "frag"], tmp_path / "png", fmt="png",
                               submission=tmp_path / "png.csv", **common)
    (zr,) = predict_to_folder(data / "run", [data / "frag"], tmp_path / "zarr", fmt="zarr",
                              submission=tmp_path / "zarr.csv", **common)
    np.testing.assert_array_equal(read_image(tmp_path / "png" / "mask.png") > 0, frag)
    masks = zarr_files(tmp_path / "zarr")[1]
    np.testing.assert_array_equal(masks[0] > 0, frag)
    for name in ("png", "zarr"):
        rows = (tmp_path / f"{name}.csv").read_text().splitlines()
        assert rows[1] == f"frag,{rle_encode(frag)}", name
    assert png.metrics == zr.metrics
    assert png.metrics["fp"] == int((frag & ~labels).sum()) and png.metrics["fn"] == 0
