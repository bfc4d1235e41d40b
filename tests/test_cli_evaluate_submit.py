"""`scrollsam evaluate` and `scrollsam submit` through the CLI entry point."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from scrollsam.cli import main
from scrollsam.rle import rle_decode

TRUTH = np.array([[1, 0, 0, 0],
                  [1, 1, 0, 0]], np.uint8) * 255
PRED = np.array([[1, 1, 0, 0],
                 [1, 0, 0, 1]], np.uint8) * 255


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    valid = np.full_like(TRUTH, 255)
    valid[:, 3] = 0
    prob = np.array([[230, 140, 10, 0],
                     [200, 120, 0, 250]], np.uint8)  # 0.90 0.55 .04 0 / .78 .47 0 .98
    return {
        "labels": _png(tmp_path / "inklabels.png", TRUTH),
        "pred": _png(tmp_path / "pred.png", PRED),
        "mask": _png(tmp_path / "mask.png", valid),
        "prob": _png(tmp_path / "prob.png", prob),
        "small": _png(tmp_path / "small.png", np.zeros((3, 4), np.uint8)),
    }


def test_evaluate_json(files, capsys):
    code = main(["evaluate", "--pred", files["pred"], "--labels", files["labels"],
                 "--mask", files["mask"], "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    # inside the mask: tp 2, fp 1, fn 1, tn 2
    assert out["f0.5"] == pytest.approx(2 / 3)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["dice"] == pytest.approx(2 / 3)
    assert out["iou"] == pytest.approx(0.5)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 2)
    assert out["threshold"] is None  # binary prediction used as is


def test_evaluate_text_and_threshold(files, capsys):
    assert main(["evaluate", "--pred", files["prob"], "--labels", files["labels"]]) == 0
    text = capsys.readouterr().out
    for key in ("f0.5", "precision", "recall", "dice", "iou", "tp=", "fn="):
        assert key in text
    # at 0.5: .90 .55 .78 .98 are ink -> tp (0,0) (1,0), fp (0,1) (1,3), fn (1,1)
    main(["evaluate", "--pred", files["prob"], "--labels", files["labels"], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 2, 1) and out["threshold"] == 0.5
    # at 0.4: 0.55 and 0.47 join: (0,1) is fp, (1,1) is tp
    main(["evaluate", "--pred", files["prob"], "--labels", files["labels"], "--json",
          "--threshold", "0.4"])
    out = json.loads(capsys.readouterr().out)
    assert (out["tp"], out["fp"], out["fn"]) == (3, 2, 0)


@pytest.mark.parametrize(
    ("which", "flag", "message"),
    [
        ("small", "--pred", r"small\.png: expected 2 x 4"),
        ("small", "--mask", r"small\.png: expected 2 x 4"),
        ("missing", "--pred", r"missing\.png: expected an image file, got no such file"),
    ],
)
def test_evaluate_errors_exit_2_with_one_line(files, tmp_path, capsys, which, flag, message):
    files["missing"] = str(tmp_path / "missing.png")
    args = {"--pred": files["pred"], "--labels": files["labels"], flag: files[which]}
    code = main(["evaluate", *[x for kv in args.items() for x in kv]])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_evaluate_bad_threshold(files, capsys):
    assert main(["evaluate", "--pred", files["prob"], "--labels", files["labels"],
                 "--threshold", "2"]) == 2
    assert "threshold: expected a number in [0, 1]" in capsys.readouterr().err


def test_submit_writes_rows_in_order(files, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    code = main(["submit", "--pred", f"b={files['pred']}", "--pred", f"a={files['labels']}",
                 "--out", str(out)])
    assert code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "Id,Predicted"
    assert [line.split(",")[0] for line in lines[1:]] == ["b", "a"]
    assert lines[1] == "b,1 2 5 1 8 1"  # row-major: pixels 1, 2, 5, 8
    np.testing.assert_array_equal(rle_decode(lines[2].split(",")[1], (2, 4)), TRUTH > 0)
    # a probability image is thresholded (default 0.5)
    main(["submit", "--pred", f"p={files['prob']}", "--out", str(out), "--force"])
    assert out.read_text() == "Id,Predicted\np,1 2 5 1 8 1\n"


def test_submit_refuses_to_overwrite_without_force(files, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    out.write_text("precious")
    code = main(["submit", "--pred", f"a={files['pred']}", "--out", str(out)])
    assert code == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "precious"
    assert main(["submit", "--pred", f"a={files['pred']}", "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith("Id,Predicted\na,")


@pytest.mark.parametrize(
    ("preds", "message"),
    [
        (["no-equals-sign.png"], "expected ID=MASK.png"),
        (["a=PRED", "a=PRED"], "twice"),
        (["a=PRED", "b=MISSING"], r"missing\.png: expected an image file"),
    ],
)
def test_submit_bad_pred_exit_2_and_writes_nothing(files, tmp_path, capsys, preds, message):
    out = tmp_path / "submission.csv"
    specs = [p.replace("PRED", files["pred"]).replace("MISSING", str(tmp_path / "missing.png"))
             for p in preds]
    code = main(["submit", *[x for p in specs for x in ("--pred", p)], "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("command", ["evaluate", "submit"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"example:\n  scrollsam {command} --pred" in text


def test_closed_output_pipe_is_not_a_crash(files, monkeypatch, capsys):
    """`scrollsam evaluate ... | head -1`: the reader leaves early; no traceback, exit 141."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["evaluate", "--pred", files["pred"], "--labels", files["labels"]]) == 141
    assert capsys.readouterr().err == ""


