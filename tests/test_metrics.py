"""Pixel metrics against hand-computed cases, edge cases, threshold search and file scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scrollsam import metrics
from scrollsam.errors import InputError
from scrollsam.evaluate import evaluate_files
from scrollsam.metrics import (
    Counts,
    ProbabilityHistogram,
    binarize_prediction,
    confusion,
    score,
    search_threshold,
)

PRED = np.array([[1, 1, 0, 0],
                 [1, 0, 0, 1]])
TRUTH = np.array([[1, 0, 0, 0],
                  [1, 1, 0, 0]])


def test_hand_computed_scores():
    # tp = (0,0) (1,0); fp = (0,1) (1,3); fn = (1,1); tn = 3
    c = confusion(PRED, TRUTH)
    assert c == Counts(tp=2, fp=2, fn=1, tn=3)
    s = c.scores()
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f0.5"] == pytest.approx(1.25 * 2 / (1.25 * 2 + 0.25 * 1 + 2))  # 0.5263
    assert s["dice"] == pytest.approx(4 / 7)
    assert s["iou"] == pytest.approx(2 / 5)
    assert c.f_beta(1.0) == pytest.approx(s["dice"])


def test_valid_mask_limits_counts():
    valid = np.ones_like(PRED)
    valid[:, 3] = 0  # drops one fp and one tn
    c = confusion(PRED, TRUTH, valid)
    assert c == Counts(tp=2, fp=1, fn=1, tn=2)
    assert c.f_beta(0.5) == pytest.approx(2.5 / 3.75)


def test_numpy_torch_and_dtypes_agree():
    ref = confusion(PRED, TRUTH)
    assert confusion(torch.tensor(PRED), torch.tensor(TRUTH)) == ref
    assert confusion(PRED.astype(bool), (TRUTH * 255).astype(np.uint8)) == ref
    assert confusion(torch.tensor(PRED, dtype=torch.float32)[None, None],
                     torch.tensor(TRUTH, dtype=torch.float32)[None, None]) == ref
    with pytest.raises(InputError, match=r"target: expected shape \(2, 4\)"):
        confusion(PRED, TRUTH[:, :3])


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        # nothing to find, nothing found: perfect
        ([0, 0], [0, 0], {"f0.5": 1.0, "precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0}),
        # ink missed entirely: no predicted positives
        ([0, 0], [1, 0], {"f0.5": 0.0, "precision": 0.0, "recall": 0.0, "dice": 0.0, "iou": 0.0}),
        # ink invented where there is none: no true positives
        ([1, 0], [0, 0], {"f0.5": 0.0, "precision": 0.0, "recall": 0.0, "dice": 0.0, "iou": 0.0}),
        ([1, 1], [1, 1], {"f0.5": 1.0, "precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0}),
    ],
)
def test_edge_cases_have_no_nan(pred, truth, expected):
    s = score(np.array(pred), np.array(truth))
    assert {k: s[k] for k in expected} == expected
    assert not any(np.isnan(v) for v in s.values())


def test_empty_valid_mask_scores_perfect():
    c = confusion(PRED, TRUTH, np.zeros_like(PRED))
    assert c == Counts() and c.scores()["f0.5"] == 1.0


def test_threshold_search_hand_computed():
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    truth = np.array([1, 0, 1, 0, 1])
    h = ProbabilityHistogram()
    h.add(prob, truth)
    result = search_threshold(h, thresholds=[0.5, 0.25, 0.85, 0.7])
    # t=.25: tp2 fp2 fn1 -> .526; .5: tp2 fp1 fn1 -> .667; .7: tp1 fp1 fn2 -> .455;
    # .85: tp1 fp0 fn2 -> 1.25 / 1.75 = .714
    np.testing.assert_allclose(result.thresholds, [0.25, 0.5, 0.7, 0.85])
    np.testing.assert_allclose(result.scores, [2.5 / 4.75, 2.5 / 3.75, 1.25 / 2.75, 1.25 / 1.75])
    assert result.threshold == pytest.approx(0.85)
    assert result.counts == Counts(tp=1, fp=0, fn=2, tn=2)


def test_threshold_search_ties_go_low():
    a = ProbabilityHistogram()
    a.add(np.array([0.9, 0.1]), np.array([1, 0]))  # any t in (0.1, 0.9] is perfect
    assert search_threshold(a, thresholds=[0.3, 0.5, 0.8]).threshold == pytest.approx(0.3)


def test_histogram_matches_direct_counts_streaming_and_chunked(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # force many chunks
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(13, 11), dtype=np.uint8)  # an 8-bit probability image
    truth = rng.random((13, 11)) > 0.6
    valid = rng.random((13, 11)) > 0.2
    h = ProbabilityHistogram()
    h.add(image[:6], truth[:6], valid[:6])
    h.add(torch.tensor(image[6:]), torch.tensor(truth[6:]), torch.tensor(valid[6:]))
    thresholds = [0.0, 1 / 255, 0.5, 128 / 255, 200 / 255, 1.0]
    for t, counts in zip(thresholds, h.counts_at(thresholds), strict=True):
        direct = confusion(image / 255.0 >= t, truth, valid)  # exact for 8-bit images
        assert counts == direct, t
        binary, was_binary = binarize_prediction(image, threshold=t)
        assert not was_binary and confusion(binary, truth, valid) == direct


def test_binarize_prediction_kinds():
    mask, binary = binarize_prediction(np.array([[0, 255]], np.uint8), threshold=0.9)
    assert binary and mask.tolist() == [[False, True]]
    assert binarize_prediction(np.array([[0, 1]], np.uint8))[1]
    assert binarize_prediction(np.array([[0, 65535]], np.uint16))[1]
    mask, binary = binarize_prediction(np.array([[0, 127, 128, 255]], np.uint8))
    assert not binary and mask.tolist() == [[False, False, True, True]]
    mask, binary = binarize_prediction(np.array([[0.2, 0.5, 0.7]], np.float32), threshold=0.6)
    assert not binary and mask.tolist() == [[False, False, True]]
    assert binarize_prediction(np.array([[0.0, 1.0]]))[1]
    # a piece of an 8-bit probability map holding only 0 and 1/255 is not ink when forced
    low = np.array([[0, 1]], np.uint8)
    assert binarize_prediction(low)[0].tolist() == [[False, True]]  # detected as binary
    mask, binary = binarize_prediction(low, binary=False)
    assert mask.tolist() == [[False, False]] and not binary
    mask, binary = binarize_prediction(np.array([[0, 20]], np.uint8), binary=True)
    assert mask.tolist() == [[False, True]] and binary
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        binarize_prediction(np.array([[0.5, 1.5]]))
    with pytest.raises(InputError, match="threshold"):
        binarize_prediction(np.array([[0.5]]), threshold=1.5)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_evaluate_files(tmp_path):
    labels = _png(tmp_path / "inklabels.png", (TRUTH * 255).astype(np.uint8))
    pred = _png(tmp_path / "pred.png", (PRED * 255).astype(np.uint8))
    valid = np.ones_like(PRED)
    valid[:, 3] = 0
    mask = _png(tmp_path / "mask.png", (valid * 255).astype(np.uint8))
    result = evaluate_files(pred, labels, mask)
    assert result.counts == Counts(tp=2, fp=1, fn=1, tn=2)
    assert result.threshold is None
    d = result.to_dict()
    assert d["f0.5"] == pytest.approx(2 / 3) and d["valid_pixels"] == 6
    assert "f0.5" in result.report()
    # 16-bit probabilities: PRED as 0.75, the rest 0.25
    prob16 = np.where(PRED == 1, 49151, 16384).astype(np.uint16)
    prob = _png(tmp_path / "prob16.png", prob16)
    result = evaluate_files(prob, labels)
    assert result.counts == Counts(tp=2, fp=2, fn=1, tn=3) and result.threshold == 0.5
    assert evaluate_files(prob, labels, threshold=0.8).counts.tp == 0


def test_evaluate_files_errors_name_the_file(tmp_path):
    labels = _png(tmp_path / "inklabels.png", (TRUTH * 255).astype(np.uint8))
    small = _png(tmp_path / "small.png", np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError, match=r"small\.png: expected 2 x 4"):
        evaluate_files(small, labels)
    with pytest.raises(InputError, match=r"small\.png: expected 2 x 4"):
        evaluate_files(labels, labels, small)
    with pytest.raises(InputError, match=r"missing\.png: expected an image file, got no such"):
        evaluate_files(tmp_path / "missing.png", labels)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"junk\.png: expected an image Pillow can read"):
        evaluate_files(tmp_path / "junk.png", labels)
    colour = np.zeros((2, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(InputError, match="single-channel"):
        evaluate_files(_png(tmp_path / "colour.png", colour), labels)
