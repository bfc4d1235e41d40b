"""`scrollsam predict` end to end: files written, threshold, submission round trip, clicks, and
one-line errors (exit code 2) for missing inputs. Tiny model, small synthetic fragments."""

from __future__ import annotations

import csv
import json
import logging

import cv2
import numpy as np
import pytest
import tifffile
from infer_helpers import make_run

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment
from scrollsam.infer.outputs import overlay, write_outputs
from scrollsam.io import read_image
from scrollsam.metrics import binarize_prediction
from scrollsam.rle import rle_decode


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_fragment(root / "a", height=100, width=90, depth=65, seed=11)
    write_fragment(root / "b", height=67, width=101, depth=65, seed=12, labels=False)
    write_fragment(root / "no_ir", height=80, width=80, depth=65, seed=13, ir=False)
    write_fragment(root / "thin", height=80, width=80, depth=20, seed=14, ir=False)
    make_run(root / "run_ir", "data.input=ir", best=0.4, last=0.3)
    make_run(root / "run_slices", "data.input=slices", "data.strategy=triplet")
    return root


def predict(*args: str) -> int:
    return main(["predict", *args])


def test_predict_writes_pictures_masks_and_metrics_at_the_checkpoint_threshold(data, tmp_path,
                                                                                capsys):
    out = tmp_path / "out"
    assert predict("--run", str(data / "run_ir"), "--fragment", str(data / "a"), "--out",
                   str(out), "--save-tif", "--device", "cpu") == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"prob.png", "mask.png", "overlay.png", "prob.tif", "metrics.json",
                     ".prediction.json"}
    prob = tifffile.imread(out / "prob.tif")
    assert prob.dtype == np.float32 and prob.shape == (100, 90)
    mask = read_image(out / "mask.png")
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, binarize_prediction(prob, threshold=0.4)[0])
    np.testing.assert_array_equal(read_image(out / "prob.png"), np.rint(prob * 255))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == 0.4 and metrics["mode"] == "prompt-free"
    assert {"f0.5", "precision", "recall", "dice", "iou"} <= set(metrics)
    assert "F0.5" in capsys.readouterr().out

    # --threshold overrides, --checkpoint last carries its own threshold
    out2 = tmp_path / "out2"
    assert predict("--run", str(data / "run_ir"), "--fragment", str(data / "a"), "--out",
                   str(out2), "--checkpoint", "last", "--device", "cpu") == 0
    assert json.loads((out2 / "metrics.json").read_text())["threshold"] == 0.3
    assert predict("--run", str(data / "run_ir"), "--fragment", str(data / "a"), "--out",
                   str(out2), "--threshold", "0.55", "--device", "cpu") == 0
    assert json.loads((out2 / "metrics.json").read_text())["threshold"] == 0.55


def test_several_fragments_and_a_submission_that_decodes_back_to_the_masks(data, tmp_path):
    out, csv_path = tmp_path / "pred", tmp_path / "submission.csv"
    args = ["--run", str(data / "run_slices"), "--fragment", str(data / "a"), "--fragment",
            str(data / "b"), "--out", str(out), "--submission", str(csv_path), "--device", "cpu"]
    assert predict(*args) == 0
    assert (out / "a" / "metrics.json").is_file()
    assert not (out / "b" / "metrics.json").exists()  # b has no labels
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Predicted"] and [r[0] for r in rows[1:]] == ["a", "b"]
    for ident, rle in rows[1:]:
        mask = read_image(out / ident / "mask.png") > 0
        np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
        assert mask.any()  # random weights at threshold 0.4: something is called ink

    before = csv_path.read_text()
    assert predict(*args) == 2  # refuses to overwrite, before predicting anything
    assert csv_path.read_text() == before
    assert predict(*args, "--force") == 0


def test_clicks_predict_only_around_them(data, tmp_path):
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps([{"x": 50, "y": 60, "label": 1}, {"x": 40, "y": 66,
                                                                    "label": 0}]))
    out = tmp_path / "out"
    assert predict("--run", str(data / "run_ir"), "--fragment", str(data / "a"), "--out",
                   str(out), "--points", str(clicks), "--save-tif", "--device", "cpu") == 0
    prob = tifffile.imread(out / "prob.tif")
    assert prob[60 - 20:60 + 20, 50 - 20:50 + 20].max() > 0
    # one 64 px tile at (y0, x0) = (28, 18) holds both clicks; nothing outside it
    assert (prob[:28] == 0).all() and (prob[:, :18] == 0).all() and (prob[:, 82:] == 0).all()
    assert json.loads((out / "metrics.json").read_text())["mode"] == "points"


