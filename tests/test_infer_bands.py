"""Band-wise prediction in one process: bands equal the whole map, the OME-Zarr output (opens
with zarr and ome_zarr, pyramid halves, previews), its metrics and submission equal PNG mode's,
a killed prediction resumes without recomputing written bands, other settings are refused.
Tiny model, a 150 x 120 fragment in 3 bands of 64 rows (chunks of 32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from infer_helpers import band_data, make_run, zarr_files

from scrollsam.cli import main
from scrollsam.errors import InputError
from scrollsam.infer.band_state import default_band_rows
from scrollsam.infer.outputs import block_mean
from scrollsam.infer.pipeline import predict_to_folder
from scrollsam.infer.predict import Predictor
from scrollsam.infer.segment import choose_format
from scrollsam.infer.sliding_window import sliding_window_array
from scrollsam.infer.zarr_out import ZarrOutput, level_shapes
from scrollsam.io import read_image
from scrollsam.rle import rle_encode, rle_encode_rows

BANDS = {"chunk": 32, "band_rows": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return band_data(tmp_path_factory.mktemp("bands"))


def test_a_band_is_exactly_those_rows_of_the_whole_map_and_progress_adds_up():
    rng = np.random.default_rng(0)
    image = rng.random((2, 101, 67), dtype=np.float32)  # (C, H, W)
    mask = rng.random((101, 67)) > 0.3
    mask[40:70] = False  # a band with no mask pixel at all

    def predictor(windows):  # [B, C, T, T] -> [B, T, T], any numpy function of each window
        return np.sqrt(windows[:, 0]) * windows[:, 1]

    whole = sliding_window_array(image, predictor, tile=32, stride=12, batch_size=3, mask=mask)
    for y0, y1 in [(0, 32), (32, 64), (64, 96), (96, 101), (7, 50), (0, 101)]:
        seen = []
        band = sliding_window_array(image, predictor, tile=32, stride=12, batch_size=3,
                                    mask=mask, rows=(y0, y1), progress=seen.append)
        assert band.shape == (y1 - y0, 67)
        np.testing.assert_array_equal(band, whole[y0:y1])  # bit for bit
        assert sum(seen) == (y1 - y0) * 67
    with pytest.raises(InputError, match="rows"):
        sliding_window_array(image, predictor, tile=32, stride=12, rows=(50, 50))


def test_model_bands_equal_the_whole_fragment_and_a_small_fragment_is_one_band(data):
    pred = Predictor.from_run(data / "run", device="cpu", batch_size=5)
    frag = pred.open(data / "frag")
    whole = pred.predict_fragment(frag).prob
    bands = np.concatenate([pred.predict_rows(frag, y, min(y + 64, 150))
                            for y in range(0, 150, 64)])
    # Same windows and sums; only the batches differ, and this model gives a window the
    # same values in any batch of 2 or more here (1e-4 apart at worst in a batch of one).
    np.testing.assert_allclose(bands, whole, rtol=0, atol=1e-4)
    assert default_band_rows(64, 1024) == 1024 and default_band_rows(1024, 1024) == 4096
    assert default_band_rows(300, 256) == 1280  # the smallest chunk multiple >= 4 tiles


def test_zarr_output_opens_with_ome_zarr_has_a_halving_pyramid_and_previews(data, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    out = tmp_path / "z"
    (result,) = predict_to_folder(data / "run", [data / "frag"], out, device="cpu",
                                  fmt="zarr", **BANDS)
    assert result.format == "zarr" and result.stats["bands"] == 3
    assert {p.name for p in out.iterdir()} == {"prob.ome.zarr", "prob_preview.png",
                                               "mask_preview.png", "metrics.json",
                                               "summary.json", ".predict", ".prediction.json"}
    probs, masks = zarr_files(out)
    assert [p.shape for p in probs] == level_shapes((150, 120), 32) == [
        (150, 120), (75, 60), (38, 30), (19, 15)]
    assert [m.shape for m in masks] == [p.shape for p in probs]
    assert all(p.dtype == np.uint8 for p in probs)
    assert set(np.unique(masks[0])) <= {0, 1} and masks[0].any()
    np.testing.assert_array_equal(masks[1], masks[0].reshape(75, 2, 60, 2).max(axis=(1, 3)))
    mean = probs[0].reshape(75, 2, 60, 2).astype(np.float32).mean(axis=(1, 3))
    np.testing.assert_array_equal(probs[1], np.rint(mean).astype(np.uint8))

    nodes = list(Reader(parse_url(str(out / "prob.ome.zarr")))())
    image = nodes[0]
    assert [d.shape for d in image.data] == [p.shape for p in probs]
    assert image.load(Multiscales).datasets == ["0", "1", "2", "3"]
    axes = zarr.open_group(out / "prob.ome.zarr", mode="r").attrs["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["y", "x"]
    labels = [n for n in nodes if n.load(Label) is not None]
    assert labels and [d.shape for d in labels[0].data] == [m.shape for m in masks]
    assert read_image(out / "prob_preview.png").shape == (150, 120)  # under 2048: level 0
    np.testing.assert_array_equal(read_image(out / "mask_preview.png"), masks[0] * 255)
    small = ZarrOutput(out).write_previews(tmp_path, max_side=30)  # 5 x 5 blocks, 30-row reads
    for key, full in (("prob_preview", probs[0]), ("mask_preview", masks[0] * 255)):
        want = block_mean(lambda a, b, f=full: f[a:b], full.shape, 5, dtype=np.uint8)
        np.testing.assert_array_equal(read_image(small[key]), want)
        assert want.shape == (30, 24)


def test_zarr_mode_scores_submission_and_values_equal_png_mode(data, tmp_path):
    png_out, zarr_out = tmp_path / "png", tmp_path / "zarr"
    common = dict(device="cpu", **BANDS)
    (png,) = predict_to_folder(data / "run", [data / "frag"], png_out, fmt="png",
                               submission=tmp_path / "png.csv", save_tif=True, **common)
    (zr,) = predict_to_folder(data / "run", [data / "frag"], zarr_out, fmt="zarr",
                              submission=tmp_path / "zarr.csv", **common)
    probs, masks = zarr_files(zarr_out)
    np.testing.assert_array_equal(read_image(png_out / "prob.png"), probs[0])
    np.testing.assert_array_equal(read_image(png_out / "mask.png") > 0, masks[0] > 0)
    assert png.metrics == zr.metrics and png.metrics["f0.5"] > 0
    assert (tmp_path / "png.csv").read_text() == (tmp_path / "zarr.csv").read_text()
    # float16 keeps the probabilities themselves (those of prob.tif, rounded to float16)
    f16 = tmp_path / "f16"
    predict_to_folder(data / "run", [data / "frag"], f16, fmt="zarr", dtype="float16", **common)
    p16 = zarr_files(f16)[0][0]
    assert p16.dtype == np.float16
    np.testing.assert_array_equal(p16, tifffile.imread(png_out / "prob.tif").astype(np.float16))


def test_streamed_rle_equals_the_whole_mask_encoding():
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = rng.integers(1, 9, 2)
        mask = rng.random((h, w)) < rng.random()
        for b in (1, 2, 3):
            bands = (mask[i:i + b] for i in range(0, h, b))
            assert "".join(rle_encode_rows(bands)) == rle_encode(mask)


def test_a_killed_prediction_resumes_skipping_written_bands_bit_for_bit(data, tmp_path,
                                                                        monkeypatch):
    whole = tmp_path / "whole"
    predict_to_folder(data / "run", [data / "frag"], whole, device="cpu", fmt="zarr", **BANDS)

    real = Predictor.predict_rows
    calls = []

    def dies_after_two(self, frag, y0, y1, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third band runs
        calls.append((y0, y1))
        return real(self, frag, y0, y1, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(Predictor, "predict_rows", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(data / "run", [data / "frag"], out, device="cpu", fmt="zarr", **BANDS)
    assert calls == [(0, 64), (64, 128)] and not (out / "metrics.json").exists()

    calls.clear()
    monkeypatch.setattr(Predictor, "predict_rows",
                        lambda self, frag, y0, y1, **kw: (calls.append((y0, y1)),
                                                          real(self, frag, y0, y1, **kw))[1])
    (result,) = predict_to_folder(data / "run", [data / "frag"], out, device="cpu", fmt="zarr",
                                  **BANDS)
    assert calls == [(128, 150)]  # the two written bands are not recomputed
    assert result.stats["bands_skipped"] == 2
    for a, b in zip(zarr_files(whole), zarr_files(out), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for name in ("prob_preview.png", "mask_preview.png", "metrics.json"):
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name


def test_other_settings_are_refused_and_restart_starts_over(data, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["predict", "--run", str(data / "run"), "--fragment", str(data / "frag"), "--out",
            str(out), "--device", "cpu", "--format", "zarr", "--chunk", "32",
            "--band-rows", "64"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--tile", "48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other settings" in err and "tile 64 -> 48" in err
    assert "--restart" in err
    assert main([*args, "--tile", "48", "--restart"]) == 0
    settings = json.loads((out / ".predict" / "settings.json").read_text())
    assert settings["tile"] == 48
    assert main([*args, "--tile", "48"]) == 0  # same settings: every band already done
    assert "3 of 3 bands already done" in capsys.readouterr().out


@pytest.mark.parametrize("flags, match", [
    (["--chunk", "64", "--band-rows", "100"], "--band-rows: expected a positive multiple"),
    (["--chunk", "8"], "--chunk: expected an integer >= 16"),
    (["--format", "zarr", "--points", "clicks.json"], "--points: prediction around clicks"),
    (["--timeout", "0"], "--timeout: expected a positive"),
])
def test_bad_flags_end_with_one_line(data, tmp_path, capsys, flags, match):
    code = main(["predict", "--run", str(data / "run"), "--fragment", str(data / "frag"),
                 "--out", str(tmp_path / "o"), "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and match in err
    assert not (tmp_path / "o").exists()


def test_auto_format_chooses_by_size():
    assert choose_format("auto", (8000, 8000)) == "png"
    assert choose_format("auto", (8001, 8000)) == "zarr"
    assert choose_format("png", (30000, 20000)) == "png"
    with pytest.raises(InputError, match="--format"):
        choose_format("tiff", (1, 1))


def test_an_ome_zarr_volume_predicts_the_same_bands_as_its_tiff_folder(data, tmp_path):
    from scrollsam.data.convert import convert_fragment

    run = make_run(tmp_path / "run", "data.input=slices", "data.strategy=triplet",
                   "data.view={depth: 8}")
    copy = convert_fragment(data / "frag", tmp_path / "ome" / "frag", format="ome-zarr",
                            chunks=(4, 32, 32))
    outs = []
    for frag in (data / "frag", copy):
        outs.append(tmp_path / f"out{len(outs)}")
        predict_to_folder(run, [frag], outs[-1], device="cpu", fmt="zarr", **BANDS)
    for a, b in zip(zarr_files(outs[0]), zarr_files(outs[1]), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_bad_precision_is_refused_before_the_checkpoint_loads(data, tmp_path):
    """It was a ValueError from deep in the predictor, after the model had loaded."""
    from scrollsam.infer.pipeline import predict_to_folder

    with pytest.raises(InputError, match="--precision: expected one of auto, bf16, fp32"):
        predict_to_folder(tmp_path / "no-run", [data / "frag"], tmp_path / "o",
                          precision="fp16")