def test_evaluate_with_an_all_zero_mask_is_an_error_naming_it(files, tmp_path, capsys):
    # Before: nothing was scored and F0.5 came out as 1.0000.
    zero = _png(tmp_path / "zeromask.png", np.zeros_like(TRUTH))
    assert main(["evaluate", "--pred", files["pred"], "--labels", files["pred"],
                 "--mask", zero]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no valid pixels to score: the mask is all zero ({zero})\n"


def _bad(tmp_path, kind):
    """A label / mask file that is not binary, as QA found them."""
    if kind == "254":  # labels saved as 0/254
        return _png(tmp_path / "l254.png", np.where(TRUTH > 0, 254, 0).astype(np.uint8))
    if kind == "xray":  # an x-ray slice (uint16 TIFF) given as labels or mask
        path = tmp_path / "00.tif"
        tifffile.imwrite(path, np.arange(8, dtype=np.uint16).reshape(2, 4) * 4000 + 100)
        return str(path)
    if kind == "photo":  # a grey photo (ir.png) given as labels or mask
        return _png(tmp_path / "ir.png", np.array([[0, 12, 200, 90], [255, 7, 33, 1]], np.uint8))
    if kind == "float":
        path = tmp_path / "half.tif"
        tifffile.imwrite(path, np.full((2, 4), 0.5, np.float32))
        return str(path)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["254", "xray", "photo", "float"])
def test_evaluate_refuses_labels_that_are_not_binary(files, tmp_path, capsys, kind):
    # Before: scored as "nonzero = ink", while inspect, train and predict refuse labels that
    # are not binary. Masks stay "nonzero = inside", as the fragment reader takes mask.png.
    flag, bad = "--labels", _bad(tmp_path, kind)
    args = {"--pred": files["prob"], "--labels": bad, "--mask": files["mask"]}
    assert main(["evaluate", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag}: must be binary"), err
    assert err.rstrip().endswith(f"({bad})"), err


def test_evaluate_takes_a_mask_as_the_fragment_reader_does_nonzero_inside(files, tmp_path,
                                                                         capsys):
    # Review: a soft-edged mask.png (0 / 128 / 255) that train and predict take was refused.
    soft = np.array(Image.open(files["mask"])).astype(np.uint8)
    soft[soft > 0] = 128
    mask = _png(tmp_path / "soft.png", soft)
    assert main(["evaluate", "--pred", files["pred"], "--labels", files["labels"], "--mask",
                 mask, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 2)  # as test_evaluate_json


@pytest.mark.parametrize("encoding", ["0/1", "0/65535", "rgb", "1-bit"])
def test_evaluate_takes_the_binary_encodings_the_fragment_reader_takes(files, tmp_path, capsys,
                                                                      encoding):
    def encode(name, image):
        on = image > 0
        if encoding == "0/1":
            return _png(tmp_path / name, on.astype(np.uint8))
        if encoding == "0/65535":
            return _png(tmp_path / name, on.astype(np.uint16) * 65535)
        if encoding == "rgb":
            return _png(tmp_path / name, np.repeat(image[..., None], 3, axis=2))
        return _png(tmp_path / name, on)  # mode "1"

    labels, mask = encode("l.png", TRUTH), encode("m.png", np.array(Image.open(files["mask"])))
    assert main(["evaluate", "--pred", files["pred"], "--labels", labels, "--mask", mask,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 2)  # as test_evaluate_json


def test_a_probability_image_of_0s_and_1s_warns_and_reads_as_probabilities_with_as_prob(
        files, tmp_path, capsys, caplog):
    """QA: a prob.png of a model that found no ink (every value 0 or 1, p <= 1/255) was scored
    as a mask, silently: F0.5 0.5 here instead of 0."""
    low = _png(tmp_path / "prob_low.png", (TRUTH > 0).astype(np.uint8))  # 0 / 1 on the ink
    assert main(["evaluate", "--pred", low, "--labels", files["labels"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f0.5"] == pytest.approx(1.0)  # a 0/1 mask
    assert "values 0 and 1 only, read as a mask" in caplog.text and "--as prob" in caplog.text
    assert main(["evaluate", "--pred", low, "--labels", files["labels"], "--json",
                 "--as", "prob"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["f0.5"] == 0.0 and out["threshold"] == 0.5
    caplog.clear()
    assert main(["evaluate", "--pred", files["pred"], "--labels", files["labels"]]) == 0
    assert "read as a mask" not in caplog.text  # 0/255: a mask, no doubt
    capsys.readouterr()
    assert main(["evaluate", "--pred", files["prob"], "--labels", files["labels"], "--json",
                 "--as", "mask"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] is None  # nonzero = ink


def test_submit_never_writes_into_a_fragment_or_over_its_own_input(files, tmp_path, capsys):
    """QA: `submit --out FRAGMENT/layers/00.tif --force` replaced a slice with CSV text, and
    `--out FRAGMENT/ID_mask.png --force` the segment's mask (predict --submission refused)."""
    from scrollsam.data.synthetic import write_fragment

    frag = write_fragment(tmp_path / "frag", height=16, width=16, depth=2, seed=0)
    before = {p: p.read_bytes() for p in frag.rglob("*") if p.is_file()}
    for out in (frag / "surface_volume" / "00.tif", frag / "mask.png", frag / "new.csv"):
        code = main(["submit", "--pred", f"a={files['pred']}", "--out", str(out), "--force"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: --out: must lie outside every fragment")
    assert {p: p.read_bytes() for p in frag.rglob("*") if p.is_file()} == before
    pred = open(files["pred"], "rb").read()
    assert main(["submit", "--pred", f"a={files['pred']}", "--out", files["pred"],
                 "--force"]) == 2
    assert "must differ from the predictions it reads" in capsys.readouterr().err
    assert open(files["pred"], "rb").read() == pred