@pytest.mark.parametrize("case, match", [
    ("no_config", "no config.yaml"),
    ("no_checkpoint", "expected best.pt or last.pt"),
    ("no_ir", "has no ir.png, which view 'ir' needs"),
    ("few_slices", "has 20 slices"),
    ("bad_threshold", "--threshold: expected auto, saved or a number"),
    ("bad_points", "--points: expected JSON"),
    ("no_fragment", "fragment folder not found"),
    ("stride_0", "--stride: expected an integer >= 1"),  # was: silently the default
    ("empty_mask", "mask is empty: no pixel inside the fragment"),
])
def test_missing_inputs_end_with_one_line_and_exit_code_2(data, tmp_path, capsys, case, match):
    run, frag, extra = data / "run_ir", data / "a", []
    if case == "no_config":
        run = tmp_path / "run"
        run.mkdir()
    elif case == "no_checkpoint":
        run = make_run(tmp_path / "run", best=None, last=None)
    elif case == "no_ir":
        frag = data / "no_ir"
    elif case == "few_slices":
        run, frag = data / "run_slices", data / "thin"
    elif case == "bad_threshold":
        extra = ["--threshold", "high"]
    elif case == "bad_points":
        (tmp_path / "p.json").write_text("{not json")
        extra = ["--points", str(tmp_path / "p.json")]
    elif case == "no_fragment":
        frag = tmp_path / "missing"
    elif case == "stride_0":
        extra = ["--stride", "0"]
    elif case == "empty_mask":
        frag = write_fragment(tmp_path / "empty", height=64, width=64, depth=65, seed=5)
        cv2.imwrite(str(frag / "mask.png"), np.zeros((64, 64), np.uint8))
    out = tmp_path / "out"
    code = predict("--run", str(run), "--fragment", str(frag), "--out", str(out), *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (out / "mask.png").exists()


def test_overlay_is_downscaled_and_marks_ink_and_truth():
    h, w = 300, 200
    mask8 = np.zeros((h, w), np.uint8)
    mask8[100:200, 50:150] = 255
    labels = np.zeros((h, w), bool)
    labels[20:60, 20:60] = True
    bg = np.full((h, w), 100, np.uint8)
    pic = overlay(mask8, labels=labels, background=lambda a, b: bg[a:b], max_side=64)
    assert pic.shape == (60, 40, 3) and pic.dtype == np.uint8  # factor 5: 300 / 5 = 60
    b, g, r = (int(v) for v in pic[30, 20])  # inside the predicted square: tinted red
    assert r > b + 50 and r > g + 50
    assert (pic[3, 8] == [255, 255, 0]).all()  # just outside the labelled square: cyan outline
    assert (pic[8, 8] != [255, 255, 0]).any()  # its inside stays visible
    assert len(set(pic[50, 5].tolist())) == 1  # elsewhere: grey background


def test_write_outputs_checks_shapes(tmp_path):
    from scrollsam.errors import InputError

    prob = np.zeros((10, 12), np.float32)
    with pytest.raises(InputError, match="labels: expected shape"):
        write_outputs(tmp_path, prob, threshold=0.5, labels=np.zeros((12, 10), bool))
    with pytest.raises(InputError, match="prob: expected float32"):
        write_outputs(tmp_path, prob.astype(np.float64), threshold=0.5)


def test_a_window_larger_than_the_fragment_warns_and_the_checkpoint_is_named_once(data,
                                                                                 tmp_path,
                                                                                 caplog):
    # Before: --tile 128 on a 100 x 90 fragment gave a poor F0.5 without a word, and predict
    # said "loaded ... best.pt" twice.
    with caplog.at_level(logging.INFO):
        assert predict("--run", str(data / "run_ir"), "--fragment", str(data / "a"), "--out",
                       str(tmp_path / "out"), "--tile", "128") == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("window (--tile" in m and "128 px is larger than the fragment (100 x 90 px)"
               in m and "--tile 90 or less" in m for m in warned), warned
    assert sum("best.pt" in m and m.startswith("loaded") for m in caplog.messages) == 1


def test_a_checkpoint_file_alone_predicts_like_its_run(tmp_path, data):
    """Issue 11.2: the checkpoint's own config rebuilds model and view; no run dir beside it."""
    import shutil

    from scrollsam.infer.predict import Predictor


    run = make_run(tmp_path / "run", "data.input=ir", best=0.4, last=0.3)
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(run / "best.pt", alone)
    shutil.rmtree(run)  # nothing of the run is left
    pred = Predictor.from_run(None, checkpoint=str(alone), device="cpu")
    assert pred.threshold == pytest.approx(0.4)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(alone), "--fragment", str(data / "a"),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "prob.png").is_file()
    assert main(["predict", "--checkpoint", "best", "--fragment", str(data / "a"),
                 "--out", str(tmp_path / "p2")]) == 2  # best / last need a run


def test_metrics_name_the_checkpoint_loaded_and_its_run_only(data, tmp_path):
    """QA: `--checkpoint PATH` alone recorded "run": "None" (a string), and `--run A
    --checkpoint B/best.pt` recorded run A for B's weights."""
    ir, slices = data / "run_ir", data / "run_slices"

    def recorded(*args: str) -> tuple[object, object]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert predict(*args, "--fragment", str(data / "a"), "--out", str(out),
                       "--device", "cpu") == 0
        metrics = json.loads((out / "metrics.json").read_text())
        return metrics["run"], metrics["checkpoint"]

    assert recorded("--run", str(ir)) == (str(ir), str(ir / "best.pt"))
    assert recorded("--run", str(ir), "--checkpoint", "last") == (str(ir), str(ir / "last.pt"))
    assert recorded("--run", str(ir), "--checkpoint", str(ir / "last.pt")) == (
        str(ir), str(ir / "last.pt"))  # a path inside the run is the run's
    assert recorded("--checkpoint", str(ir / "best.pt")) == (None, str(ir / "best.pt"))
    assert recorded("--run", str(ir), "--checkpoint", str(slices / "best.pt")) == (
        None, str(slices / "best.pt"))  # another run's weights: not run_ir's prediction


@pytest.mark.parametrize("case, match", [
    ("tile_huge", "--tile: expected an integer <= 4096"),  # was: a 74.5 GiB allocation
    ("band_rows_0", "--band-rows: expected a positive multiple"),  # was: the default
    ("id_with_space", "--submission: expected fragment folder names usable as Ids"),  # was:
    # refused after predicting every fragment, naming neither --submission nor the folder
])
def test_bad_settings_are_refused_before_the_model_loads(data, tmp_path, capsys, monkeypatch,
                                                         case, match):
    from scrollsam.infer.predict import Predictor

    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(Predictor, "from_run", no_model_work)
    frag, extra = data / "a", []
    if case == "tile_huge":
        extra = ["--tile", "100000"]
    elif case == "band_rows_0":
        extra = ["--format", "zarr", "--band-rows", "0"]
    else:
        frag = write_fragment(tmp_path / "a b", height=40, width=40, depth=65, seed=5)
        extra = ["--submission", str(tmp_path / "sub.csv")]
    out = tmp_path / "out"
    code = predict("--run", str(data / "run_ir"), "--fragment", str(frag), "--out", str(out),
                   *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    if case == "id_with_space":
        assert err[0].endswith(f"got 'a b' ({frag})")
    assert not out.exists() and not (tmp_path / "sub.csv").exists()


@pytest.mark.parametrize("fails", ["clicks", "interrupt"])
def test_a_failure_after_the_statistics_leaves_no_new_out(data, tmp_path, capsys, monkeypatch,
                                                          fails):
    # A checkpoint file alone (or a read-only run) caches the fragment statistics in OUT/stats.
    # Before: a clicks file found broken after them, or a Ctrl-C in the prediction, left the
    # new OUT holding its stats/ folder (with a relative --out too).
    from scrollsam.infer.predict import Predictor

    alone = tmp_path / "model" / "alone.pt"
    alone.parent.mkdir()
    alone.write_bytes((data / "run_ir" / "best.pt").read_bytes())
    (tmp_path / "p.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", "model/alone.pt", "--fragment", str(data / "a"), "--out", "new/out",
            "--device", "cpu"]
    if fails == "clicks":
        assert predict(*args, "--points", "p.json") == 2
        assert "--points: expected JSON" in capsys.readouterr().err
    else:
        def interrupted(*a, **k):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(Predictor, "predict_rows", interrupted)
            assert predict(*args) == 130
    assert not (tmp_path / "new").exists()
    assert predict(*args) == 0
    assert len(list((tmp_path / "new" / "out" / "stats").iterdir())) == 1  # the cache works
